"""A run killed anywhere resumes to the run it would have been: crashes injected at random points of the
code path (seeded), also halfway through a write and again during the resumed run, with DP on."""
import random
from collections import Counter

import pytest
import torch

from fedlora import checkpoint, run_folder
from fedlora.client import ClientTrainer
from fedlora.federation import FederationServer
from fedlora.simulator import Simulator

from conftest import read_log, without_seconds

pytestmark = pytest.mark.slow

TRIALS = 21
METHODS = ("fedsb", "fedsa", "fedex")  # Fed-SB's private set-up; FedSA-LoRA's client-kept B; FedEx-LoRA's W0


class Crash(BaseException):
    """The process dies: nothing of the code under test catches a BaseException."""


class KillPoints:
    """Counts the run's kill points (every log append, file write, client training, set-up reply and
    aggregation) and crashes at the kill_at-th, before it, after it, or halfway through a write."""

    def __init__(self, monkeypatch, rnd: random.Random | None = None, kill_at: int | None = None):
        self.seen, self.kill_at, self.rnd, self.where = 0, kill_at, rnd, None
        self.labels: list[str] = []  # every kill point passed, in order
        real_append, real_write = run_folder.append_line, run_folder.atomic_write

        def append_line(path, record):
            def torn():
                line = (__import__("json").dumps(record) + "\n").encode()
                with open(path, "ab") as f:
                    f.write(line[:len(line) // 2])
            self.event(f"log {path.name}", lambda: real_append(path, record), torn)

        def atomic_write(path, data):
            def torn():
                path.with_name(path.name + ".tmp").write_bytes(bytes(data if isinstance(data, bytes)
                                                                     else data.encode())[:len(data) // 2])
            self.event(f"write {path.name}", lambda: real_write(path, data), torn)

        monkeypatch.setattr(run_folder, "append_line", append_line)
        monkeypatch.setattr(run_folder, "atomic_write", atomic_write)
        monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
        for cls, name, label in ((ClientTrainer, "update", "client training"),
                                 (ClientTrainer, "set_up_reply", "set-up reply"),
                                 (FederationServer, "aggregate_round", "aggregation")):
            real = getattr(cls, name)

            def wrapped(*args, _real=real, _label=label, **kwargs):
                out = []
                self.event(_label, lambda: out.append(_real(*args, **kwargs)))
                return out[0]
            monkeypatch.setattr(cls, name, wrapped)

    def event(self, label: str, run, torn=None) -> None:
        self.seen += 1
        self.labels.append(label)
        if self.seen != self.kill_at:
            run()
            return
        mode = self.rnd.choice(["before", "torn", "after"] if torn else ["before", "after"])
        self.where = f"{label} ({mode})"
        if mode == "torn":
            torn()
        elif mode == "after":
            run()
        raise Crash


def _config(sim_config, method):
    return sim_config(method={"name": method}, federation={"num_clients": 3, "clients_per_round": 2, "rounds": 2,
                                                            "parallel_clients": 1},
                      train={"local_steps": 2, "keep_optimizer_state": True},
                      privacy={"noise_multiplier": 1.0, "randomness": "seeded", "accountant": "rdp"},
                      eval={"max_examples": 8})


def _first_kill(rnd: random.Random, labels: list[str], turn: int) -> int:
    """A kill point of the uninterrupted run: the kinds of point in turn (so that the few writes are hit as
    often as the many client trainings), then a random one of its occurrences."""
    kinds = sorted(set(labels))
    kind = kinds[turn % len(kinds)]
    return rnd.choice([i for i, label in enumerate(labels, 1) if label == kind])


def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_run(sim_config, tmp_path, monkeypatch):
    rnd = random.Random(20261130)
    reference = {}
    for method in METHODS:
        cfg = _config(sim_config, method)
        with monkeypatch.context() as m:
            counter = KillPoints(m)
            sim = Simulator(cfg, tmp_path / f"whole-{method}", progress=False)
            summary = sim.run()
        reference[method] = (cfg, counter.labels, sim.method.eval_state(), sim.adapted.base_weights(),
                             without_seconds(read_log(tmp_path / f"whole-{method}")), summary["privacy"])
        assert summary["privacy"]["epsilon_max"] > 0
    sites = Counter()
    for trial in range(TRIALS):
        method = METHODS[trial % len(METHODS)]
        cfg, labels, state, base, log, privacy = reference[method]
        out = tmp_path / f"trial-{trial}"
        # the first run and the first resumed run are each killed at a random point; the last one finishes
        for attempt, kill_at in enumerate([_first_kill(rnd, labels, trial // len(METHODS)), rnd.randint(1, len(labels)),
                                           None]):
            with monkeypatch.context() as m:
                killer = KillPoints(m, rnd, kill_at)
                sim = Simulator(cfg, out, progress=False)
                try:
                    summary = sim.run(resume=attempt > 0)
                except Crash:
                    sites[killer.where] += 1
                    continue
            break
        final = sim.method.eval_state()
        assert all(torch.equal(final[k], state[k]) for k in state), (trial, method)
        assert all(torch.equal(a, b) for a, b in zip(sim.adapted.base_weights().values(), base.values()))
        assert without_seconds(read_log(out)) == log, (trial, method)
        assert summary["privacy"] == privacy, (trial, method)
    print(f"\n{TRIALS} trials, {sum(sites.values())} kills at: " + ", ".join(f"{k}: {n}" for k, n in sorted(sites.items())))
    assert sum(sites.values()) >= TRIALS
