"""Reproduce, at this machine's scale, the qualitative claims of the FFA-LoRA and Fed-SB papers on SST-2
and RTE with all-MiniLM-L6-v2 (3 clients; experiments/reproduce_{sst2,rte}.toml hold the setting).

1. tune:  the learning rate of FedIT, FFA-LoRA and Fed-SB (r=32), from a small grid, on 10% of SST-2's
          training data held out (data.holdout_fraction; no DP, IID, seed 0); FedEx-LoRA and FLoRA take
          FedIT's. The GLUE dev split, our test set, is not looked at.
2. (a)    FFA-LoRA vs LoRA (FedIT), rank 8: IID, Dirichlet(0.5), and the FFA-LoRA paper's label-proportion
          split [0.1, 0.9] / [0.9, 0.1] / [0.5, 0.5]; and under DP (IID) with epsilon 6, 3, 1.
3. (b)    Fed-SB r = 16, 32, 64 vs FedIT, FFA-LoRA, FedEx-LoRA, FLoRA (rank 8): accuracy against total
          communication, without DP and with epsilon = 3 (Fed-SB's subspace from public IMDB text under DP);
          with them FlexLoRA and HetLoRA (rank 8, FedIT's learning rate), and a federation of clients of ranks
          4, 8 and 16 (one each, adapter.client_ranks) under FedIT (zero-padded), FLoRA, FlexLoRA and HetLoRA.
DP runs (SST-2 only) take the same examples per round in batches of 64 x 2 steps instead of 16 x 8: the noise
is added once per step and divided by the batch size, so larger batches carry more signal per unit of noise.

Every run is a `fedlora run` into OUT/<name>; finished runs are kept and skipped when the script runs
again. Writes results/reproduce.json, results/reproduce.md (the tables) and results/reproduce_*.png.

    FEDLORA_DATA_DIR=../shared/data python experiments/reproduce.py [--seeds 0 1 2] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
LR_GRID = {"fedit": [3e-4, 1e-3, 3e-3], "ffa": [1e-3, 3e-3, 1e-2, 3e-2], "fedsb": [3e-4, 1e-3, 3e-3, 1e-2],
           "fedsvd": [1e-3, 3e-3, 1e-2, 3e-2], "rolora": [3e-4, 1e-3, 3e-3, 1e-2]}
# FedEx-LoRA and FLoRA train the same factors with the same local loop as FedIT and differ only in how the
# server combines them, so they take FedIT's tuned rate.
SAME_LR_AS = {"fedex": "fedit", "flora": "fedit", "flexlora": "fedit", "hetlora": "fedit"}
SPLITS = {"iid": [], "dirichlet": ["data.partition='dirichlet'", "data.dirichlet_alpha=0.5"],
          "label_proportion": ["data.partition='label_proportion'"]}
EPSILONS = [6.0, 3.0, 1.0]
PRIVATE_DATASETS = ["sst2"]  # the DP runs, on SST-2 only: this machine's time allows no more
PARETO = [("fedit", 8), ("ffa", 8), ("fedex", 8), ("flora", 8), ("fedsb", 16), ("fedsb", 32), ("fedsb", 64),
          ("fedsvd", 8), ("rolora", 8), ("flexlora", 8), ("hetlora", 8),
          # clients of different ranks: one client each of rank 4, 8 and 16 (adapter.client_ranks)
          ("fedit", "4-8-16"), ("flora", "4-8-16"), ("flexlora", "4-8-16"), ("hetlora", "4-8-16")]
DP_BATCH = 64  # under DP: batch 64 and 2 local steps instead of 16 and 8
NAMES = {"fedit": "FedIT (LoRA)", "ffa": "FFA-LoRA", "fedsb": "Fed-SB", "fedex": "FedEx-LoRA", "flora": "FLoRA",
         "fedsvd": "FedSVD", "rolora": "RoLoRA", "flexlora": "FlexLoRA", "hetlora": "HetLoRA"}


def run(out: Path, name: str, dataset: str, overrides: list[str], threads: int, report_only: bool = False) -> dict:
    """One `fedlora run`, or the summary of the one already finished in out/name."""
    folder = out / name
    if not (folder / "summary.json").is_file():
        if report_only:
            return {"name": name, "missing": True}
        folder.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "fedlora.cli", "run", str(HERE / f"reproduce_{dataset}.toml"), "--quiet",
                "--out", str(folder), "--resume"] + [a for o in overrides for a in ("--set", o)]
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        done = subprocess.run(args, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"  {name}: failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}",
                  flush=True)
            return {"name": name, "error": done.stderr[-2000:]}
    summary = json.loads((folder / "summary.json").read_text())
    result = {"name": name, "dir": str(folder), "accuracy": summary["final_eval"]["accuracy"],
              "bytes": summary["bytes_up_total"] + summary["bytes_down_total"],
              "epsilon": (summary["privacy"] or {}).get("epsilon_max")}
    print(f"  {name}: accuracy {result['accuracy']:.4f}", flush=True)
    return result


def run_all(jobs: list[tuple[str, str, list[str]]], out: Path, workers: int, report_only: bool = False) -> dict[str, dict]:
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda job: run(out, job[0], job[1], job[2], threads, report_only), jobs)
    return {r["name"]: r for r in results}


def method_settings(method: str, rank: int | str, lr: float) -> list[str]:
    """A rank such as "4-8-16" gives the clients those ranks, in order (adapter.client_ranks)."""
    if isinstance(rank, str):
        ranks = [int(r) for r in rank.split("-")]
        return [f"method.name='{method}'", f"adapter.rank={max(ranks)}", f"adapter.client_ranks={ranks}",
                f"train.lr={lr}"]
    return [f"method.name='{method}'", f"adapter.rank={rank}", f"train.lr={lr}"]


def privacy_settings(method: str, epsilon: float | None) -> list[str]:
    if epsilon is None:
        return []
    extra = ["fedsb.init_data='public'"] if method == "fedsb" else []
    # the same examples per round in 4x larger batches: DP noise is added once per step and divided by the batch
    return [f"privacy.epsilon={epsilon}", f"train.batch_size={DP_BATCH}", "train.local_steps=2"] + extra


def tune(out: Path, workers: int, report_only: bool = False) -> dict[str, float]:
    jobs = [(f"tune/{m}_lr{lr:g}", "sst2", method_settings(m, 32 if m == "fedsb" else 8, lr)
             + ["data.holdout_fraction=0.1", "eval.every=0", "eval.max_examples=600"])
            for m, grid in LR_GRID.items() for lr in grid]
    results = run_all(jobs, out, workers, report_only)
    chosen = {}
    for m, grid in LR_GRID.items():
        scores = {lr: results[f"tune/{m}_lr{lr:g}"].get("accuracy", -1) for lr in grid}
        chosen[m] = max(grid, key=lambda lr: scores[lr])
        print(f"{m}: held-out accuracy " + ", ".join(f"lr {lr:g}: {s:.4f}" for lr, s in scores.items())
              + f" -> {chosen[m]:g}")
    return chosen | {m: chosen[same] for m, same in SAME_LR_AS.items()}


def experiment_jobs(datasets: list[str], seeds: list[int], lr: dict[str, float]) -> list[tuple[str, str, list[str], dict]]:
    """(run name, dataset, overrides, description) for parts (a) and (b); a run both parts need is listed once."""
    jobs = {}

    def add(dataset, seed, method, rank, split, epsilon, part):
        name = (f"{dataset}/{method}_r{rank}_lr{lr[method]:g}_{split}_"
                f"eps{'inf' if epsilon is None else f'{epsilon:g}'}_s{seed}")
        if name not in jobs:
            overrides = (method_settings(method, rank, lr[method]) + SPLITS[split] + privacy_settings(method, epsilon)
                         + [f"seed={seed}"])
            jobs[name] = (name, dataset, overrides, {"dataset": dataset, "method": method, "rank": rank,
                                                     "split": split, "epsilon": epsilon, "seed": seed, "parts": []})
        jobs[name][3]["parts"].append(part)

    for dataset in datasets:
        private = dataset in PRIVATE_DATASETS
        for seed in seeds:
            for method in ("fedit", "ffa"):
                for split in SPLITS:
                    add(dataset, seed, method, 8, split, None, "a")
                for eps in EPSILONS if private else []:
                    add(dataset, seed, method, 8, "iid", eps, "a")
            for method, rank in PARETO:
                for eps in (None, 3.0) if private else (None,):
                    add(dataset, seed, method, rank, "iid", eps, "b")
    return list(jobs.values())


def label(d: dict) -> str:
    return f"{NAMES[d['method']]} r={d['rank']}"


def summarise(jobs, results: dict[str, dict]) -> list[dict]:
    """Mean and spread over seeds of every setting."""
    groups: dict[tuple, list[dict]] = {}
    for name, _, _, d in jobs:
        key = (d["dataset"], d["method"], d["rank"], d["split"], d["epsilon"])
        if "accuracy" in results.get(name, {}):
            groups.setdefault(key, []).append(results[name] | {"parts": d["parts"]})
    rows = []
    for (dataset, method, rank, split, eps), members in groups.items():
        accs = [m["accuracy"] for m in members]
        rows.append({"dataset": dataset, "method": method, "rank": rank, "split": split,
                     "epsilon_target": eps, "parts": members[0]["parts"], "seeds": len(accs),
                     "accuracy_mean": statistics.mean(accs), "accuracy_std": statistics.pstdev(accs),
                     "total_bytes": statistics.mean(m["bytes"] for m in members),
                     "epsilon_spent": max((m["epsilon"] or 0) for m in members) or None,
                     "runs": [m["dir"] for m in members]})
    return rows


def tables(rows: list[dict], lr: dict[str, float], seeds: list[int]) -> str:
    def acc(r):
        return f"{r['accuracy_mean']:.4f}" + (f" ± {r['accuracy_std']:.4f}" if r["seeds"] > 1 else "")

    def find(dataset, method, rank, split, eps):
        return next((r for r in rows if (r["dataset"], r["method"], r["rank"], r["split"], r["epsilon_target"])
                     == (dataset, method, rank, split, eps)), None)

    seed_note = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines = [f"Final accuracy on the GLUE dev split ({seed_note}); learning rates tuned on held-out training "
             f"data: " + ", ".join(f"{NAMES[m]} {v:g}" for m, v in lr.items()) + ".", ""]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    lines += ["(a) FFA-LoRA vs LoRA (FedIT), rank 8, by data split and privacy budget (IID under DP)", "",
              "| data | method | IID | Dirichlet(0.5) | label proportions | eps=6 | eps=3 | eps=1 |",
              "|---|---|---|---|---|---|---|---|"]
    for dataset in datasets:
        for method in ("fedit", "ffa"):
            cells = [find(dataset, method, 8, s, None) for s in SPLITS] + [find(dataset, method, 8, "iid", e)
                                                                           for e in EPSILONS]
            lines.append(f"| {dataset} | {NAMES[method]} | " + " | ".join(acc(c) if c else "-" for c in cells) + " |")
    lines += ["", "(b) Accuracy against communication (IID): total MB exchanged by all clients over the run, "
              "set-up included", "",
              "| data | method | accuracy, no DP | MB, no DP | accuracy, eps=3 | MB, eps=3 |", "|---|---|---|---|---|---|"]
    for dataset in datasets:
        for method, rank in PARETO:
            plain, private = find(dataset, method, rank, "iid", None), find(dataset, method, rank, "iid", 3.0)
            lines.append(f"| {dataset} | {label({'method': method, 'rank': rank})} | "
                         + " | ".join(f"{acc(c)} | {c['total_bytes'] / 1e6:,.1f}" if c else "- | -"
                                      for c in (plain, private)) + " |")
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], results_dir: Path) -> list[str]:
    from fedlora.plots import plot_pareto, plot_runs, read_run

    written = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        figures = {
            "splits": [(r, f"{label(r)}, {r['split']}") for r in mine
                       if "a" in r["parts"] and r["epsilon_target"] is None],
            "privacy": [(r, label(r)) for r in mine if "a" in r["parts"] and r["split"] == "iid"]
            if any(r["epsilon_target"] is not None for r in mine) else [],
            "pareto": [(r, label(r)) for r in mine if "b" in r["parts"]],
        }
        for figure, chosen in figures.items():
            runs = [read_run(run, name) for r, name in chosen for run in r["runs"]]
            if runs:
                out = results_dir / f"reproduce_{dataset}_{figure}.png"
                plot = plot_pareto if figure == "pareto" else plot_runs  # the front: one marker per method and rank
                plot(runs, out, title=f"{dataset.upper()}, all-MiniLM-L6-v2, 3 clients: {figure}")
                written.append(str(out))
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "rte"], choices=["sst2", "rte"])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (threads are shared among them)")
    parser.add_argument("--out", default="runs/reproduce")
    parser.add_argument("--results", default="results")
    parser.add_argument("--tune-only", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: tables and plots from the runs already finished (others show as '-')")
    args = parser.parse_args()
    out, results_dir = Path(args.out), Path(args.results)

    print("tuning learning rates on held-out SST-2 training data", flush=True)
    lr = tune(out, args.jobs, args.report_only)
    if args.tune_only:
        return
    jobs = experiment_jobs(args.datasets, args.seeds, lr)
    print(f"{len(jobs)} runs", flush=True)
    results = run_all([job[:3] for job in jobs], out, args.jobs, args.report_only)
    rows = summarise(jobs, results)
    failed = {name: r["error"] for name, r in results.items() if "error" in r}
    results_dir.mkdir(parents=True, exist_ok=True)
    markdown = tables(rows, lr, args.seeds)
    (results_dir / "reproduce.md").write_text(markdown)
    figures = plots(rows, results_dir)
    (results_dir / "reproduce.json").write_text(json.dumps(
        {"learning_rates": lr, "lr_grid": LR_GRID, "seeds": args.seeds, "rows": rows, "failed": failed,
         "figures": figures}, indent=2, default=lambda x: None if isinstance(x, float) and math.isinf(x) else x))
    missing = [name for name, r in results.items() if r.get("missing")]
    if missing:
        markdown += f"\nNot run in this report ({len(missing)}): " + ", ".join(missing) + "\n"
        (results_dir / "reproduce.md").write_text(markdown)
    print("\n" + markdown)
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
