"""Hyperparameter tuning on held-out training data: every setting of a grid, over seeds, each a whole run
evaluated on `data.holdout_fraction` of the training data (default 0.1); the configured evaluation split is
never read. The best setting by the validation metric (its mean over seeds) is written back as a config.

    fedlora tune CONFIG --grid train.lr=1e-3,1e-2 [--grid KEY=V1,V2 ...] [--seeds N] [--pick final|best]

OUT/trials/<trial>/ holds each trial's run folder; a trial whose run finished is read back, not run again, so
a stopped tuning continues where it stopped. OUT/tuning.json records every trial (setting, seed, metric,
bytes, wall time) and the choice; OUT/best.toml is the config with the chosen values, evaluated on the
configured split again.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import config as config_module
from .config import Config, apply_overrides, map_paths, parse_override, toml_value
from .errors import ConfigError
from .files import atomic_write
from .run_folder import ROUNDS_LOG, logged_seconds, read_log, read_summary

DEFAULT_HOLDOUT = 0.1
# Tuning on private data is itself a release: the cost of choosing among runs is not in any run's epsilon.
PRIVACY_NOTE = ("each trial's epsilon covers that trial alone: choosing among trials on the clients' private data "
                "spends privacy that no reported epsilon includes (Papernot and Steinke, 'Hyperparameter Tuning "
                "with Renyi Differential Privacy', ICLR 2022, bound the cost of a random number of trials; Liu and "
                "Talwar 2019 that of selection). To keep the reported epsilon whole, tune on public data of the "
                "same task: --set data.name=... or --set data.path=...")


@dataclass
class Trial:
    setting: dict[str, Any]  # key -> value, one of the grid's combinations
    seed: int
    folder: Path
    metric: float | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    seconds: float | None = None
    epsilon: float | None = None


@dataclass
class Tuning:
    """A finished tuning: every trial, the chosen setting and the config it makes."""
    out: Path
    metric: str
    pick: str
    trials: list[Trial]
    best: dict[str, Any]  # the chosen setting
    scores: list[dict] = field(default_factory=list)  # per setting: its values, mean, std, seeds
    best_config: Config | None = None


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """`KEY=V1,V2,...` strings (values as `--set` reads them) as {key: [values]}."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid expects KEY=V1,V2,..., got {spec!r}")
        if key.strip() in grid:
            raise ConfigError(f"--grid {key.strip()}: given twice")
        grid[key.strip()] = [parse_override(f"{key.strip()}={v.strip()}")[1] for v in _split_values(values)]
    return grid


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes (a value may be a list: [4, 8])."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    return [p for p in (*parts, current) if p.strip()]


def _trial_name(index: int, setting: Mapping[str, Any], seed: int) -> str:
    words = "_".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in setting.items())
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9.=_+-]+', '-', words)[:80]}_seed{seed}"


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of the metric is better (not for losses, perplexities, errors)."""
    return not any(word in metric for word in ("loss", "perplexity", "error"))


def _raw_config(config: str | Path | Mapping | Config | None) -> dict:
    """The user's own settings (what best.toml writes back), without the defaults filled in."""
    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        return config_module.read_config_file(Path(config))
    return json.loads(json.dumps(config.to_dict() if isinstance(config, Config) else dict(config)))


def _metric_of(folder: Path, metric: str, pick: str) -> float:
    summary = read_summary(folder)
    if pick == "final":
        values = [summary["final_eval"].get(metric)]
    else:
        values = [r["eval"].get(metric) for r in read_log(folder / ROUNDS_LOG) if r.get("eval")]
    values = [v for v in values if v is not None]
    if not values:
        have = ", ".join(summary["final_eval"]) or "none"
        raise ConfigError(f"--metric {metric}: the trial in {folder} reports no such metric (it has: {have})")
    return max(values) if higher_is_better(metric) else min(values)


def _read_trial(trial: Trial, metric: str, pick: str) -> None:
    summary = read_summary(trial.folder)
    trial.metric = _metric_of(trial.folder, metric, pick)
    trial.bytes_up, trial.bytes_down = summary["bytes_up_total"], summary["bytes_down_total"]
    trial.seconds = round(logged_seconds(trial.folder), 2)
    privacy = summary.get("privacy") or {}
    trial.epsilon = privacy.get("epsilon", privacy.get("epsilon_max"))


def tune(config: str | Path | Mapping | Config | None, grid: Mapping[str, Sequence[Any]], *, out: str | Path,
         seeds: int = 1, pick: str = "final", metric: str | None = None, holdout_fraction: float | None = None,
         overrides: Sequence[str] = (), progress: bool = True, data=None) -> Tuning:
    """Run every setting of `grid` ({key: [values]}) for `seeds` seeds (config's seed, +1, ...), each on
    held-out training rows, and choose the setting with the best mean `metric` (default: accuracy where the
    task reports it, else the loss) at the last evaluation (`pick="final"`) or at its best round ("best").
    `data`: classification examples in memory (as `fedlora.run`'s train_data), held out from in the same way."""
    from .api import classification_data, make_config
    from .simulator import Simulator

    if not grid:
        raise ConfigError("tune: give at least one --grid KEY=V1,V2,...")
    if pick not in ("final", "best"):
        raise ConfigError(f"--pick {pick!r}: expected 'final' or 'best'")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected at least 1")
    raw = apply_overrides(_raw_config(config), list(overrides))
    data_section = raw.get("data", {})
    for key in ("eval_path", "eval_split"):
        if data_section.get(key):
            raise ConfigError(f"tune: data.{key} is set, but tuning never reads the evaluation data: it evaluates "
                              "on held-out training rows (data.holdout_fraction); remove data." + key)
    fraction = holdout_fraction or data_section.get("holdout_fraction") or DEFAULT_HOLDOUT
    base_seed = int(raw.get("seed", 0))
    out = Path(out)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    trials, configs = [], []
    for i, setting in enumerate(combos):
        for s in range(seeds):
            changes = [f"{k}={toml_value(v)}" for k, v in setting.items()]
            changes += [f"seed={base_seed + s}", f"data.holdout_fraction={fraction}"]
            if data is not None:  # the run's record says its data came from memory, not from a preset
                changes += ["data.name='none'"]
            try:
                cfg = make_config(apply_overrides(json.loads(json.dumps(raw)), changes))
            except ConfigError as err:
                raise ConfigError(f"tune: the setting {setting} is not a valid config: {err}") from None
            trials.append(Trial(setting, base_seed + s, out / "trials" / _trial_name(i, setting, base_seed + s)))
            configs.append(cfg)
    metric = metric or "accuracy"
    private = configs[0].privacy.epsilon is not None or configs[0].privacy.noise_multiplier is not None
    if progress and private:
        print(f"note: {PRIVACY_NOTE}", file=sys.stderr)
    memory = classification_data(data, None, configs[0]) if data is not None else None
    for n, (trial, cfg) in enumerate(zip(trials, configs), 1):
        label = ", ".join(f"{k}={v}" for k, v in trial.setting.items()) + f", seed {trial.seed}"
        done_before = (trial.folder / "summary.json").is_file()
        if not done_before:
            Simulator(cfg, trial.folder, progress=False, data=memory).run(resume=True)
        _read_trial(trial, metric, pick)
        if progress:
            print(f"trial {n}/{len(trials)} ({label}): {metric} {trial.metric:.4f}, "
                  f"{trial.bytes_up + trial.bytes_down:,} bytes, {trial.seconds:.0f} s"
                  + (" (finished before)" if done_before else ""), file=sys.stderr, flush=True)
    scores = []
    for setting in combos:
        values = [t.metric for t in trials if t.setting == setting]
        scores.append({"setting": setting, "mean": statistics.fmean(values),
                       "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)})
    better = max if higher_is_better(metric) else min
    best = better(scores, key=lambda row: row["mean"])["setting"]
    chosen = apply_overrides(json.loads(json.dumps(raw)), [f"{k}={toml_value(v)}" for k, v in best.items()])
    best_config = make_config(chosen)
    result = Tuning(out, metric, pick, trials, best, scores, best_config)
    _write(result, raw, chosen, grid, fraction, private)
    return result


def _write(result: Tuning, raw: dict, chosen: dict, grid: Mapping, fraction: float, private: bool) -> None:
    import tomli_w

    record = {
        "metric": result.metric, "pick": result.pick, "holdout_fraction": fraction,
        "evaluated_on": f"{fraction:g} of the training data, held out from training; the evaluation split is "
                        "never read",
        "grid": {k: list(v) for k, v in grid.items()}, "config": raw, "best": result.best,
        "scores": result.scores,
        "trials": [{"setting": t.setting, "seed": t.seed, "folder": str(t.folder.relative_to(result.out)),
                    "metric": t.metric, "bytes_up": t.bytes_up, "bytes_down": t.bytes_down,
                    "seconds": t.seconds, "epsilon": t.epsilon} for t in result.trials],
        "privacy": PRIVACY_NOTE if private else None,
    }
    atomic_write(result.out / "tuning.json", json.dumps(record, indent=2) + "\n")
    header = (f"# chosen by fedlora tune: {', '.join(f'{k} = {v}' for k, v in result.best.items())} "
              f"(best mean {result.metric} on held-out training rows; see tuning.json)\n")
    folder = result.out.resolve()  # best.toml's own relative paths resolve against its folder
    portable = map_paths(json.loads(json.dumps(chosen)),
                         lambda value: value if os.path.isabs(value) else os.path.relpath(os.path.abspath(value), folder))
    atomic_write(result.out / "best.toml", header + tomli_w.dumps(portable))
