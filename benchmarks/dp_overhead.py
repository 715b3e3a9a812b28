"""B2, the cost of privacy: a DP-SGD step against a non-private step, per method, and fedlora's DP step
against Opacus' (PrivacyEngine.make_private with ghost clipping) on the same LoRA built with PEFT.

all-MiniLM-L6-v2 (or decoders: --models smollm2-135m gemma3-270m, per-example loss = mean next-token
loss, Opacus' sequence ghost clipping), batch 32, 128 tokens, rank 16, CPU threads as the machine gives.
Steps of the compared variants alternate, and the median over repeats is reported, so the ratios are
measured side by side in one run. Writes results/dp_overhead.json and prints a Markdown table.

    python benchmarks/dp_overhead.py [--repeats 7] [--batch 32] [--tokens 128] [--rank 16]
        [--models minilm-l6 smollm2-135m gemma3-270m] [--device cuda] [--dry-run]
"""
from __future__ import annotations

import argparse
import copy

import torch
from harness import (causal_lm_losses, classification_losses, load_base, make_batch, median_times,
                     parse_step_arguments, step_arguments, write_results)

from fedlora.adapters import AdaptedModel
from fedlora.methods import METHODS
from fedlora.models import default_target_modules
from fedlora.privacy.dpsgd import DPSGD
from fedlora.privacy.grad_sample import for_trainable

CLASSIFIERS = ("minilm-l6",)  # the other presets are decoders, trained on next-token loss
NAMES = {"minilm-l6": "all-MiniLM-L6-v2", "smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}


def fedlora_steps(base, method: str, rank: int, batch: dict, classification: bool):
    """(plain step, DP step) closures for one method on a copy of the model."""
    model = copy.deepcopy(base).train()
    cls = METHODS[method]
    adapted = AdaptedModel(model, parameterisation=cls.parameterisation, rank=rank, scaling=1.0,
                           target_modules=default_target_modules(base.config.model_type),
                           head_modules=["classifier"] if classification else [])
    g = torch.Generator().manual_seed(1)
    adapted.load_state({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in adapted.state().items()})
    keys = adapted.keys_of(cls.trains)
    params = adapted.set_trainable(keys)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    losses = classification_losses(model) if classification else causal_lm_losses(model)
    device = batch["labels"].device
    dp = DPSGD(for_trainable(adapted, keys), dict(zip(keys, params)), clip_norm=1.0, noise_multiplier=1.0,
               expected_batch_size=batch["labels"].shape[0], generator=torch.Generator(device).manual_seed(2))

    def plain():
        losses(batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def private():
        dp.set_gradients(losses, [batch])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return plain, private


def opacus_step(base, rank: int, batch: dict, classification: bool):
    """Opacus' DP step with ghost clipping on the same LoRA (A, B, head trainable) built with PEFT; on a
    decoder each sequence is one privacy unit (Opacus' `shape=` for generative models)."""
    from opacus import PrivacyEngine
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=rank, lora_alpha=rank, target_modules=default_target_modules(base.config.model_type),
        modules_to_save=["classifier"] if classification else None)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    n = batch["labels"].shape[0]
    dataset = torch.utils.data.TensorDataset(batch["input_ids"], batch["attention_mask"], batch["labels"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=n)
    model, optimizer, criterion, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost", poisson_sampling=False)

    def private():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if classification:
            loss = criterion(logits, batch["labels"])
        else:  # next-token loss, averaged over each sequence's tokens
            logits = logits[:, :-1]
            loss = criterion(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                             shape=logits.shape)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return private


def bench_model(preset: str, args) -> list[dict]:
    classification = preset in CLASSIFIERS
    base = load_base(preset, classification, args.dry_run, args.device)
    batch = {k: v.to(args.device) for k, v in make_batch(base.config.vocab_size, args.batch, args.tokens,
                                                          2 if classification else None).items()}
    rows = []
    for method in ("fedit", "ffa", "fedsb"):
        plain, private = fedlora_steps(base, method, args.rank, batch, classification)
        steps = {"plain": plain, "dp": private}
        if method == "fedit":
            steps["opacus"] = opacus_step(base, args.rank, batch, classification)
        t = median_times(steps, args.repeats)
        row = {"model": preset, "device": args.device, "method": method, "plain_s": t["plain"], "dp_s": t["dp"],
               "dp_over_plain": t["dp"] / t["plain"]}
        if "opacus" in t:
            row |= {"opacus_s": t["opacus"], "opacus_over_fedlora_dp": t["opacus"] / t["dp"]}
        rows.append(row)
        print(f"{preset} {method}: {row}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_arguments(parser, models=["minilm-l6"], batch=32, tokens=128, repeats=7, out="results/dp_overhead.json",
                   choices=list(NAMES))
    args = parse_step_arguments(parser)

    rows = [row for preset in args.models for row in bench_model(preset, args)]
    print(f"\nbatch {args.batch} x {args.tokens} tokens, rank {args.rank}, {args.device} "
          f"({torch.get_num_threads()} CPU threads), median of {args.repeats}\n")
    print("| model | method | non-private step (s) | DP step (s) | DP / non-private | Opacus ghost DP step (s) "
          "| Opacus / fedlora |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        opacus = (f"{r['opacus_s']:.3f} | {r['opacus_over_fedlora_dp']:.2f}" if "opacus_s" in r else "- | -")
        print(f"| {NAMES[r['model']]} | {r['method']} | {r['plain_s']:.3f} | {r['dp_s']:.3f} | "
              f"{r['dp_over_plain']:.2f} | {opacus} |")
    write_results(args.out, {"benchmark": "B2 dp_overhead", "models": [NAMES[m] for m in args.models],
                             "batch": args.batch, "tokens": args.tokens, "rank": args.rank, "repeats": args.repeats,
                             "rows": rows})


if __name__ == "__main__":
    main()
