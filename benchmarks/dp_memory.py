"""B7, memory of a large logical batch: the peak memory of one DP-SGD step whose Poisson draw expects 1,024
examples, cut into micro-batches of at most 64 rows (train.physical_batch_size = 64), against a step on the
largest of those micro-batches alone (the most tokens; up to 64 rows). The activations of a step live only
while one micro-batch is in flight and the clipped sums are parameter-sized, so the whole draw should cost
about what its largest micro-batch does (target: at most 1.5x).

all-MiniLM-L6-v2 on SST-2 training sentences (max_length 64), FFA-LoRA and Fed-SB at rank 8 with the head.
Each measurement runs in a fresh process: on the CPU the peak resident set (VmHWM) is reset just before the
step, on a GPU the allocator's peak; "step" is the peak's rise over the memory held just before the step. On
the CPU both processes run with glibc's MALLOC_MMAP_THRESHOLD_ at 128 KiB, so that every tensor larger than
that is mapped on its own and returned when freed: with glibc's default, freed blocks stay in its heap and
the resident set counts memory that no tensor holds.
Writes results/dp_memory.json and prints the ratio.

    FEDLORA_DATA_DIR=/work/shared/data python benchmarks/dp_memory.py [--expected 1024] [--physical 64]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
from harness import write_results


MALLOC_ENV = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}


def current_and_reset() -> int:
    """Memory held now; the peak counter restarts from here."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    return _status("VmRSS")


def peak() -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure(method: str, rows: int, physical: int, largest_only: bool) -> dict:
    """One DP step on a draw of `rows` training examples in micro-batches of at most `physical` rows, or on
    the largest of those micro-batches only."""
    from fedlora.client import local_train, make_optimizer
    from fedlora.config import build_config
    from fedlora.experiment import build_task
    from fedlora.methods import METHODS
    from fedlora.models import pick_device
    from fedlora.privacy.dpsgd import DPSGD
    from fedlora.privacy.grad_sample import for_trainable

    cfg = build_config({"method": {"name": method}, "model": {"name": "minilm-l6"}, "adapter": {"rank": 8},
                        "data": {"name": "sst2", "max_length": 64}})
    device = pick_device("auto")
    task, adapted, _ = build_task(cfg, device)
    keys = adapted.keys_of(METHODS[method].trains)
    params = adapted.set_trainable(keys)
    optimizer = make_optimizer(params, cfg.train)
    dp = DPSGD(for_trainable(adapted, keys), dict(zip(keys, params)), clip_norm=1.0, noise_multiplier=1.0,
               expected_batch_size=rows, generator=torch.Generator(device).manual_seed(0))
    chosen = np.random.default_rng(0).choice(len(task.train_labels), rows, replace=False)
    parts = task.micro_batches(chosen, physical)
    if largest_only:
        parts = [max(parts, key=lambda part: part["attention_mask"].numel())]
    losses = lambda batch: task.example_losses(adapted.model, batch)  # noqa: E731
    local_train(adapted.model, optimizer, [task.micro_batches(chosen[:8], physical)], losses, dp=dp)  # warm-up
    before = current_and_reset()
    local_train(adapted.model, optimizer, [parts], losses, dp=dp)
    top = peak()
    return {"method": method, "rows": sum(len(part["attention_mask"]) for part in parts), "physical": physical,
            "tokens_of_largest_part": max(part["attention_mask"].numel() for part in parts), "parts": len(parts),
            "held_before_MiB": before / 2**20, "peak_MiB": top / 2**20, "step_MiB": (top - before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expected", type=int, default=1024)
    parser.add_argument("--physical", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["ffa", "fedsb"])
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # method rows physical largest, in a fresh process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]), args.one[3] == "largest")))
        return
    rows = []
    for method in args.methods:
        pair = {}
        for which in ("all", "largest"):
            out = subprocess.run([sys.executable, __file__, "--one", method, str(args.expected), str(args.physical),
                                  which], capture_output=True, text=True, check=True, env=MALLOC_ENV).stdout
            pair[which] = json.loads(out.strip().splitlines()[-1])
        large, small = pair["all"], pair["largest"]
        ratio = large["step_MiB"] / small["step_MiB"]
        total = large["peak_MiB"] / small["peak_MiB"]
        rows.append({"method": method, "large": large, "small": small, "step_ratio": ratio, "peak_ratio": total})
        print(f"{method}: step memory {large['step_MiB']:.0f} MiB for {args.expected} rows in {large['parts']} "
              f"micro-batches vs {small['step_MiB']:.0f} MiB for its largest ({small['rows']} rows): ratio {ratio:.2f} "
              f"(whole-process peak {large['peak_MiB']:.0f} vs {small['peak_MiB']:.0f} MiB: {total:.2f})")
    write_results("results/dp_memory.json", {"expected_batch": args.expected, "physical_batch": args.physical,
                                              "rows": rows})


if __name__ == "__main__":
    main()
