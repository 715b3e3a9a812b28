"""The papers' private comparison, redone with the DP recipe (experiments/dp_comparison.toml, the recipe of
examples/sst2_dp.toml): FedIT (LoRA), FFA-LoRA, Fed-SB and FedEx-LoRA on SST-2 at epsilon 1, 3 and 8, over
seeds; mean and spread of the final dev accuracy, and for each paper claim whether this run confirms it:
  FFA-LoRA beats LoRA (FedIT) under DP (FFA-LoRA paper); Fed-SB beats FFA-LoRA and FedEx-LoRA under DP (Fed-SB).
Every run is a `fedlora run` into OUT/<name>; finished runs are skipped when the script runs again, so it can
be stopped and continued. Writes results/dp_comparison.json and results/dp_comparison.md.

    FEDLORA_DATA_DIR=../shared/data python experiments/dp_comparison.py [--seeds 0 1 2] [--epsilons 1 3 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE.parent / "results"
# Fed-SB's r^2 trainable values match FFA-LoRA's and FedIT's budgets at a larger rank (as in its paper).
METHODS = {"fedit": ("FedIT (LoRA)", 8), "ffa": ("FFA-LoRA", 8), "fedsb": ("Fed-SB", 32), "fedex": ("FedEx-LoRA", 8)}
CLAIMS = [("ffa", "fedit", "FFA-LoRA beats LoRA (FedIT) under DP"), ("fedsb", "ffa", "Fed-SB beats FFA-LoRA under DP"),
          ("fedsb", "fedex", "Fed-SB beats FedEx-LoRA under DP")]


def run(out: Path, method: str, epsilon: float, seed: int) -> dict:
    name = f"{method}_eps{epsilon:g}_seed{seed}"
    folder = out / name
    if not (folder / "summary.json").is_file():
        args = [sys.executable, "-m", "fedlora.cli", "run", str(HERE / "dp_comparison.toml"), "--quiet",
                "--out", str(folder), "--resume", "--set", f"method.name='{method}'",
                "--set", f"adapter.rank={METHODS[method][1]}", "--set", f"privacy.epsilon={epsilon}",
                "--set", f"seed={seed}"]
        started = time.time()
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  {name}: failed: {(done.stderr.strip().splitlines() or [''])[-1]}", flush=True)
            return {"name": name, "error": done.stderr[-2000:]}
        print(f"  {name}: {time.time() - started:.0f} s", flush=True)
    summary = json.loads((folder / "summary.json").read_text())
    return {"name": name, "method": method, "epsilon": epsilon, "seed": seed,
            "accuracy": summary["final_eval"]["accuracy"], "epsilon_spent": summary["privacy"]["epsilon_max"]}


def table(results: list[dict], epsilons: list[float]) -> tuple[list[dict], str]:
    rows, lines = [], ["| method | " + " | ".join(f"epsilon {e:g}" for e in epsilons) + " |",
                       "|---|" + "---|" * len(epsilons)]
    for method, (label, rank) in METHODS.items():
        cells = []
        for e in epsilons:
            accs = [r["accuracy"] for r in results if r.get("method") == method and r["epsilon"] == e]
            row = {"method": method, "rank": rank, "epsilon": e, "seeds": len(accs),
                   "mean": statistics.mean(accs) if accs else None,
                   "std": statistics.pstdev(accs) if len(accs) > 1 else None}
            rows.append(row)
            cells.append("-" if not accs else f"{row['mean']:.4f}" + (f" ± {row['std']:.4f}" if row["std"] else "")
                         + f" (n={len(accs)})")
        lines.append(f"| {label}, r = {rank} | " + " | ".join(cells) + " |")
    mean = {(r["method"], r["epsilon"]): r["mean"] for r in rows}
    lines.append("")
    for better, worse, claim in CLAIMS:
        verdicts = [f"epsilon {e:g}: " + ("not run" if mean[(better, e)] is None or mean[(worse, e)] is None else
                                         ("confirmed" if mean[(better, e)] > mean[(worse, e)] else "not confirmed")
                                         + f" ({mean[(better, e)]:.4f} vs {mean[(worse, e)]:.4f})")
                    for e in epsilons]
        lines.append(f"- {claim}: " + "; ".join(verdicts))
    return rows, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="runs/dp_comparison")
    args = parser.parse_args()
    started = time.time()
    results = [r for seed in args.seeds for e in args.epsilons for m in args.methods
               for r in [run(Path(args.out), m, e, seed)] if "error" not in r]
    rows, markdown = table(results, args.epsilons)
    wall = time.time() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dp_comparison.json").write_text(json.dumps({"runs": results, "table": rows,
                                                            "wall_seconds": round(wall)}, indent=2) + "\n")
    (RESULTS / "dp_comparison.md").write_text(markdown + f"\nWall time of this invocation: {wall:.0f} s.\n")
    print(markdown)


if __name__ == "__main__":
    main()
