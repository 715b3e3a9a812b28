"""Every method at its own best learning rate: the DP recipe (examples/sst2_dp.toml) with FedIT, FFA-LoRA,
FedEx-LoRA, FedSVD and FlexLoRA at r = 8 and Fed-SB at r = 32 and 64, at epsilon 1, 3, 8 and without DP.

For each method and privacy setting, `fedlora tune` picks the learning rate (and for Fed-SB the set-up step: the
reference's rule or 1e-5) on a tenth of the SST-2 training rows held out from training; the dev split is never
read while tuning. A pick at an edge of the grid makes the grid grow past that edge, so every pick is bracketed
(or at the last rate EDGES allows). The chosen setting then runs for 3 seeds on the whole training set and is
evaluated on the dev split. The ablation runs Fed-SB without DP at its tuned rate over its set-up step (train.lr,
the reference's rule, 1e-5), set-up data (public IMDB as in the recipe, or the clients' own rows) and rank (32,
64). For the accuracy-per-byte front, each method also runs at other ranks (4 and 16 for the LoRA methods, 16 and
128 for Fed-SB), without DP and at epsilon 3, 3 seeds, at the setting tuned for its main rank (r = 8; Fed-SB r =
16 takes r = 32's, r = 128 takes r = 64's).

Every finished run's record (its summary.json and rounds.jsonl, a few kB) and every finished tuning's
tuning.json are kept in results/tuned_comparison.json. Finished runs in OUT are skipped when the script runs
again; with --keep-recorded the recorded ones are first put back into OUT, so runs made on another machine, or
in an OUT since deleted, are not repeated either and the results add up. It writes results/tuned_comparison.md
(the table, the paper claims' verdicts by twice the standard error of the difference, the other ranks, the
ablation) and results/tuned_comparison_pareto.png (accuracy against the run's bytes).

    FEDLORA_DATA_DIR=../shared/data python experiments/tuned_comparison.py [--epsilons none 3 8 1]
        [--methods ...] [--seeds 0 1 2] [--no-ablation] [--no-other-ranks] [--keep-recorded] [--report]
        [--out runs/tuned_comparison]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from dp_comparison import DEV_EXAMPLES, verdict  # noqa: E402
from fedlora.run_folder import logged_seconds  # noqa: E402

RECIPE = HERE.parent / "examples" / "sst2_dp.toml"
RESULTS = HERE.parent / "results"
RECORD = RESULTS / "tuned_comparison.json"
VARIANTS = {"fedit": ("fedit", 8, "FedIT (LoRA)"), "ffa": ("ffa", 8, "FFA-LoRA"), "fedex": ("fedex", 8, "FedEx-LoRA"),
            "fedsvd": ("fedsvd", 8, "FedSVD"), "flexlora": ("flexlora", 8, "FlexLoRA"),
            "fedsb-r32": ("fedsb", 32, "Fed-SB"), "fedsb-r64": ("fedsb", 64, "Fed-SB")}
LEARNING_RATES = "1e-3,2e-3,5e-3,1e-2,2e-2"
EDGES = {"high": [5e-2, 1e-1], "low": [5e-4, 2e-4], "": []}  # tried in turn while the pick is at an edge
FEDSB_SET_UP_STEPS = "none,1e-5"  # none: the reference's rule (the default)
# the accuracy-per-byte front's other ranks, each at the setting tuned for its variant's main rank
OTHER_RANKS = {"fedit": (4, 16), "ffa": (4, 16), "fedex": (4, 16), "fedsvd": (4, 16), "flexlora": (4, 16),
               "fedsb-r32": (16,), "fedsb-r64": (128,)}
OTHER_RANK_EPSILONS = ("none", "3")
CLAIMS = [("ffa", "fedit", "FFA-LoRA beats LoRA (FedIT) under DP"),
          ("fedsb-r32", "ffa", "Fed-SB (r = 32) beats FFA-LoRA under DP"),
          ("fedsb-r32", "fedex", "Fed-SB (r = 32) beats FedEx-LoRA under DP")]
FILES = ("summary.json", "rounds.jsonl")


def load_record() -> dict:
    return json.loads(RECORD.read_text()) if RECORD.is_file() else {"files": {}}


def restore(record: dict, out: Path) -> None:
    """Put every recorded file back under OUT (tune and the runs below then skip what is there)."""
    for relative, files in record["files"].items():
        folder = out / relative
        for name, text in files.items():
            if not (folder / name).is_file():
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(text)


def keep(record: dict, out: Path) -> None:
    """Record the small files of every finished run and every finished tuning under OUT, and write the record."""
    for summary in sorted(out.rglob("summary.json")):
        folder = summary.parent
        if (folder / "rounds.jsonl").is_file():
            record["files"][str(folder.relative_to(out))] = {name: (folder / name).read_text() for name in FILES}
    for tuning in sorted(out.glob("tune/*/tuning.json")):
        record["files"][str(tuning.parent.relative_to(out))] = {tuning.name: tuning.read_text()}
    RESULTS.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def common(variant: str, epsilon: str) -> list[str]:
    method, rank, _ = VARIANTS[variant]
    return ["--set", f"method.name='{method}'", "--set", f"adapter.rank={rank}", "--set", f"privacy.epsilon={epsilon}",
            "--set", "eval.every=0"]


def fedlora(out: Path, record: dict, *args: str) -> None:
    """`fedlora ARGS --quiet`, its final line printed, then every finished run under OUT recorded."""
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "fedlora.cli", *args, "--quiet"], capture_output=True, text=True)
    keep(record, out)
    if done.returncode != 0:
        raise SystemExit(f"fedlora {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    print(f"  {args[0]}: {done.stdout.strip()} ({time.time() - started:.0f} s)", flush=True)


def tuned(out: Path, record: dict, variant: str, epsilon: str, run: bool = True) -> dict:
    """The setting `fedlora tune` picks for the variant at this epsilon (tuning first where it is not done; the
    trials recorded before are skipped). A pick at an edge of the rates tried is not bracketed: the grid then
    grows past that edge (EDGES), and the tuning continues. `run` False: the recorded pick, nothing run."""
    folder = out / "tune" / f"{variant}_eps{epsilon}"
    rates = [float(r) for r in LEARNING_RATES.split(",")]
    while True:
        tuning = json.loads((folder / "tuning.json").read_text()) if (folder / "tuning.json").is_file() else None
        if not run:
            return tuning["best"]
        recorded = tuning["grid"]["train.lr"] if tuning else []
        if recorded[:len(rates)] == rates:  # the grid grown before (in this order: the folders are named so)
            rates = recorded
        else:
            grid = ["--grid", "train.lr=" + ",".join(f"{r:g}" for r in rates)]
            if variant.startswith("fedsb"):
                grid += ["--grid", f"fedsb.init_lr={FEDSB_SET_UP_STEPS}"]
            fedlora(out, record, "tune", str(RECIPE), *grid, *common(variant, epsilon), "--out", str(folder))
            continue
        best = float(tuning["best"]["train.lr"])
        edge = "high" if best == max(rates) else "low" if best == min(rates) else ""
        beyond = [r for r in EDGES[edge] if r not in rates]
        if not beyond:
            return tuning["best"]
        rates = rates + beyond[:1]  # appended, so the trials' folders (named by their place in the grid) stay


def final_run(out: Path, record: dict, variant: str, epsilon: str, seed: int, setting: dict, name: str | None = None,
              extra: tuple[str, ...] = ()) -> Path:
    folder = out / "runs" / (name or f"{variant}_eps{epsilon}_seed{seed}")
    if (folder / "summary.json").is_file() and not ran_with(folder, setting):  # a pick since moved
        superseded = out / "superseded" / folder.relative_to(out)
        superseded.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(superseded)
        record["files"].pop(str(folder.relative_to(out)), None)
    if not (folder / "summary.json").is_file():
        chosen = [item for key, value in setting.items() for item in ("--set", f"{key}={value}")]
        fedlora(out, record, "run", str(RECIPE), *common(variant, epsilon), *chosen, *extra, "--set", f"seed={seed}",
                "--resume", "--out", str(folder))
    return folder


def step_text(step: float | None) -> str:
    """Fed-SB's set-up step as the tables give it (None: the reference's rule)."""
    return "rule" if step is None else f"{step:g}"


def rate_text(rate: float) -> str:
    """1e-05 as 1e-5, 0.05 as 5e-2."""
    return f"{rate:.0e}".replace("e-0", "e-")


def ran_with(folder: Path, setting: dict) -> bool:
    """Whether the finished run in `folder` ran with the setting's values ({"train.lr": ..., ...})."""
    config = json.loads((folder / "summary.json").read_text())["config"]
    for key, value in setting.items():
        section, name = key.split(".")
        have = config[section][name]
        want = None if str(value).strip("'") == "none" else float(value)
        if (have is None) != (want is None) or (want is not None and not math.isclose(float(have), want)):
            return False
    return True


def run_minutes(folder: Path) -> float:
    return logged_seconds(folder) / 60


def row_of(folders: list[Path]) -> dict:
    summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
    accuracies = [s["final_eval"]["accuracy"] for s in summaries]
    config = summaries[0]["config"]
    return {"n": len(accuracies), "mean": statistics.mean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "lr": config["train"]["lr"], "init_lr": config["fedsb"]["init_lr"], "rank": config["adapter"]["rank"],
            "local_steps": config["federation"]["rounds"] * config["train"]["local_steps"],
            "trained": summaries[0].get("trained_numbers"),
            "megabytes": statistics.mean((s["bytes_up_total"] + s["bytes_down_total"]) / 1e6 for s in summaries),
            "minutes": statistics.mean(run_minutes(f) for f in folders)}


def trained_text(row: dict) -> str:
    trained = row["trained"] or {}
    return f"{trained.get('adapter', 0):,} / {trained.get('head', 0):,}"


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    spread = f" ± {row['std']:.4f}" if row["std"] is not None else ""
    return f"{row['mean']:.4f}{spread} (n={row['n']})"


def for_verdict(row: dict | None) -> dict | None:
    """dp_comparison's verdict reads mean, std and seeds (one run: the binomial error on the dev set)."""
    return None if row is None else {"mean": row["mean"], "std": row["std"] or 0.0, "seeds": row["n"]}


def tuning_table(out: Path, variants: list[str], epsilons: list[str]) -> list[str]:
    """Every tuning trial's held-out accuracy, per method and epsilon (the setting tune picked in bold)."""
    lines = []
    for epsilon in epsilons:
        for variant in variants:
            folder = out / "tune" / f"{variant}_eps{epsilon}"
            tuning = json.loads((folder / "tuning.json").read_text()) if (folder / "tuning.json").is_file() else None
            chosen = {t["folder"] for t in tuning["trials"] if t["setting"] == tuning["best"]} if tuning else set()
            cells, minutes = [], 0.0
            for summary in sorted(folder.glob("trials/*/summary.json")):
                minutes += run_minutes(summary.parent)
                config = json.loads(summary.read_text())
                label = f"lr {config['config']['train']['lr']:g}"
                if variant.startswith("fedsb"):
                    step = config["config"]["fedsb"]["init_lr"]
                    label += ", step " + step_text(step)
                text = f"{label}: {config['final_eval']['accuracy']:.4f}"
                cells.append(f"**{text}**" if str(summary.parent.relative_to(folder)) in chosen else text)
            if cells:
                state = "" if tuning else " (tuning not finished)"
                lines.append(f"| {VARIANTS[variant][2]}, r = {VARIANTS[variant][1]} | {epsilon} | {minutes:.0f} | "
                             + "; ".join(cells) + state + " |")
    if not lines:
        return []
    return ["", "Held-out accuracy of every tuning trial (a tenth of the training rows, seed 0; the chosen setting "
            "in bold) and the tuning's minutes (its trials' summed):", "", "| method | epsilon | minutes | trials |",
            "|---|---|---|---|", *lines]


def write_tables(out: Path, variants: list[str], epsilons: list[str], ablation: dict[str, list[Path]]) -> str:
    rows = {}
    for variant in variants:
        for epsilon in epsilons:
            folders = sorted((out / "runs").glob(f"{variant}_eps{epsilon}_seed*"))
            folders = [f for f in folders if (f / "summary.json").is_file()]
            rows[variant, epsilon] = row_of(folders) if folders else None
    lines = [f"Every method at the learning rate `fedlora tune` picked on held-out SST-2 training rows (grid "
             f"{LEARNING_RATES.replace(',', ', ')}, grown past an edge the pick landed on: "
             f"{', '.join(map(rate_text, EDGES['high']))} above, {', '.join(map(rate_text, EDGES['low']))} below; "
             f"Fed-SB also its set-up step: the reference's rule or 1e-5), "
             f"then the dev split ({DEV_EXAMPLES} sentences), mean ± sample std over seeds.", "",
             "| method | rank | epsilon | lr | Fed-SB set-up step | local steps | trained numbers (adapter / head) "
             "| MB per run | minutes a run | accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (variant, epsilon), row in rows.items():
        if row is None:
            continue
        step = step_text(row["init_lr"]) if variant.startswith("fedsb") else "-"
        lines.append(f"| {VARIANTS[variant][2]} | {row['rank']} | {epsilon} | {row['lr']:g} | {step} | "
                     f"{row['local_steps']} | {trained_text(row)} | {row['megabytes']:.1f} | {row['minutes']:.1f} | "
                     f"{cell(row)} |")
    if not any(rows.values()):
        lines[2:] = ["No final run yet."]
    lines += other_rank_table(out, variants, epsilons)
    lines += tuning_table(out, variants, epsilons)
    lines.append("")
    for better, worse, claim in CLAIMS:
        verdicts = [f"epsilon {e}: " + verdict(for_verdict(rows.get((better, e))), for_verdict(rows.get((worse, e))))
                    for e in epsilons if e != "none"]
        lines.append(f"- {claim}: " + "; ".join(verdicts))
    if ablation:
        lines += ["", "Fed-SB's set-up without DP, at its tuned rate (mean ± sample std over seeds; the tuned set-up's "
                  "cell is the main table's runs; the clients' set-up charges their uploads):", "",
                  "| rank | lr | set-up step | set-up data | MB per run | minutes a run | accuracy |",
                  "|---|---|---|---|---|---|---|"]
        for name, folders in ablation.items():
            done = [f for f in folders if (f / "summary.json").is_file()]
            if done:
                rank, step, data = name.split("_")[:3]
                row = row_of(done)
                step = step_text(row["init_lr"]) + (" (train.lr)" if step == "train.lr" else "")
                lines.append(f"| {rank[1:]} | {row['lr']:g} | {step} | {data} | {row['megabytes']:.1f} | "
                             f"{row['minutes']:.1f} | {cell(row)} |")
    runs = [f.parent for f in (out / "runs").rglob("summary.json")]
    trials = [f.parent for f in (out / "tune").rglob("trials/*/summary.json")]
    lines += ["", f"Wall time of what is recorded, the rounds' seconds summed: {len(runs)} runs, "
              f"{sum(map(run_minutes, runs)) / 60:.1f} h; {len(trials)} tuning trials, "
              f"{sum(map(run_minutes, trials)) / 60:.1f} h, on a 2-core CPU, most of them two at a time with one torch "
              "thread each (a run's minutes vary with what else ran beside it). Made by "
              "`FEDLORA_DATA_DIR=../shared/data .venv/bin/python experiments/tuned_comparison.py`; every finished "
              "run and tuning is recorded in results/tuned_comparison.json, and `--keep-recorded --report` rewrites "
              "these tables and the figure from that record alone."]
    markdown = "\n".join(lines) + "\n"
    (RESULTS / "tuned_comparison.md").write_text(markdown)
    finals = [f for pattern in ("*_eps*_seed*", "ranks/*_eps*_seed*") for f in sorted((out / "runs").glob(pattern))
              if (f / "summary.json").is_file()]
    if finals:
        from fedlora.plots import plot_pareto, read_run

        plot_pareto([read_run(f) for f in finals], RESULTS / "tuned_comparison_pareto.png",
                    title="SST-2, the DP recipe, each method at its tuned learning rate")
    return markdown


def other_rank_name(variant: str, rank: int, epsilon: str, seed: int | str) -> str:
    """The run folder's name under OUT/runs (seed "*": every seed's, as a glob)."""
    return f"ranks/{variant}_r{rank}_eps{epsilon}_seed{seed}"


def other_rank_runs(out: Path, record: dict, variants: list[str], epsilons: list[str], seeds: list[int]) -> None:
    """The front's other ranks: each variant's OTHER_RANKS at the setting tuned for its main rank."""
    for epsilon in [e for e in OTHER_RANK_EPSILONS if e in epsilons]:
        for variant in variants:
            setting = tuned(out, record, variant, epsilon)
            for rank in OTHER_RANKS[variant]:
                for seed in seeds:
                    name = other_rank_name(variant, rank, epsilon, seed)
                    final_run(out, record, variant, epsilon, seed, setting, name=name,
                              extra=("--set", f"adapter.rank={rank}"))


def other_rank_table(out: Path, variants: list[str], epsilons: list[str]) -> list[str]:
    lines = []
    for epsilon in [e for e in OTHER_RANK_EPSILONS if e in epsilons]:
        for variant in variants:
            for rank in OTHER_RANKS[variant]:
                folders = [f for f in sorted((out / "runs").glob(other_rank_name(variant, rank, epsilon, "*")))
                           if (f / "summary.json").is_file()]
                if folders:
                    row = row_of(folders)
                    lines.append(f"| {VARIANTS[variant][2]} | {rank} | {epsilon} | {row['lr']:g} | "
                                 f"{row['local_steps']} | {trained_text(row)} | {row['megabytes']:.1f} | "
                                 f"{row['minutes']:.1f} | {cell(row)} |")
    if not lines:
        return []
    return ["", "Other ranks, for the accuracy-per-byte front, each at the setting tuned for its method's main rank "
            "(r = 8; Fed-SB r = 16 at r = 32's, r = 128 at r = 64's):", "",
            "| method | rank | epsilon | lr | local steps | trained numbers (adapter / head) | MB per run | "
            "minutes a run | accuracy |", "|---|---|---|---|---|---|---|---|---|", *lines]


def ablation_runs(out: Path, record: dict, seeds: list[int], run: bool = True) -> dict[str, list[Path]]:
    """Fed-SB without DP: set-up step x set-up data x rank, at the rate tuned for that rank. The cell that is
    the tuned setting itself is the main runs. `run` False: only the folders there are (for --report)."""
    runs = {}
    for rank in (32, 64):
        variant = f"fedsb-r{rank}"
        if not run and not (out / "tune" / f"{variant}_epsnone" / "tuning.json").is_file():
            continue
        best = tuned(out, record, variant, "none", run)
        lr = float(best["train.lr"])
        step_chosen = best.get("fedsb.init_lr")
        step_chosen = "rule" if str(step_chosen) in ("None", "none") else rate_text(float(step_chosen))
        for step_name, step in (("train.lr", f"{lr:g}"), ("rule", "'none'"), ("1e-5", "1e-5")):
            for data_name, data in (("public-imdb", ()), ("clients-dense", (
                    "--set", "fedsb.init_data='clients'", "--set", "fedsb.init='dense'"))):
                name = f"r{rank}_{step_name}_{data_name}"
                if data_name == "public-imdb" and step_name == step_chosen:
                    runs[name] = [out / "runs" / f"{variant}_epsnone_seed{seed}" for seed in seeds]
                elif run:
                    runs[name] = [final_run(out, record, variant, "none", seed, {"train.lr": lr, "fedsb.init_lr": step},
                                            name=f"ablation/{name}_seed{seed}", extra=data) for seed in seeds]
                else:
                    runs[name] = [out / "runs" / "ablation" / f"{name}_seed{seed}" for seed in seeds]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epsilons", nargs="+", default=["none", "3", "8", "1"])
    parser.add_argument("--methods", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--no-other-ranks", action="store_true", help="skip the front's other ranks")
    parser.add_argument("--report", action="store_true",
                        help="only write the tables from the runs there are (with --keep-recorded: the recorded)")
    parser.add_argument("--keep-recorded", action="store_true",
                        help="put the runs results/tuned_comparison.json holds back into OUT first (not repeated)")
    parser.add_argument("--out", default="runs/tuned_comparison")
    args = parser.parse_args()
    out = Path(args.out)
    record = load_record() if args.keep_recorded else {"files": {}}
    restore(record, out)
    started = time.time()
    if args.report:
        if args.keep_recorded:  # tunings finished under OUT since the record was written
            keep(record, out)
        print(write_tables(out, args.methods, args.epsilons, ablation_runs(out, record, args.seeds, run=False)))
        return
    try:
        for epsilon in args.epsilons:
            for variant in args.methods:
                print(f"{variant}, epsilon {epsilon}:", flush=True)
                setting = tuned(out, record, variant, epsilon)
                for seed in args.seeds:
                    final_run(out, record, variant, epsilon, seed, setting)
        if not args.no_other_ranks:
            other_rank_runs(out, record, args.methods, args.epsilons, args.seeds)
        ablation = {} if args.no_ablation else ablation_runs(out, record, args.seeds)
    finally:
        keep(record, out)
    print(write_tables(out, args.methods, args.epsilons, ablation))
    print(f"Wall time of this invocation: {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
