"""A run's output folder: held by one run at a time (a lock), written by atomic replacement or by appending
whole lines, repaired after a crash, and every failure to write it (a full disk, a read-only folder, a
file in the way) reported as one line that names the path, with what was written before left intact."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import FedloraError

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

LOCK, SUMMARY, ROUNDS_LOG = ".lock", "summary.json", "rounds.jsonl"


def write_error(path: Path, err: OSError) -> FedloraError:
    return FedloraError(f"{path}: cannot write ({err.strerror or err}); what was written before is kept")


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


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` in one step: a crash or a failed write leaves the old file as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_error(path, err) from None


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line; a failed write is cut back off, so the file never ends in half a line
    written by this call."""
    line = (json.dumps(record) + "\n").encode()
    try:
        with open(path, "ab") as f:
            start = f.seek(0, os.SEEK_END)
            try:
                f.write(line)
                f.flush()
            except OSError:
                f.truncate(start)
                raise
    except OSError as err:
        raise write_error(path, err) from None


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


def read_summary(folder: str | Path) -> dict:
    """A finished run's summary.json (with its config), or one line saying why the folder has none."""
    folder = Path(folder)
    path = folder / SUMMARY
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
