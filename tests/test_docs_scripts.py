"""The benchmark and experiment commands the docs show, run exactly as written in a folder laid out like the
checkout (its benchmarks/, experiments/, examples/, results/ and tests/ copied, the environment linked).

Their whole runs take from minutes to hours on 2 CPU cores, so each command runs until it has shown that it
works: a benchmark until it prints its first measurement, an experiment until its first run has trained a
round; then it is stopped. The short ones run to the end. Every such command in the docs is listed here,
and a command the docs show that is not listed fails the first test.

The commands run two at a time, each with one torch thread (OMP_NUM_THREADS=1) and in a checkout of its
own; each test waits for its command."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedlora.run_folder import read_log

from conftest import ROOT, SHARED_DATA
from flower_federation import descendants

DATA = "FEDLORA_DATA_DIR=../shared/data "
PY = ".venv/bin/python "


@dataclass
class Shown:
    page: str
    works: str  # a regular expression its output matches, or "rounds:GLOB": a run folder there trained round 1
    to_the_end: bool = False
    needs: str = ""  # a module it needs, else skipped


SCRIPTS = {  # the longest first: the commands run two at a time, in this order
    DATA + PY + "experiments/gsm8k_smollm2.py --scale cpu": Shown("language-models.md",
                                                                  "rounds:runs/gsm8k_smollm2/*"),
    PY + "benchmarks/throughput.py --repeats 5": Shown("performance.md", r"'peft_s': [\d.]+"),
    DATA + PY + "benchmarks/clients_memory.py": Shown("performance.md", r"'peak_rss_mb': [\d.]+"),
    DATA + PY + "benchmarks/clients_memory.py --population": Shown("performance.md", r"'peak_rss_mb': [\d.]+"),
    DATA + PY + "benchmarks/clients_memory.py --population --same-cohort --rounds 6":
        Shown("performance.md", r"'peak_rss_mb': [\d.]+"),
    DATA + PY + "experiments/dp_comparison.py --unit client --tune":
        Shown("privacy.md", "rounds:runs/user_dp_comparison/tune/*/trials/*"),
    DATA + PY + "experiments/dp_comparison.py --unit client --epsilons 3 --methods fedsb --fixed-clip 3":
        Shown("privacy.md", "rounds:runs/user_dp_comparison/*"),
    DATA + PY + "experiments/dp_comparison.py --unit client --epsilons 3 --methods fedsb --fixed-clip 3 "
                "--mechanism distributed": Shown("privacy.md", "rounds:runs/user_dp_comparison/*"),
    DATA + PY + "experiments/tuned_comparison.py": Shown("privacy.md", "rounds:runs/tuned_comparison/tune/*/trials/*"),
    PY + "benchmarks/communication.py": Shown("performance.md", r"Mistral-7B: Fed-SB r=200 sends 8,960,000 parameters",
                                              to_the_end=True),
    PY + "benchmarks/dp_overhead.py": Shown("performance.md", r"minilm-l6 fedit: \{.*'dp_s'"),
    DATA + PY + "benchmarks/parallel_clients.py": Shown("performance.md", r"clients, batch \d+: sequential [\d.]+ s"),
    DATA + PY + "experiments/reproduce.py --jobs 2": Shown("performance.md", "rounds:runs/reproduce/tune/*"),
    DATA + PY + "benchmarks/dp_memory.py": Shown("privacy.md", r"ffa: step memory \d+ MiB"),
    DATA + PY + "experiments/dp_comparison.py": Shown("privacy.md", "rounds:runs/dp_comparison/*"),
    DATA + PY + "experiments/dp_comparison.py --methods fedsvd rolora flexlora hetlora --epsilons 3 none":
        Shown("privacy.md", "rounds:runs/dp_comparison/*"),
    DATA + PY + "experiments/dp_comparison.py --methods flexlora hetlora --client-ranks 4 16 --epsilons 3 none":
        Shown("privacy.md", "rounds:runs/dp_comparison/*"),
    DATA + PY + "benchmarks/flower_secagg.py --clients 3 --rounds 2": Shown("flower.md", r"plain \{", needs="flwr"),
    DATA + PY + "benchmarks/flower_vs_inprocess.py --repeats 3": Shown("flower.md", r"repeat 1: in-process round",
                                                                       needs="ray"),
    DATA + PY + "experiments/fedsb_init.py --seeds 0 1 2": Shown("methods.md", "rounds:runs/fedsb_init/*"),
    DATA + PY + "experiments/fedsb_setup_scale.py": Shown("methods.md", r"init_lr [\d.e-]+ \(default\): "
                                                                         r"\|\|B R0 A\|\| / \|\|W0\|\| up to"),
}
RUNS_AT_ONCE = 2


def shown_commands() -> set[str]:
    """Every line of a code block in docs/ and the README that runs a script of benchmarks/ or experiments/."""
    found = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in page.read_text().splitlines():
            if line.startswith("    ") and re.search(r"\b(benchmarks|experiments)/\w+\.py", line):
                found.add(line.strip())
            for inline in re.findall(r"`([^`]*python[^`]*(?:benchmarks|experiments)/[^`]*)`", line):
                found.add(inline)  # a command written in the text: it must become a code block
    return found


def test_every_script_command_in_the_docs_is_run_here():
    assert shown_commands() == set(SCRIPTS)
    for command, shown in SCRIPTS.items():
        page = (ROOT / "docs" / shown.page).read_text()
        assert re.search(r"\n {4,}" + re.escape(command) + "\n", page), (shown.page, command)


def test_the_results_the_docs_include_are_the_results_files():
    """A results table a page includes (between `<!-- results/NAME.md -->` and `<!-- end of results/NAME.md -->`)
    is that file as the experiment last wrote it."""
    included = 0
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in re.finditer(r"<!-- (results/[\w.]+\.md) -->\n(.*?)<!-- end of \1 -->", page.read_text(), re.S):
            assert match.group(2) == (ROOT / match.group(1)).read_text(), f"{page.name}: {match.group(1)} differs"
            included += 1
    assert included >= 1


def make_checkout(parent: Path) -> Path:
    folder = parent / "work"
    folder.mkdir()
    for part in ("benchmarks", "experiments", "examples", "results", "tests"):
        shutil.copytree(ROOT / part, folder / part, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / ".venv").symlink_to(ROOT / ".venv")
    (parent / "shared").symlink_to(SHARED_DATA.parent)
    return folder


def trained_a_round(folder: Path, pattern: str) -> bool:
    """Whether a run folder matching `pattern` logged round 1 (fedlora's reader leaves out a line being written)."""
    return any(row["round"] >= 1 for log in folder.glob(pattern + "/rounds.jsonl") for row in read_log(log))


def run_until_it_works(command: str, folder: Path, shown: Shown, timeout: float,
                       cancelled: threading.Event | None = None) -> str:
    """Run `command` in bash in `folder` until `shown.works` holds (or to its end, or `cancelled` is set); stop
    it and all it started."""
    log = folder / "command.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cancelled = cancelled or threading.Event()
    with open(log, "wb") as out:
        process = subprocess.Popen(["bash", "-c", command], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)

    def works() -> bool:
        if shown.works.startswith("rounds:"):
            return trained_a_round(folder, shown.works.removeprefix("rounds:"))
        return re.search(shown.works, log.read_text(errors="replace")) is not None

    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline and not cancelled.is_set():
            if not shown.to_the_end and works():
                break
            time.sleep(1)
        output = log.read_text(errors="replace")
        if process.poll() is not None:
            assert process.returncode == 0, f"{command}\n{output[-4000:]}"
        assert works(), f"{command}: nothing shows that it works within {timeout:.0f} s\n{output[-4000:]}"
        return output
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """Interrupt the command as Ctrl-C would, so that it stops what it started (a benchmark's Flower federation
    runs in sessions of its own); then kill whatever of it is left."""
    tree = descendants(process.pid)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    for pid in tree | ({process.pid} if process.poll() is None else set()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The commands of the tests selected in this session, RUNS_AT_ONCE at a time in their order, each in a
    checkout of its own: {command: the future of its seconds until it worked}."""
    selected = [item.callspec.params["command"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_the_documented_script_command_runs"]
    cancelled = threading.Event()

    def run(command: str) -> float:
        started = time.monotonic()
        run_until_it_works(command, make_checkout(tmp_path_factory.mktemp("docs")), SCRIPTS[command], 1800, cancelled)
        return time.monotonic() - started

    with ThreadPoolExecutor(RUNS_AT_ONCE) as pool:
        futures = {command: pool.submit(run, command) for command in selected
                   if not SCRIPTS[command].needs or importlib.util.find_spec(SCRIPTS[command].needs)}
        yield futures
        for future in futures.values():
            future.cancel()
        cancelled.set()


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} not found")
@pytest.mark.parametrize("command", list(SCRIPTS), ids=lambda command: re.search(r"\w+\.py.*", command).group(0))
def test_the_documented_script_command_runs(runs, command):
    if SCRIPTS[command].needs:
        pytest.importorskip(SCRIPTS[command].needs)
    print(f"{command}: {runs[command].result():.0f} s")
