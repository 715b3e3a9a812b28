"""Fed-SB's set-up exchange variants in the reproduction's SST-2 setting (experiments/reproduce_sst2.toml:
3 IID clients, all-MiniLM-L6-v2, Fed-SB r = 32 at the reproduction's tuned learning rate, no DP), 3 seeds:
round-0 bytes up and down, final accuracy, and accuracy at equal total bytes (within the bytes, up and down,
of a whole run of the default variant, sign_sketch: each run's last evaluation whose bytes so far stay within
them; "-" where the set-up alone sends more). Every variant takes the default set-up step (the reference's rule,
docs/methods.md); former_step is sign_sketch with the step fedlora took before, eta = train.lr.

Every run is a `fedlora run` into OUT/<name>; finished runs are kept and skipped when the script runs
again. Writes results/fedsb_init.json and results/fedsb_init.md.

    FEDLORA_DATA_DIR=../shared/data python experiments/fedsb_init.py [--seeds 0 1 2] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from reproduce import run_all  # noqa: E402

from fedlora.plots import read_run  # noqa: E402
from fedlora.run_folder import ROUNDS_LOG, read_log  # noqa: E402

VARIANTS = {"dense": ["fedsb.init='dense'"], "sketch": ["fedsb.init='sketch'"],
            "sign_sketch": ["fedsb.init='sign_sketch'"], "signs": ["fedsb.init='signs'"],
            "public": ["fedsb.init='sign_sketch'", "fedsb.init_data='public'"]}
RANK = 32
# the default variant with the set-up step eta = train.lr, fedlora's default before the reference's rule
FORMER_STEP = "former_step"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (threads are shared among them)")
    parser.add_argument("--out", default="runs/fedsb_init")
    parser.add_argument("--results", default="results")
    args = parser.parse_args()
    out, results_dir = Path(args.out), Path(args.results)
    lr = json.loads((results_dir / "reproduce.json").read_text())["learning_rates"]["fedsb"]

    variants = VARIANTS | {FORMER_STEP: ["fedsb.init='sign_sketch'", f"fedsb.init_lr={lr}"]}
    jobs = [(f"{variant}_s{seed}", "sst2", ["method.name='fedsb'", f"adapter.rank={RANK}", f"train.lr={lr}",
                                            f"seed={seed}", "eval.every=1"] + settings)
            for variant, settings in variants.items() for seed in args.seeds]
    results = run_all(jobs, out, args.jobs)
    failed = {name: r["error"] for name, r in results.items() if "error" in r}
    runs = {name: read_run(out / name) for name, r in results.items() if "accuracy" in r}
    # the default variant's whole run: what the others reach with the same traffic ("-": their set-up alone is more)
    budget = max(run.total_bytes[-1] for name, run in runs.items() if name.startswith("sign_sketch_"))

    rows = []
    for variant in variants:
        mine = [runs[f"{variant}_s{seed}"] for seed in args.seeds if f"{variant}_s{seed}" in runs]
        if not mine:
            continue
        setup = read_log(mine[0].path / ROUNDS_LOG)[0]  # round 0: the same bytes for every seed
        within = [next((a for a, b in reversed(list(zip(run.values["accuracy"], run.total_bytes))) if b <= budget),
                       None) for run in mine]
        finals = [run.values["accuracy"][-1] for run in mine]
        rows.append({"variant": variant, "seeds": len(mine),
                     "round0_bytes_up": setup["bytes_up"], "round0_bytes_down": setup["bytes_down"],
                     "total_bytes": mine[0].total_bytes[-1],
                     "accuracy_mean": statistics.mean(finals), "accuracy_std": statistics.pstdev(finals),
                     "accuracy_at_budget": None if None in within else statistics.mean(within),
                     "accuracy_at_budget_std": None if None in within else statistics.pstdev(within),
                     "runs": [str(run.path) for run in mine]})

    def pm(mean, std):
        return "-" if mean is None else f"{mean:.4f} ± {std:.4f}"

    lines = [f"Fed-SB r = {RANK}, lr {lr:g}, the reproduction's SST-2 setting; mean ± std over seeds {args.seeds}; "
             f"accuracy on the GLUE dev split (500 examples). Equal bytes: within {budget:,} bytes up and down, a whole "
             f"run of the default, sign_sketch (-: the set-up alone sends more).", "",
             "| `fedsb.init` | round 0 bytes up / down | total bytes | final accuracy | accuracy within the budget |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['round0_bytes_up']:,} / {r['round0_bytes_down']:,} | {r['total_bytes']:,} | "
              f"{pm(r['accuracy_mean'], r['accuracy_std'])} | {pm(r['accuracy_at_budget'], r['accuracy_at_budget_std'])} |"
              for r in rows]
    markdown = "\n".join(lines) + "\n"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "fedsb_init.md").write_text(markdown)
    (results_dir / "fedsb_init.json").write_text(json.dumps(
        {"rank": RANK, "lr": lr, "seeds": args.seeds, "budget_bytes": budget, "rows": rows, "failed": failed},
        indent=2))
    print("\n" + markdown)
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
