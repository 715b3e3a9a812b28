"""A live Flower federation on 127.0.0.1 for tests: one flower-superlink and N flower-supernode processes on
free ports, each in its own process group, all stopped by stop() whatever happened."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _executable(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


class LoopbackFederation:
    def __init__(self, folder: Path, num_nodes: int, node_env: dict[int, dict] | None = None,
                 connection: str = "loopback"):
        self.folder = Path(folder)
        self.home = self.folder / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = os.environ | {"FLWR_HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                                 "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}
        link, *node_ports = free_ports(1 + num_nodes)  # the SuperLink serves all its APIs on one HTTP port
        self.link = link
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\naddress = "127.0.0.1:{link}"\n'
            'insecure = true\n')
        self.processes: dict[str, subprocess.Popen] = {}
        self.link_command = [_executable("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
                             "--disable-runtime-dependency-installation", "--database", str(self.folder / "state.db")]
        self._start("superlink", self.link_command, self.env)
        self.wait_ready()
        for i in range(num_nodes):
            self._start(f"node{i}", [_executable("flower-supernode"), "--insecure",
                                     "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1",
                                     "--port", str(node_ports[i]), "--max-retries", "30",
                                     "--node-config", f"partition-id={i} num-partitions={num_nodes}"],
                        self.env | (node_env or {}).get(i, {}))

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes["superlink"].poll() is not None:
                raise RuntimeError("flower-superlink exited:\n" + self.logs())
            try:
                socket.create_connection(("127.0.0.1", self.link), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("flower-superlink did not open its port:\n" + self.logs())

    def _start(self, name: str, cmd: list[str], env: dict) -> None:
        log = open(self.folder / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def run(self, app: Path, timeout: float) -> subprocess.CompletedProcess:
        """`flwr run APP loopback --stream`: submits the run and streams its log until it ends."""
        return subprocess.run([_executable("flwr"), "run", str(app), "loopback", "--stream"], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def kill(self, name: str) -> None:
        """Kill a process and everything it started, as a crash or `kill -9` would."""
        process = self.processes[name]
        for pid in descendants(process.pid) | {process.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    def restart_superlink(self) -> None:
        """Start the SuperLink again on its port and database (after kill('superlink'))."""
        self.processes["superlink-before"] = self.processes.pop("superlink")
        self._start("superlink", self.link_command, self.env)
        self.wait_ready()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in
                         sorted(self.folder.glob("*.log")))

    def stop(self) -> None:
        """Kill every process started here and all they started (the SuperLink detaches its SuperExec into a
        session of its own, so process groups alone would miss it)."""
        pids = set()
        for process in self.processes.values():
            pids |= {process.pid} | descendants(process.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes.values():
            process.wait()


def descendants(pid: int) -> set[int]:
    """All processes below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
