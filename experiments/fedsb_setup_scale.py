"""How far Fed-SB's set-up moves the pretrained model, for set-up steps eta (`fedsb.init_lr`): the default
(the reference's rule, docs/methods.md) and the values given. For each: per adapted layer
||B R0 A||_2 / ||W0||_2 (round 0's `delta_to_base`), and the cosine, averaged over the evaluation examples,
between their mean-pooled features (the encoder's output the head reads) with and without the set-up: 1 means
the set-up left the pretrained features as they were. Only round 0 runs (federation.rounds = 0). Default: the
DP recipe (examples/sst2_dp.toml) with Fed-SB at r = 32, its set-up on 256 public IMDB reviews, SST-2 dev.
Writes results/fedsb_setup_scale.json and .md.

    FEDLORA_DATA_DIR=../shared/data python experiments/fedsb_setup_scale.py [--config examples/sst2_dp.toml]
        [--init-lr 5e-3 2.5e-3 1e-3 3.1e-4 1e-5] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedlora.api import load_config
from fedlora.methods.fedsb import set_up_step
from fedlora.run_folder import ROUNDS_LOG, read_log
from fedlora.simulator import Simulator

HERE = Path(__file__).parent


def features(task, model, batch_size: int = 64) -> torch.Tensor:
    """The mean-pooled features of every evaluation example (the first position of the encoder's output, which
    model.pooling = 'mean' replaces by the masked mean)."""
    model.eval()
    rows = []
    # read where the head reads, through the whole model's forward (the pooling hooks take its attention mask)
    hook = model.base_model.register_forward_hook(
        lambda module, args, output: rows.append(output[0][:, 0].float().clone()))
    try:
        with torch.no_grad():
            for start in range(0, len(task.data.eval.labels), batch_size):
                batch = task.batch(range(start, min(start + batch_size, len(task.data.eval.labels))), task.data.eval)
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        hook.remove()
    return torch.cat(rows)


def measure(cfg, folder: Path) -> dict:
    simulator = Simulator(cfg, folder, progress=False)
    simulator.run()
    ratios = read_log(folder / ROUNDS_LOG)[0]["delta_to_base"]
    adapted, state = simulator.method.adapted, simulator.method.global_state
    adapted.load_state(state)
    moved = features(simulator.server.task, adapted.model)
    adapted.load_state({k: torch.zeros_like(v) if k.endswith("lora_R") else v for k, v in state.items()})
    pretrained = features(simulator.server.task, adapted.model)
    cosine = torch.nn.functional.cosine_similarity(moved, pretrained, dim=1)
    return {"init_lr": set_up_step(cfg), "delta_to_base_max": max(ratios.values()),
            "delta_to_base_median": statistics.median(ratios.values()),
            "largest_layer": max(ratios, key=ratios.get), "feature_cosine_mean": cosine.mean().item(),
            "feature_cosine_min": cosine.min().item(), "examples": len(cosine)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE.parent / "examples" / "sst2_dp.toml"))
    parser.add_argument("--init-lr", type=float, nargs="*", default=[5e-3, 2.5e-3, 1e-3, 3.1e-4, 1e-5],
                        help="set-up steps besides the default rule's")
    parser.add_argument("--set", action="append", default=["method.name='fedsb'", "adapter.rank=32"],
                        metavar="KEY=VALUE")
    parser.add_argument("--results", default=str(HERE.parent / "results"))
    args = parser.parse_args()
    overrides = args.set + ["federation.rounds=0"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, init_lr in enumerate([None, *args.init_lr]):
            cfg = load_config(args.config, overrides + ([f"fedsb.init_lr={init_lr}"] if init_lr else []))
            started = time.time()
            row = measure(cfg, Path(tmp) / str(k)) | {"default_rule": init_lr is None}
            rows.append(row)
            print(f"init_lr {row['init_lr']:.3g}{' (default)' if init_lr is None else ''}: ||B R0 A|| / ||W0|| "
                  f"up to {row['delta_to_base_max']:.3g} (median {row['delta_to_base_median']:.3g}), feature "
                  f"cosine {row['feature_cosine_mean']:.3f} (min {row['feature_cosine_min']:.3f}), "
                  f"{time.time() - started:.0f} s", flush=True)
    results = Path(args.results)
    config = Path(args.config).resolve()
    config = config.relative_to(HERE.parent.resolve()) if config.is_relative_to(HERE.parent.resolve()) else config
    record = {"config": str(config), "overrides": args.set, "rows": rows}
    (results / "fedsb_setup_scale.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"Fed-SB's set-up step against the pretrained model: {config} with {' '.join(args.set)}, round 0 "
             f"only; cosine of the mean-pooled features of the {rows[0]['examples']} evaluation examples with and "
             "without the set-up (`experiments/fedsb_setup_scale.py`).", "",
             "| fedsb.init_lr | max ||B R0 A|| / ||W0|| (layer) | median | feature cosine, mean (min) |",
             "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['init_lr']:.3g}{' (default rule)' if row['default_rule'] else ''} | "
                     f"{row['delta_to_base_max']:.3g} ({row['largest_layer']}) | {row['delta_to_base_median']:.3g} | "
                     f"{row['feature_cosine_mean']:.3f} ({row['feature_cosine_min']:.3f}) |")
    (results / "fedsb_setup_scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
