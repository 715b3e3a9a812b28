"""The papers' private comparison, redone with the DP recipe (examples/sst2_dp.toml): FedIT (LoRA), FFA-LoRA,
Fed-SB and FedEx-LoRA (and the newer methods) on SST-2 at epsilon 1, 3 and 8 and without DP, over seeds; mean
and spread of the final dev accuracy, and for each paper claim whether this run confirms it:
  FFA-LoRA beats LoRA (FedIT) under DP (FFA-LoRA paper); Fed-SB beats FFA-LoRA and FedEx-LoRA under DP (Fed-SB).
With --client-ranks the methods that take clients of different ranks (FlexLoRA, HetLoRA, FLoRA, FedIT
zero-padded) run with those ranks, one per client (adapter.client_ranks; adapter.rank is the largest).
With --unit client the comparison is the client-level DP recipe's (examples/sst2_user_dp.toml: thousands of
clients, Poisson cohorts, DP-FedAvg), FedIT, FFA-LoRA and Fed-SB by default, each row also with the numbers a
client trains and the noise added to the average against the average update's norm (the mean over rounds);
--mechanism distributed runs the methods with distributed DP (the clients noise their updates in the integers
of the secure sum; named e.g. fedsb+distributed) and sets each beside the same method under central DP;
--fixed-clip S clips every update to S (privacy.clipping = 'fixed', which distributed DP needs; named e.g.
fedsb+clip3); --tune first picks each method's learning rate with `fedlora tune` on held-out training rows
at the recipe's epsilon (8; the dev split is never read while tuning) over CLIENT_LEVEL_GRIDS and
TUNING_SEEDS seeds (a tuning short of a rate or a seed is continued, its finished trials kept), runs every
epsilon at that rate, and judges the paper claims on those rows.
Every run is a `fedlora run` into OUT/<name>; finished runs are skipped when the script runs again, so it can
be stopped and continued, and the tables show every finished run in OUT with its accuracy and the megabytes
all clients exchanged. With --keep-recorded the runs the results file already holds count too and are not
repeated, so runs made on several machines, or in an OUT since deleted, add up. Writes
results/dp_comparison.json and .md (with --unit client, results/user_dp_comparison.json and .md).

    FEDLORA_DATA_DIR=../shared/data python experiments/dp_comparison.py [--seeds 0 1 2] [--epsilons 1 3 8 none]
        [--methods ...] [--client-ranks 4 16] [--unit client [--fixed-clip S] [--mechanism distributed]]
        [--lr METHOD=LR ...] [--unit client --tune]
        [--keep-recorded] [--report]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
RECIPES = {"example": HERE.parent / "examples" / "sst2_dp.toml", "client": HERE.parent / "examples" / "sst2_user_dp.toml"}
RESULTS = HERE.parent / "results"
# Fed-SB's r^2 trainable values match FFA-LoRA's and FedIT's budgets at a larger rank (as in its paper). Under
# client-level DP the noise lands on every trained number, so the client-level recipe keeps Fed-SB at its r = 16.
CLIENT_LEVEL_RANKS = {"fedsb": 16}
METHODS = {"fedit": ("FedIT (LoRA)", 8), "ffa": ("FFA-LoRA", 8), "fedsb": ("Fed-SB", 32), "fedex": ("FedEx-LoRA", 8),
           "fedsvd": ("FedSVD", 8), "rolora": ("RoLoRA", 8), "flexlora": ("FlexLoRA", 8), "hetlora": ("HetLoRA", 8),
           "flora": ("FLoRA", 8)}
CLAIMS = [("ffa", "fedit", "FFA-LoRA beats LoRA (FedIT) under DP"), ("fedsb", "ffa", "Fed-SB beats FFA-LoRA under DP"),
          ("fedsb", "fedex", "Fed-SB beats FedEx-LoRA under DP")]
# FedEx-LoRA's server rule is not a sum of uploads, so client-level DP refuses it; the Fed-SB paper's other baseline
CLIENT_LEVEL_CLAIMS = CLAIMS[:2] + [("fedsb", "fedit", "Fed-SB beats LoRA (FedIT) under DP")]
# Each grid brackets the rate picked: it began with three rates around those that learned in the recipe's first
# runs, and grew by one where the best came out at an edge (a rate added last, since a trial's folder is named
# by its place in the grid and the finished trials are kept).
CLIENT_LEVEL_GRIDS = {"fedit": "1e-3,3e-3,1e-2,3e-2", "ffa": "1e-2,3e-2,1e-1,3e-1,3e-3", "fedsb": "1e-2,3e-2,1e-1"}
# A pick on one seed can sit at the edge of divergence (FFA-LoRA's 1e-1 held out on seed 0, diverged on dev);
# the mean over two seeds is what the rate is picked by.
TUNING_SEEDS = 2
NO_DP = math.inf  # the recipe without DP (--set privacy.epsilon=none)
DEV_EXAMPLES = 872  # SST-2's dev split


def epsilon_name(epsilon: float) -> str:
    return "none" if epsilon == NO_DP else f"{epsilon:g}"


def rank_of(method: str, unit: str) -> int:
    return CLIENT_LEVEL_RANKS.get(method, METHODS[method][1]) if unit == "client" else METHODS[method][1]


def recorded(path: Path) -> list[dict]:
    """The runs a results file already holds (epsilon back to a number)."""
    if not path.is_file():
        return []
    return [r | {"epsilon": NO_DP if r["epsilon"] == "none" else float(r["epsilon"])}
            for r in json.loads(path.read_text())["runs"]]


def run(out: Path, method: str, epsilon: float, seed: int, client_ranks: list[int] | None = None,
        unit: str = "example", lr: float | None = None, done_before: frozenset = frozenset(),
        mechanism: str = "central", fixed_clip: float | None = None) -> dict:
    """One run of the recipe; with client_ranks, the clients hold those ranks (named e.g. flexlora-r4-16)."""
    variant = method if client_ranks is None else f"{method}-r{'-'.join(map(str, client_ranks))}"
    variant += f"@lr{lr:g}" if lr is not None else ""
    variant += f"+clip{fixed_clip:g}" if fixed_clip is not None else ""
    variant += "+distributed" if mechanism == "distributed" else ""
    name = f"{variant}_eps{epsilon_name(epsilon)}_seed{seed}"
    folder = out / name
    ranks = ["--set", f"adapter.rank={rank_of(method, unit)}"] if client_ranks is None else [
        "--set", f"adapter.rank={max(client_ranks)}", "--set", f"adapter.client_ranks={client_ranks}"]
    if lr is not None:
        ranks += ["--set", f"train.lr={lr}"]
    if fixed_clip is not None and epsilon != NO_DP:
        ranks += ["--set", "privacy.clipping='fixed'", "--set", f"privacy.client_clip={fixed_clip}"]
    if mechanism == "distributed" and epsilon != NO_DP:
        ranks += ["--set", "privacy.mechanism='distributed'"]
    if name not in done_before and not (folder / "summary.json").is_file():
        args = [sys.executable, "-m", "fedlora.cli", "run", str(RECIPES[unit]), "--quiet", "--out", str(folder),
                "--resume", "--set", f"method.name='{method}'", *ranks,
                "--set", f"privacy.epsilon={epsilon_name(epsilon)}", "--set", f"seed={seed}", "--set", "eval.every=0"]
        started = time.time()
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  {name}: failed: {(done.stderr.strip().splitlines() or [''])[-1]}", flush=True)
            return {"name": name, "error": done.stderr[-2000:]}
        print(f"  {name}: {time.time() - started:.0f} s", flush=True)
    return {"name": name}


def method_tuning(out: Path, method: str, unit: str, recorded_tuning: dict, report: bool) -> dict:
    """The method's `fedlora tune` record (its pick: ["best"]["train.lr"]) on held-out training rows at the
    recipe's epsilon (tuning first, unless `report`, where neither OUT nor the results file holds a tuning of
    every rate of CLIENT_LEVEL_GRIDS over TUNING_SEEDS seeds; finished trials are skipped)."""
    path = out / "tune" / method / "tuning.json"
    tuning = json.loads(path.read_text()) if path.is_file() else None
    recorded = recorded_tuning.get(method)
    if recorded and len(recorded["trials"]) > len(tuning["trials"] if tuning else []):
        tuning = recorded
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(tuning, indent=2) + "\n")
    if not tuning_complete(tuning, method) and not report:
        args = [sys.executable, "-m", "fedlora.cli", "tune", str(RECIPES[unit]), "--quiet", "--out", str(path.parent),
                "--seeds", str(TUNING_SEEDS),
                "--grid", f"train.lr={CLIENT_LEVEL_GRIDS[method]}", "--set", f"method.name='{method}'",
                "--set", f"adapter.rank={rank_of(method, unit)}", "--set", "eval.every=0"]
        started = time.time()
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"tuning {method} failed: {done.stderr.strip()[-2000:]}")
        print(f"  tune {method}: {done.stdout.strip()} ({time.time() - started:.0f} s)", flush=True)
    return json.loads(path.read_text())


def tuning_complete(tuning: dict | None, method: str) -> bool:
    """Whether a tuning ran every rate of the method's grid for TUNING_SEEDS seeds."""
    trials = Counter(float(t["setting"]["train.lr"]) for t in (tuning or {}).get("trials", []))
    return all(trials[float(lr)] >= TUNING_SEEDS for lr in CLIENT_LEVEL_GRIDS[method].split(","))


def tuning_lines(tunings: dict) -> list[str]:
    """Every setting's held-out accuracy (mean ± sample std over the tuning's seeds), the rate picked in bold."""
    lines = []
    for method, tuning in tunings.items():
        scores = sorted(tuning["scores"], key=lambda score: float(score["setting"]["train.lr"]))
        cells = []
        for score in scores:
            cell = f"{score['setting']['train.lr']:g}: {score['mean']:.4f}" + (
                f" ± {score['std']:.4f}" if score["std"] is not None else "")
            cells.append(f"**{cell}**" if score["setting"] == tuning["best"] else cell)
        seeds = sorted({t["seed"] for t in tuning["trials"]})
        minutes = sum(t["seconds"] for t in tuning["trials"]) / 60
        lines.append(f"- {METHODS[method][0]}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}: "
                     f"{', '.join(cells)} ({minutes:.0f} min of trials)")
    if not lines:
        return []
    return ["", "Learning rates picked by `fedlora tune` on a tenth of the training rows held out (epsilon 8, "
                "accuracy at the last round, mean ± sample std over the seeds; the dev split never read), used at "
                "every epsilon:", *lines]


def finished(out: Path) -> list[dict]:
    """Every finished run in `out`, read from its summary."""
    runs = []
    for path in sorted(out.glob("*_eps*_seed*/summary.json")):
        method, rest = path.parent.name.split("_eps")
        epsilon, seed = rest.split("_seed")
        summary = json.loads(path.read_text())
        privacy = summary["privacy"] or {}
        rows = [json.loads(line) for line in (path.parent / "rounds.jsonl").read_text().splitlines()[1:]]
        ratios = [r["noise_norm"] / r["update_norm"] for r in rows if r.get("update_norm")]
        runs.append({"name": path.parent.name, "method": method, "seed": int(seed),
                     "epsilon": NO_DP if epsilon == "none" else float(epsilon),
                     "accuracy": summary["final_eval"]["accuracy"],
                     "megabytes": (summary["bytes_up_total"] + summary["bytes_down_total"]) / 1e6,
                     "epsilon_spent": privacy.get("epsilon_max", privacy.get("epsilon")),
                     # what one client trains, adapter and head apart (older runs: what it sends a round, float32)
                     "trained_numbers": summary.get("trained_numbers") or {"total": next(
                         (r["bytes_up"] // 4 // len(r["clients"]) for r in rows if r["clients"]), None)},
                     "lr": summary["config"]["train"]["lr"],
                     "noise_to_update": statistics.mean(ratios) if ratios else None})
    return runs


def standard_error(row: dict) -> float:
    """Of a row's mean accuracy: over its seeds, or for one run the binomial error on the dev set."""
    if row["seeds"] > 1:
        return row["std"] / math.sqrt(row["seeds"])
    return math.sqrt(row["mean"] * (1 - row["mean"]) / DEV_EXAMPLES)


def verdict(better: dict | None, worse: dict | None) -> str:
    """Whether `better` beats `worse` by more than twice the standard error of the difference."""
    if better is None or worse is None or better["mean"] is None or worse["mean"] is None:
        return "not run"
    difference = better["mean"] - worse["mean"]
    error = math.hypot(standard_error(better), standard_error(worse))
    outcome = ("confirmed" if difference > 2 * error else "contradicted" if difference < -2 * error
               else "not shown (within twice the standard error)")
    return f"{outcome} ({better['mean']:.4f} vs {worse['mean']:.4f}, difference {difference:+.4f} ± {error:.4f})"


def variant_label(method: str, unit: str) -> tuple[str, str]:
    """("FlexLoRA", "r = 4/16") for flexlora-r4-16, ("FedIT (LoRA)", "r = 8") for fedit (and fedit@lr0.003),
    ("Fed-SB, clip 3, distributed DP", "r = 16") for fedsb+clip3+distributed."""
    name, *tags = method.split("+")
    name, _, ranks = name.split("@")[0].partition("-r")
    label = ", ".join([METHODS[name][0]] + [f"clip {t[4:]}" if t.startswith("clip") else f"{t} DP" for t in tags])
    return label, f"r = {ranks.replace('-', '/')}" if ranks else f"r = {rank_of(name, unit)}"


def trained(numbers: dict) -> str:
    if "adapter" in numbers:
        return f"{numbers['adapter']:,} / {numbers['head']:,}"
    return f"{numbers['total']:,} (both)"


def table(results: list[dict], unit: str, chosen: dict[str, str] | None = None) -> tuple[list[dict], str]:
    """The table and the claims' verdicts; `chosen` names the variant each claim reads for a method (e.g. its
    tuned rate's, fedit@lr0.003), by default the recipe's."""
    chosen = chosen or {}
    epsilons = sorted({r["epsilon"] for r in results})
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    methods += sorted({r["method"] for r in results} - set(methods))  # clients of different ranks, last
    client_level = any(r["noise_to_update"] is not None for r in results)
    extra = "trained numbers (adapter / head) | lr | noise / update (mean over rounds, per epsilon) | " if client_level else ""
    rows, lines = [], ["| method | MB | " + extra + " | ".join(f"epsilon {epsilon_name(e)}" for e in epsilons)
                       + " |", "|---|---|" + "---|" * (len(epsilons) + 3 * client_level)]
    for method in methods:
        label, rank = variant_label(method, unit)
        if chosen and chosen.get(method.split("@")[0]) == method:
            label += ", tuned lr"
        cells, megabytes = [], {round(r["megabytes"], 1) for r in results if r["method"] == method}
        if client_level:
            mine = [r for r in results if r["method"] == method]
            ratios = [f"{epsilon_name(e)}: {statistics.mean(v):.2f}" for e in epsilons
                      for v in [[r["noise_to_update"] for r in mine if r["epsilon"] == e and r["noise_to_update"]]]
                      if v]
            cells += [trained(mine[0]["trained_numbers"]), " or ".join(f"{lr:g}" for lr in sorted({r["lr"] for r in mine})),
                      "; ".join(ratios) or "-"]
        for e in epsilons:
            accs = [r["accuracy"] for r in results if r["method"] == method and r["epsilon"] == e]
            row = {"method": method, "rank": rank, "epsilon": epsilon_name(e), "seeds": len(accs),
                   "mean": statistics.mean(accs) if accs else None,
                   "std": statistics.stdev(accs) if len(accs) > 1 else None}
            rows.append(row)
            cells.append("-" if not accs else f"{row['mean']:.4f}" + (f" ± {row['std']:.4f}" if row["std"] else "")
                         + f" (n={len(accs)})")
        lines.append(f"| {label}, {rank} | {' or '.join(f'{mb:g}' for mb in sorted(megabytes))} | "
                     + " | ".join(cells) + " |")
    by_key = {(r["method"], r["epsilon"]): r for r in rows}
    lines.append("")
    for better, worse, claim in CLIENT_LEVEL_CLAIMS if unit == "client" else CLAIMS:
        read = (lambda m: chosen.get(m)) if chosen else (lambda m: m)  # tuned rows only, once there are any
        verdicts = [f"epsilon {epsilon_name(e)}: " + verdict(by_key.get((read(better), epsilon_name(e))),
                                                          by_key.get((read(worse), epsilon_name(e))))
                    for e in epsilons if e != NO_DP]
        lines.append(f"- {claim}{' (tuned rates)' if chosen else ''}: " + "; ".join(verdicts))
    for method in [m for m in methods if m.endswith("+distributed")]:
        central = method.removesuffix("+distributed")
        for e in epsilons:
            ours, theirs = by_key.get((method, epsilon_name(e))), by_key.get((central, epsilon_name(e)))
            if e == NO_DP or not ours or not theirs or ours["mean"] is None or theirs["mean"] is None:
                continue
            difference = ours["mean"] - theirs["mean"]
            lines.append(f"- {variant_label(method, unit)[0]} against central DP at epsilon {epsilon_name(e)}: "
                         f"{ours['mean']:.4f} vs {theirs['mean']:.4f}, difference {difference:+.4f}; within one "
                         f"standard error of central DP ({standard_error(theirs):.4f}): "
                         f"{'yes' if abs(difference) <= standard_error(theirs) else 'no'}")
    return rows, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilons", nargs="+", help="target epsilons; none: the recipe without DP (default: "
                                                         "1 3 8 none; with --unit client 3 8 none)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        help="default: fedit ffa fedsb fedex; with --unit client fedit ffa fedsb")
    parser.add_argument("--client-ranks", type=int, nargs="+",
                        help="one rank per client (the recipe has 2), for FlexLoRA, HetLoRA, FLoRA or FedIT")
    parser.add_argument("--unit", choices=["example", "client"], default="example",
                        help="client: the client-level DP recipe (examples/sst2_user_dp.toml)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                        help="a method's learning rate (default: the recipe's), e.g. fedsb=3e-2")
    parser.add_argument("--mechanism", choices=["central", "distributed"], default="central",
                        help="with --unit client: distributed, the clients noise their updates (privacy.mechanism)")
    parser.add_argument("--fixed-clip", type=float, help="with --unit client: clip every update to this norm")
    parser.add_argument("--tune", action="store_true",
                        help="with --unit client: each method at the rate fedlora tune picks on held-out rows")
    parser.add_argument("--report", action="store_true",
                        help="run and tune nothing: write the tables from the finished and recorded runs")
    parser.add_argument("--keep-recorded", action="store_true",
                        help="count the runs the results file already holds and do not repeat them")
    parser.add_argument("--out", help="default: runs/dp_comparison, with --unit client runs/user_dp_comparison")
    args = parser.parse_args()
    client_level = args.unit == "client"
    args.epsilons = args.epsilons or (["3", "8", "none"] if client_level else ["1", "3", "8", "none"])
    args.methods = args.methods or ["fedit", "ffa", "fedsb"] + ([] if client_level else ["fedex"])
    epsilons = [NO_DP if e == "none" else float(e) for e in args.epsilons]
    stem = "user_dp_comparison" if args.unit == "client" else "dp_comparison"
    out = Path(args.out or f"runs/{stem}")
    lrs = {m: float(lr) for m, lr in (item.split("=") for item in args.lr)}
    args.keep_recorded |= args.report
    results_file = RESULTS / f"{stem}.json"
    earlier = recorded(results_file) if args.keep_recorded else []
    done_before = frozenset(r["name"] for r in earlier)
    tunings = json.loads(results_file.read_text()).get("tuning", {}) if results_file.is_file() else {}
    started = time.time()
    chosen = {}
    if args.tune:
        if not client_level:
            parser.error("--tune: with --unit client (experiments/tuned_comparison.py tunes the example-level recipe)")
        recipe_lr = tomllib.loads(RECIPES[args.unit].read_text())["train"]["lr"]
        for method in args.methods:
            if args.report and not (out / "tune" / method / "tuning.json").is_file() and method not in tunings:
                continue
            tunings[method] = method_tuning(out, method, args.unit, tunings if args.keep_recorded else {}, args.report)
            lr = float(tunings[method]["best"]["train.lr"])
            lrs[method] = None if lr == recipe_lr else lr  # the recipe's own rate: the runs named without it
            chosen[method] = method + (f"@lr{lr:g}" if lrs[method] is not None else "")
    failed = [] if args.report else [r["name"] for seed in args.seeds for e in epsilons for m in args.methods
              for r in [run(out, m, e, seed, args.client_ranks, args.unit, lrs.get(m), done_before, args.mechanism,
                           args.fixed_clip)]
              if "error" in r]
    wall = time.time() - started
    results = finished(out)
    results += [r for r in earlier if r["name"] not in {mine["name"] for mine in results}]
    results.sort(key=lambda r: r["name"])
    rows, markdown = table(results, args.unit, chosen)
    tuned = {m: t for m, t in tunings.items() if m in chosen} if chosen else {}
    markdown += "".join(line + "\n" for line in tuning_lines(tuned))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"runs": [r | {"epsilon": epsilon_name(r["epsilon"])} for r in results], "table": rows, "failed": failed,
         "tuning": tunings,
         "wall_seconds_of_last_invocation": round(wall)}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown + f"\nWall time of this invocation: {wall:.0f} s." + (f" Failed: {failed}" if failed else ""))


if __name__ == "__main__":
    main()
