"""B3, simulation overhead: the same 10-client round through fedlora's in-process simulator and through
Flower's simulation engine (flwr.simulation.run_simulation: Ray, the ServerApp and ClientApp of
fedlora.flower), and the simulator's round wall time over the sum of its clients' pure training time.

all-MiniLM-L6-v2 (preset minilm-l6), SST-2 from $FEDLORA_DATA_DIR, FFA-LoRA rank 16, 10 clients all
sampled, a few local steps; round 1 timed, from sending the downloads to the aggregated model (in-process:
Simulator._round; Flower: the ServerApp's round record, from configure_train to aggregate_train). The
two runtimes alternate, the median over repeats is reported; the JSON is rewritten after every repeat. Writes results/flower_vs_inprocess.json.

    FEDLORA_DATA_DIR=../shared/data python benchmarks/flower_vs_inprocess.py [--repeats 3] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from harness import write_results

import fedlora.client
from fedlora.config import build_config
from fedlora.simulator import Simulator


def make_config(args):
    return build_config({
        "seed": 0, "method": {"name": args.method}, "model": {"name": "minilm-l6"}, "adapter": {"rank": 16},
        "data": {"name": "sst2", "partition": "iid", "max_length": 64},
        "federation": {"num_clients": args.clients, "clients_per_round": args.clients, "rounds": 2,
                       "parallel_clients": 1},  # clients one by one, each timed in its local training
        "train": {"local_steps": args.steps, "batch_size": 16, "lr": 3e-3},
        "eval": {"every": 0, "max_examples": 64}, "device": "cpu"})  # evaluated after round 2 only


def round_seconds(out: Path, r: int = 1) -> float:
    """The wall time of round r in a run folder's log."""
    return next(json.loads(ln)["seconds"] for ln in (out / "rounds.jsonl").read_text().splitlines()
                if json.loads(ln)["round"] == r)


def in_process(cfg, out: Path) -> dict:
    """Round 1's wall time and the sum of its clients' local_train times."""
    training = {}
    real = fedlora.client.local_train

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            training[len(training)] = time.perf_counter() - t0

    fedlora.client.local_train = timed
    try:
        sim = Simulator(cfg, out, progress=False)
        sim.server.begin(resume=False)  # the run folder, and the accountant under DP
        sim.initialise()
        record = sim.round(1)  # round 2 would be the same round again, and the final evaluation
    finally:
        fedlora.client.local_train = real
    return {"round": record["seconds"], "training": sum(training.values())}


def on_flower(cfg, out: Path) -> float:
    from flwr.simulation import run_simulation

    from fedlora.flower.client_app import client_app
    from fedlora.flower.project import to_run_config
    from fedlora.flower.server_app import server_app

    run_config = to_run_config(cfg) | {"out": str(out), "round-timeout": 600.0, "node-wait": 60.0}
    run_simulation(server_app=server_app(run_config), client_app=client_app(run_config),
                   num_supernodes=cfg.federation.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count(), "logging_level": "error"}})
    return round_seconds(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", default="ffa")
    parser.add_argument("--out", default="results/flower_vs_inprocess.json")
    args = parser.parse_args()
    cfg = make_config(args)
    runs = {"inprocess_round_s": [], "inprocess_training_s": [], "flower_round_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            local = in_process(cfg, Path(tmp) / f"sim{i}")
            runs["inprocess_round_s"].append(local["round"])
            runs["inprocess_training_s"].append(local["training"])
            runs["flower_round_s"].append(on_flower(cfg, Path(tmp) / f"flower{i}"))
            print(f"repeat {i + 1}: in-process round {local['round']:.2f} s (clients' training "
                  f"{local['training']:.2f} s), Flower simulation engine round {runs['flower_round_s'][-1]:.2f} s",
                  flush=True)
            write(args, runs)


def write(args, runs: dict) -> None:
    median = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "benchmark": "B3", "model": "minilm-l6", "data": "sst2", "method": args.method, "clients": args.clients,
        "local_steps": args.steps, "batch_size": 16, "max_length": 64, "repeats": args.repeats,
        "flower_engine": "flwr.simulation.run_simulation (Ray backend, 1 CPU per ClientApp)",
        "median": median, "runs": runs, "repeats_done": len(runs["flower_round_s"]),
        "ratio_flower_over_inprocess": median["flower_round_s"] / median["inprocess_round_s"],
        "ratio_inprocess_round_over_training": median["inprocess_round_s"] / median["inprocess_training_s"],
    }
    write_results(args.out, result)
    print(f"Flower simulation engine round / in-process round: {result['ratio_flower_over_inprocess']:.2f}")
    print(f"in-process round wall time / clients' training time: {result['ratio_inprocess_round_over_training']:.3f}")


if __name__ == "__main__":
    main()
