"""B1, local training speed: one client's training step in fedlora against the same LoRA built with PEFT
in a plain PyTorch loop, and against the compute floor.

Same model, batch, sequence length, rank, target layers and optimizer (AdamW) on both sides; fedlora's
step is the library's own `local_train` on its adapted model. The floor is the step's FLOPs (counted by
torch.utils.flop_counter on the fedlora step) over the matmul rate measured in the same run on the
model's own matmul shapes. Steps alternate and the median over repeats is reported.

    python benchmarks/throughput.py [--repeats 7] [--rank 16] [--models minilm-l6 smollm2-135m]
        [--device cuda] [--batch 8 --tokens 256] [--dry-run]
"""
from __future__ import annotations

import argparse
import copy

import torch
from harness import (causal_lm_losses, classification_losses, device_arguments, load_base, make_batch, median_times,
                     write_results)
from torch.utils.flop_counter import FlopCounterMode

from fedlora.adapters import AdaptedModel
from fedlora.client import local_train
from fedlora.methods import METHODS
from fedlora.models import default_target_modules

SETTINGS = {  # model preset -> (batch, tokens, classification?)
    "minilm-l6": (16, 128, True),
    "smollm2-135m": (4, 128, False),
    "gemma3-270m": (4, 128, False),
}


def fedlora_step(base, method: str, rank: int, targets: list[str], heads: list[str], losses_of, batch):
    model = copy.deepcopy(base).train()
    cls = METHODS[method]
    adapted = AdaptedModel(model, parameterisation=cls.parameterisation, rank=rank, scaling=1.0,
                           target_modules=targets, head_modules=heads)
    g = torch.Generator().manual_seed(1)
    adapted.load_state({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in adapted.state().items()})
    optimizer = torch.optim.AdamW(adapted.set_trainable(adapted.keys_of(cls.trains)), lr=1e-4)
    losses = losses_of(model)
    return lambda: local_train(model, optimizer, [[batch]], losses)


def without_dropout(model):
    """A copy whose dropout layers drop nothing: what is left over the floor is not the regulariser's masks."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def peft_step(base, rank: int, targets: list[str], heads: list[str], losses_of, batch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                                           modules_to_save=heads or None)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = losses_of(model)

    def step():
        losses(batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def step_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_rate(rows: int, shapes: list[tuple[int, int]], repeats: int, device: str = "cpu") -> float:
    """The best FLOP/s over the model's own matmul shapes (rows x d_in @ d_in x d_out)."""
    best = 0.0
    for d_in, d_out in shapes:
        x, w = torch.randn(rows, d_in, device=device), torch.randn(d_in, d_out, device=device)
        seconds = median_times({"mm": lambda: torch.mm(x, w)}, repeats * 3, warmup=3)["mm"]
        best = max(best, 2 * rows * d_in * d_out / seconds)
    return best


def bench_model(preset: str, rank: int, repeats: int, args) -> dict:
    batch_size, tokens, classification = SETTINGS[preset]
    batch_size, tokens = args.batch or batch_size, args.tokens or tokens
    base = load_base(preset, classification, args.dry_run, args.device)
    heads, losses_of = (["classifier"], classification_losses) if classification else ([], causal_lm_losses)
    config = base.config
    targets = default_target_modules(config.model_type)
    batch = {k: v.to(args.device) for k, v in make_batch(config.vocab_size, batch_size, tokens,
                                                          2 if classification else None).items()}
    steps = {"peft": peft_step(base, rank, targets, heads, losses_of, batch)}
    steps |= {m: fedlora_step(base, m, rank, targets, heads, losses_of, batch) for m in ("fedit", "ffa", "fedsb")}
    steps["fedit_no_dropout"] = fedlora_step(without_dropout(base), "fedit", rank, targets, heads, losses_of, batch)
    flops = step_flops(steps["fedit"])
    times = median_times(steps, repeats)
    rate = matmul_rate(batch_size * tokens, [(config.hidden_size, config.hidden_size),
                                             (config.hidden_size, config.intermediate_size)], repeats, args.device)
    floor = flops / rate
    row = {"model": preset, "device": args.device, "batch": batch_size,
           "tokens": tokens, "rank": rank, "step_gflops": flops / 1e9,
           "matmul_gflops_per_s": rate / 1e9, "floor_s": floor, "peft_s": times["peft"],
           "fedlora_s": {m: times[m] for m in ("fedit", "ffa", "fedsb")},
           "fedlora_over_peft": times["fedit"] / times["peft"], "fedlora_over_floor": times["fedit"] / floor,
           "peft_over_floor": times["peft"] / floor,
           "fedlora_no_dropout_over_floor": times["fedit_no_dropout"] / floor}
    print(row, flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"], choices=list(SETTINGS))
    parser.add_argument("--batch", type=int, help="rows per step (default: the model's in SETTINGS)")
    parser.add_argument("--tokens", type=int, help="tokens per row (default: the model's in SETTINGS)")
    parser.add_argument("--out", default="results/throughput.json")
    device_arguments(parser)
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.repeats, args.batch, args.tokens = "cpu", 1, 2, 16

    rows = [bench_model(m, args.rank, args.repeats, args) for m in args.models]
    print(f"\nrank {args.rank}, AdamW, {args.device} ({torch.get_num_threads()} CPU threads), "
          f"median of {args.repeats}\n")
    print("| model | batch x tokens | PEFT step (s) | fedlora FedIT (s) | FFA-LoRA (s) | Fed-SB (s) "
          "| fedlora / PEFT | floor (s) | fedlora / floor | PEFT / floor | fedlora, base dropout off / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = r["fedlora_s"]
        print(f"| {r['model']} | {r['batch']} x {r['tokens']} | {r['peft_s']:.3f} | {f['fedit']:.3f} | "
              f"{f['ffa']:.3f} | {f['fedsb']:.3f} | {r['fedlora_over_peft']:.2f} | {r['floor_s']:.3f} | "
              f"{r['fedlora_over_floor']:.2f} | {r['peft_over_floor']:.2f} | {r['fedlora_no_dropout_over_floor']:.2f} |")
    write_results(args.out, {"benchmark": "B1 throughput", "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
