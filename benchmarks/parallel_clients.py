"""Vectorised clients: the time of one round's local training with the clients trained one after
another (federation.parallel_clients = 1) against all of them trained together in one pass over the
shared base model (parallel_clients = clients per round).

all-MiniLM-L6-v2 on SST-2 on the CPU (FEDLORA_DATA_DIR=../shared/data), and where CUDA is available
SmolLM2-135M on GSM8K on the GPU. Rounds of the two variants alternate on the same simulation, and the
median over repeats is reported. Writes results/parallel_clients.json and prints a Markdown table.

    FEDLORA_DATA_DIR=../shared/data python benchmarks/parallel_clients.py [--repeats 3] [--steps 1] [--settings 10x8 10x32]
        [--setups smollm2-135m/gsm8k/cuda] [--dry-run]

A setup is MODEL/DATA/DEVICE; --dry-run runs each on a tiny random model of the same architecture on the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from harness import tiny_model_folder, write_results

from fedlora.config import build_config
from fedlora.simulator import Simulator

SETTINGS = [(10, 8), (10, 32), (50, 8), (50, 32)]  # (clients per round, batch size)
CLASSIFICATION = ("sst2", "rte", "imdb")


def simulation(model: str, data: str, device: str, clients: int, batch: int, steps: int, method: str,
               max_length: int, model_path: str | None = None, examples: int = 20000) -> Simulator:
    cfg = build_config({
        "seed": 0, "device": device, "method": {"name": method}, "model": {"name": model, "path": model_path},
        "adapter": {"rank": 8}, "data": {"name": data, "max_length": max_length, "max_train_examples": examples},
        "federation": {"num_clients": clients, "clients_per_round": clients, "rounds": 1},
        "train": {"local_steps": steps, "batch_size": batch, "lr": 1e-3}, "eval": {"every": 0},
    })
    sim = Simulator(cfg, tempfile.mkdtemp(), progress=False)
    sim.initialise()  # the method's set-up (Fed-SB's subspace); no evaluation with eval.every = 0
    return sim


def round_seconds(sim: Simulator, parallel_clients: int) -> float:
    sim.cfg.federation.parallel_clients = parallel_clients
    clients = sim.server.sample_clients(1)
    if sim.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outcomes, _ = sim.train_round(clients, 1)
    if sim.device.type == "cuda":
        torch.cuda.synchronize()
    assert all(o.reason is None for o in outcomes) and len(outcomes) == len(clients), outcomes
    return time.perf_counter() - start


def measure(model: str, data: str, device: str, args) -> list[dict]:
    rows = []
    path = tiny_model_folder(model, data in CLASSIFICATION, tempfile.mkdtemp()) if args.dry_run else None
    for clients, batch in args.settings:
        sim = simulation(model, data, device, clients, batch, args.steps, args.method, args.max_length, path,
                         200 if args.dry_run else 20000)
        if not rows:  # warm-up of both variants
            round_seconds(sim, clients)
            round_seconds(sim, 1)
        times = {"sequential": [], "vectorised": []}
        for _ in range(args.repeats):
            times["sequential"].append(round_seconds(sim, 1))
            times["vectorised"].append(round_seconds(sim, clients))
        seq, vec = statistics.median(times["sequential"]), statistics.median(times["vectorised"])
        rows.append({"model": model, "device": sim.device.type, "clients": clients, "batch": batch,
                     "sequential_s": round(seq, 3), "vectorised_s": round(vec, 3), "ratio": round(vec / seq, 3),
                     "repeats": times})
        print(f"{model} {clients} clients, batch {batch}: sequential {seq:.3f} s, vectorised {vec:.3f} s, "
              f"ratio {vec / seq:.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="local steps per client")
    parser.add_argument("--method", default="ffa")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--settings", nargs="+", default=[f"{c}x{b}" for c, b in SETTINGS],
                        help="CLIENTSxBATCH pairs (default: 10x8 10x32 50x8 50x32)")
    gpu = ["smollm2-135m/gsm8k/cuda"] if torch.cuda.is_available() else []
    parser.add_argument("--setups", nargs="+", metavar="MODEL/DATA/DEVICE", default=["minilm-l6/sst2/cpu"] + gpu)
    parser.add_argument("--dry-run", action="store_true", help="tiny random models, 3 clients at batch 2, the CPU")
    parser.add_argument("--out", default="results/parallel_clients.json")
    args = parser.parse_args()
    if args.dry_run:
        args.settings, args.repeats, args.max_length = ["3x2"], 1, 32
        args.setups = [setup.rsplit("/", 1)[0] + "/cpu" for setup in args.setups]
    args.settings = [tuple(int(n) for n in s.split("x")) for s in args.settings]
    rows = [row for setup in args.setups for row in measure(*setup.split("/"), args)]
    write_results(args.out, {"method": args.method, "local_steps": args.steps, "rows": rows})
    print("\n| model | device | clients | batch | sequential round (s) | vectorised round (s) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['clients']} | {r['batch']} | {r['sequential_s']} | "
              f"{r['vectorised_s']} | {r['ratio']} |")


if __name__ == "__main__":
    main()
