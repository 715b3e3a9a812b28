"""B6, the cost of secure aggregation on Flower: the same run on a live loopback federation (one
flower-superlink, N flower-supernode processes, `fedlora flower run`), plain and with Flower's SecAgg+
(`--run-config secagg-threshold=...`), and with distributed DP through SecAgg+'s integer sum (client-level DP,
privacy.mechanism = "distributed", fixed clipping, epsilon 8: each node's message is its noised integers mod
2^32), alternating over repeats. Per run: the SuperLink's own count of the
run's network traffic (`flwr ls --format json`, inbound + outbound bytes) and the wall time of each round
(rounds.jsonl, from the downloads to the aggregated model). Medians are reported; writes
results/flower_secagg.json.

all-MiniLM-L6-v2 (preset minilm-l6), SST-2 from $FEDLORA_DATA_DIR, FFA-LoRA rank 16, all clients sampled.

    FEDLORA_DATA_DIR=../shared/data python benchmarks/flower_secagg.py [--clients 3] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flower_federation import BIN, LoopbackFederation  # noqa: E402

from fedlora.config import build_config  # noqa: E402
from fedlora.flower.project import write_app  # noqa: E402
from fedlora.run_folder import read_log  # noqa: E402


def make_config(args, privacy: dict | None = None):
    privacy = {"privacy": privacy} if privacy else {}
    return build_config(privacy | {
        "seed": 0, "method": {"name": args.method}, "model": {"name": "minilm-l6"}, "adapter": {"rank": 16},
        "data": {"name": "sst2", "partition": "iid", "max_length": 64},
        "federation": {"num_clients": args.clients, "clients_per_round": args.clients, "rounds": args.rounds},
        "train": {"local_steps": args.steps, "batch_size": 16, "lr": 3e-3},
        "eval": {"every": 0, "max_examples": 64}, "device": "cpu"})


def one_run(federation, folder: Path, cfg, secagg: float | None) -> dict:
    out = folder / "run"
    app = write_app(folder / "app", cfg, out, round_timeout=600, node_wait=120).parent
    extra = ["--run-config", f"secagg-threshold={secagg}"] if secagg else []
    done = subprocess.run([str(BIN / "fedlora"), "flower", "run", str(app), "loopback", *extra],
                          env=federation.env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:] + federation.logs())
    run_id = next(line.split()[-1] for line in done.stdout.splitlines() if "Successfully started run" in line)
    listed = subprocess.run([str(BIN / "flwr"), "ls", "loopback", "--run-id", run_id, "--format", "json"],
                            env=federation.env, capture_output=True, text=True, check=True)
    traffic = json.loads(listed.stdout)["runs"][0]["network-traffic"]
    rows = [r for r in read_log(out / "rounds.jsonl") if r["round"] >= 1]
    return {"network_bytes": traffic["total-bytes"], "round_seconds": [r["seconds"] for r in rows],
            "payload_bytes_up": sum(r["bytes_up"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="ffa")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.66)
    parser.add_argument("--out", default="results/flower_secagg.json")
    args = parser.parse_args()
    configs = {"plain": make_config(args), "secagg": make_config(args), "distributed": make_config(args, {
        "unit": "client", "mechanism": "distributed", "clipping": "fixed", "client_clip": 1.0, "epsilon": 8.0})}
    runs = {kind: [] for kind in configs}
    with tempfile.TemporaryDirectory() as tmp:
        federation = LoopbackFederation(Path(tmp) / "federation", num_nodes=args.clients)
        try:
            for k in range(args.repeats):
                for kind, cfg in configs.items():
                    result = one_run(federation, Path(tmp) / f"{kind}-{k}", cfg,
                                     args.threshold if kind != "plain" else None)
                    runs[kind].append(result)
                    print(kind, result, flush=True)
        finally:
            federation.stop()

    def median(kind, key):
        values = [r[key] if not isinstance(r[key], list) else statistics.median(r[key]) for r in runs[kind]]
        return statistics.median(values)

    summary = {kind: {"network_bytes": median(kind, "network_bytes"), "round_seconds": median(kind, "round_seconds")}
               for kind in runs}
    summary["ratio"] = {key: summary["secagg"][key] / summary["plain"][key] for key in summary["plain"]}
    summary["distributed_over_secagg"] = {key: summary["distributed"][key] / summary["secagg"][key]
                                          for key in summary["plain"]}
    write_results(args.out, {"benchmark": "B6 secure aggregation on Flower", "args": vars(args), "runs": runs,
                             "summary": summary})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
