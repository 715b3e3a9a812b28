"""`fedlora flower run APP CONNECTION [--resume]`: `flwr run APP CONNECTION --stream`, then the run's status
from `flwr ls --run-id N --format json`. `flwr run` itself exits 0 whatever became of the ServerApp; this
command exits 0 only when the run finished completed, and otherwise prints why, and the command that
continues the run when its output folder holds one."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import FedloraError

STARTED = re.compile(r"Successfully started run (\d+)")


def flwr() -> str:
    """The `flwr` beside this Python (a virtual environment's bin), else the one on PATH."""
    here = Path(sys.executable).parent / "flwr"
    return str(here) if here.exists() else shutil.which("flwr") or "flwr"


def environment() -> dict:
    """The environment for flwr: this Python's bin first on PATH, so that what flwr starts by name (a local
    simulation's `flower-superlink`, its `flower-superexec`) is this environment's."""
    return os.environ | {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def run_status(run_id: int, connection: str) -> tuple[str, str]:
    """(status, details) of a run, as the SuperLink's Control API reports it."""
    done = subprocess.run([flwr(), "ls", connection, "--run-id", str(run_id), "--format", "json"],
                          capture_output=True, text=True, env=environment())
    try:
        answer = json.loads(done.stdout)
        run = answer["runs"][0]
        return run["status"], run.get("status-details", "")
    except (ValueError, KeyError, IndexError):
        raise FedloraError(f"run {run_id}: its status could not be read from '{connection}' "
                           f"(flwr ls: {(done.stdout + done.stderr).strip()[-300:]})") from None


def flower_run(app: str, connection: str, resume: bool = False, run_config: list[str] | None = None) -> int:
    cmd = [flwr(), "run", app, connection, "--stream"]
    for entry in (run_config or []) + (["resume=true"] if resume else []):
        cmd += ["--run-config", entry]
    run_id = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env=environment()) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            found = STARTED.search(line)
            if found and run_id is None:
                run_id = int(found.group(1))
    continue_with = f"fedlora flower run {app} {connection} --resume"
    if run_id is None:
        raise FedloraError(f"flwr run did not start a run on '{connection}' (exit status {proc.returncode})")
    try:
        status, details = run_status(run_id, connection)
    except FedloraError as err:  # the SuperLink went away mid-run
        raise FedloraError(f"{err}; once the SuperLink is back (with the same --database), continue the run: "
                           f"{continue_with}") from None
    if status == "finished:completed":
        print(f"fedlora: run {run_id} completed")
        return 0
    reason = details or status
    if "already holds a run" in reason:
        reason += f"; continue it: {continue_with}"
    elif status.startswith("finished"):
        reason += f" (a run stopped after a finished round continues with: {continue_with})"
    print(f"fedlora: error: run {run_id} {status}: {reason}", file=sys.stderr)
    return 1
