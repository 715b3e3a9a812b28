"""FedIT vs FFA-LoRA vs Fed-SB on GSM8K with SmolLM2-135M-Instruct; writes results/gsm8k_smollm2_<scale>.json
and prints a Markdown table naming the device.

    python experiments/gsm8k_smollm2.py               # the full config (a GPU)
    python experiments/gsm8k_smollm2.py --scale cpu   # reduced: 3 clients, 3 rounds, 40 test questions
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from fedlora.config import load_config
from fedlora.models import pick_device
from fedlora.simulator import Simulator

HERE = Path(__file__).resolve().parent
# Fed-SB trains r x r per layer, so it affords a larger rank for the same traffic (as in the paper).
METHODS = {
    "fedit": ["method.name='fedit'", "adapter.rank=16", "train.lr=5e-4"],
    "ffa": ["method.name='ffa'", "adapter.rank=16", "train.lr=1e-3"],
    "fedsb": ["method.name='fedsb'", "adapter.rank=64", "train.lr=5e-4"],
}
CPU_SCALE = ["device='cpu'", "model.autocast='off'", "data.max_length=256", "federation.num_clients=3",
             "federation.clients_per_round=3", "federation.rounds=3", "train.local_steps=4", "train.batch_size=4",
             "eval.every=3", "eval.max_examples=40", "eval.batch_size=20", "eval.max_new_tokens=192",
             "fedsb.init_examples=32"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--out", default="runs/gsm8k_smollm2")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    rows = []
    for name in args.methods:
        overrides = METHODS[name] + (CPU_SCALE if args.scale == "cpu" else [])
        cfg = load_config(HERE / "gsm8k_smollm2.toml", overrides)
        start = time.time()
        sim = Simulator(cfg, Path(args.out) / f"{args.scale}-{name}", progress=False)
        summary = sim.run(resume=True)
        log = [json.loads(line) for line in (sim.out / "rounds.jsonl").read_text().splitlines()]
        rows.append({"method": name, "rank": cfg.adapter.rank, "lr": cfg.train.lr,
                     "accuracy_before": log[0]["eval"]["accuracy"], "accuracy": summary["final_eval"]["accuracy"],
                     "test_loss_before": log[0]["eval"]["loss"], "test_loss": summary["final_eval"]["loss"],
                     "bytes_up_per_round": log[1]["bytes_up"], "bytes_up_total": summary["bytes_up_total"],
                     "seconds": round(time.time() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    cfg = load_config(HERE / "gsm8k_smollm2.toml", CPU_SCALE if args.scale == "cpu" else [])
    result = {"scale": args.scale, "device": device_name(pick_device(cfg.device)),
              "overrides": CPU_SCALE if args.scale == "cpu" else [], "methods": METHODS, "rows": rows}
    out = Path("results") / f"gsm8k_smollm2_{args.scale}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{args.scale} scale on {result['device']}; {cfg.eval.max_examples} GSM8K test questions\n")
    print("| method | rank | lr | exact match before -> after | test loss before -> after | MB up per round "
          "| MB up in all (incl. set-up) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['rank']} | {r['lr']:g} | {r['accuracy_before']:.3f} -> {r['accuracy']:.3f} | "
              f"{r['test_loss_before']:.3f} -> {r['test_loss']:.3f} | {r['bytes_up_per_round'] / 1e6:.2f} | "
              f"{r['bytes_up_total'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
