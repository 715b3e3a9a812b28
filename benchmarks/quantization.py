"""Quantised bases (model.quantization): one client's FedIT step on a 4-bit and an 8-bit base against the
bf16 base. Same model, batch, rank 16, target layers and AdamW; bf16 autocast in every variant; the
non-quantised parts (embeddings, norms, output layer) in bf16 everywhere. Per variant: the weights' GPU
memory, the peak GPU memory of its first step (weights, optimizer state and activations), and the step
time (variants alternate, median over repeats). Writes results/quantization.json and prints a Markdown table.

    python benchmarks/quantization.py [--models smollm2-135m gemma3-270m] [--batch 8] [--tokens 256] [--repeats 5]
        [--dry-run]

The quantised variants need CUDA and bitsandbytes (pip install 'fedlora[quant]'); where either is missing
they are skipped with the reason. --dry-run runs the bf16 variant on a tiny random model on the CPU.
"""
from __future__ import annotations

import argparse
import importlib.util

import torch
from harness import (causal_lm_losses, load_base, make_batch, median_times, parse_step_arguments, step_arguments,
                     write_results)

from fedlora.adapters import AdaptedModel
from fedlora.client import local_train
from fedlora.methods import METHODS
from fedlora.models import default_target_modules, load_causal_lm, resolve_model_source

VARIANTS = ("bf16", "4bit", "8bit")


def skip_reason(variant: str, device: str) -> str | None:
    if variant == "bf16":
        return None
    if device != "cuda":
        return "needs a CUDA device"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes (pip install 'fedlora[quant]')"
    return None


def load(preset: str, variant: str, args):
    if args.dry_run:
        return load_base(preset, False, True, "cpu").to(torch.bfloat16)
    source = resolve_model_source(preset, None)
    if variant == "bf16":
        return load_causal_lm(source, "bfloat16")[0].to(args.device)
    return load_causal_lm(source, "bfloat16", variant, torch.device(args.device))[0]


def fedit_step(model, rank: int, batch: dict, device: str):
    adapted = AdaptedModel(model.train(), parameterisation="lora", rank=rank, scaling=1.0,
                           target_modules=default_target_modules(model.config.model_type), head_modules=[])
    g = torch.Generator().manual_seed(1)
    adapted.load_state({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in adapted.state().items()})
    optimizer = torch.optim.AdamW(adapted.set_trainable(adapted.keys_of(METHODS["fedit"].trains)), lr=1e-4)
    losses = causal_lm_losses(model)

    def autocast_losses(b):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return losses(b)
    return lambda: local_train(model, optimizer, [[batch]], autocast_losses)


def allocated(device: str) -> int:
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def bench_model(preset: str, args) -> list[dict]:
    steps, rows = {}, []
    for variant in VARIANTS:
        reason = skip_reason(variant, args.device)
        if reason:
            print(f"{preset} {variant}: skipped, {reason}", flush=True)
            rows.append({"model": preset, "variant": variant, "skipped": reason})
            continue
        before = allocated(args.device)
        model = load(preset, variant, args)
        weights = allocated(args.device) - before
        batch = {k: v.to(args.device) for k, v in make_batch(model.config.vocab_size, args.batch, args.tokens,
                                                              None).items()}
        steps[variant] = fedit_step(model, args.rank, batch, args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps[variant]()
        peak = (torch.cuda.max_memory_allocated() - before) if args.device == "cuda" else 0
        on_gpu = args.device == "cuda"  # no memory figures on the CPU
        rows.append({"model": preset, "variant": variant, "device": args.device,
                     "weights_mb": weights / 2**20 if on_gpu else None,
                     "step_peak_mb": peak / 2**20 if on_gpu else None})
    times = median_times(steps, args.repeats)
    for row in rows:
        if row["variant"] in times:
            row["step_s"] = times[row["variant"]]
            row["time_over_bf16"] = times[row["variant"]] / times["bf16"]
        print(row, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_arguments(parser, models=["smollm2-135m", "gemma3-270m"], batch=8, tokens=256, repeats=5,
                   out="results/quantization.json")
    args = parse_step_arguments(parser)

    rows = [row for preset in args.models for row in bench_model(preset, args)]
    print(f"\nFedIT rank {args.rank}, AdamW, bf16 autocast, batch {args.batch} x {args.tokens}, {args.device}, "
          f"median of {args.repeats}\n")
    print("| model | base | weights (MB) | peak in a step (MB) | step (s) | time / bf16 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | {r['variant']} | skipped: {r['skipped']} | | | |")
        else:
            memory = " | ".join("-" if r[k] is None else f"{r[k]:.0f}" for k in ("weights_mb", "step_peak_mb"))
            print(f"| {r['model']} | {r['variant']} | {memory} | {r['step_s']:.4f} | {r['time_over_bf16']:.2f} |")
    write_results(args.out, {"benchmark": "quantised bases", "batch": args.batch, "tokens": args.tokens,
                             "rank": args.rank, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
