"""A run's output folder: held by one run at a time (a lock), written by atomic replacement or by appending
whole lines, repaired after a crash, and every failure to write it (a full disk, a read-only folder, a
file in the way) reported as one line that names the path, with what was written before left intact."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from . import checkpoint
from .errors import FedloraError
from .files import append_line, atomic_write, write_error

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

LOCK, SUMMARY, ROUNDS_LOG = ".lock", "summary.json", "rounds.jsonl"
MODEL_RECORD = "model.json"  # what the trained model needs (export.write_record)


def prepare(folder: Path) -> None:
    """Create the folder (and its parents) or refuse one that cannot be."""
    if folder.exists() and not folder.is_dir():
        raise FedloraError(f"{folder}: not a folder; choose another output folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(folder, err) from None


@contextmanager
def locked(folder: Path):
    """Hold OUT/.lock for the block; a second holder is refused at once, naming the folder and the holder."""
    prepare(folder)
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise FedloraError(f"{folder} is in use by another fedlora run (pid {holder}): wait for it to end "
                                   "or choose another output folder") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            raise write_error(path, err) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_log(path: Path) -> list[dict]:
    """The rows of a JSON-lines log; a torn last line (a crash while appending) is left out. Any other
    line that is not a row of a fedlora log is refused, naming the file and the line."""
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    except OSError as err:
        raise FedloraError(f"{path}: cannot read ({err.strerror or err})") from None
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    rows = []
    for i, line in numbered:
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or type(row.get("round")) is not int:
                raise ValueError
        except ValueError:
            if i == numbered[-1][0]:
                break
            raise FedloraError(f"{path}, line {i}: not a row of a fedlora log; move the file away or choose "
                               "another output folder") from None
        rows.append(row)
    return rows


def logged_seconds(folder: str | Path) -> float:
    """The run's wall time: the seconds of every round its log holds (set-up and final evaluation included), so
    that a run resumed after a stop counts every part of it."""
    return sum(row.get("seconds") or 0.0 for row in read_log(Path(folder) / ROUNDS_LOG))


def read_summary(folder: str | Path) -> dict:
    """A finished run's summary.json (with its config), or one line saying why the folder has none."""
    folder = Path(folder)
    path = folder / SUMMARY
    if folder.is_file():
        raise FedloraError(f"{folder}: a file, not a run folder (the folder `fedlora run --out` writes, with "
                           f"{SUMMARY}, {ROUNDS_LOG} and the trained adapter)")
    if not folder.is_dir():
        raise FedloraError(f"{folder}: no such run folder")
    if not path.is_file():
        raise FedloraError(f"{folder}: not a finished run (no {SUMMARY}; `fedlora run` writes it when the run "
                           "ends, `fedlora run --resume` continues an interrupted one)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FedloraError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise FedloraError(f"{path}: not a fedlora run summary (no config)")
    return summary


def repair_log(path: Path, last_round: int, last_record: dict | None) -> None:
    """Make the log end at the checkpoint's round: rows of later rounds (logged before a crash stopped the
    checkpoint) and a torn last line dropped, and that round's row taken from the checkpoint."""
    rows = [row for row in read_log(path)
            if row["round"] < last_round or (last_record is None and row["round"] == last_round)]
    if last_record is not None:
        rows.append(last_record)
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # older versions' pickle: never loaded (unpickling can run code)


class RunFolder:
    """A run's folder through the run: the log of rounds, the checkpoint after each round (with the round's
    log row, to repair a log torn by a crash), summary.json at the end, and the checks of a folder a run
    starts or resumes in."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.logged: dict | None = None  # the last row written to the log

    @contextmanager
    def held(self):
        """Hold the folder (its lock) for the block."""
        with locked(self.out):
            yield

    def refuse_existing_run(self, resume_hint: str) -> None:
        held = [name for name in (ROUNDS_LOG, CHECKPOINT, LEGACY_CHECKPOINT) if (self.out / name).exists()]
        if held:
            raise FedloraError(f"{self.out} already holds a run ({held[0]}): choose another output folder "
                               f"({resume_hint})")

    def start(self, resume: bool, resume_hint: str) -> bool:
        """Prepare the folder for a run; whether it holds a checkpoint to resume from. Resuming a run that died
        before its first checkpoint starts it again."""
        prepare(self.out)
        if resume and (self.out / CHECKPOINT).exists():
            return True
        legacy = self.out / LEGACY_CHECKPOINT
        if resume and legacy.exists():
            raise FedloraError(f"{legacy}: a checkpoint of an older fedlora, stored as a pickle, which is never "
                               "loaded (loading it could run code); start the run again in another folder")
        if resume:  # killed before its first checkpoint: round 0 runs again
            logged = max((row["round"] for row in read_log(self.out / ROUNDS_LOG)), default=0)
            if logged > 0:
                raise FedloraError(f"{self.out / ROUNDS_LOG} logs rounds up to {logged}, but there is no "
                                   f"{CHECKPOINT} to resume from: choose another output folder")
            atomic_write(self.out / ROUNDS_LOG, "")
        else:
            self.refuse_existing_run(resume_hint)
        return False

    def log(self, record: dict) -> None:
        if self.logged is None:  # a round closed outside a started run (a runtime's parts used alone)
            prepare(self.out)
        append_line(self.out / ROUNDS_LOG, record)
        self.logged = record

    def rows(self) -> list[dict]:
        return read_log(self.out / ROUNDS_LOG)

    def save_checkpoint(self, r: int, state: dict) -> None:
        """The state after round r, with round r's log row."""
        record = self.logged if self.logged is not None and self.logged.get("round") == r else None
        checkpoint.save(state | {"round": r, "record": record}, self.out / CHECKPOINT)

    def load_checkpoint(self, device, keys: tuple[str, ...]) -> dict:
        """The last checkpoint's state; refused, naming the file, when it lacks one of `keys`."""
        path = self.out / CHECKPOINT
        state = checkpoint.load(path, device)
        checkpoint.require(state, keys, path)
        return state

    def resume_log(self, state: dict) -> None:
        """Cut the log back to the checkpoint's round: rows logged after it, or torn by the crash, go, and its
        round's row is the checkpoint's."""
        repair_log(self.out / ROUNDS_LOG, state["round"], state["record"])
        self.logged = state["record"]

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def write_json(self, name: str, content) -> None:
        atomic_write(self.out / name, json.dumps(content, indent=2))
