"""Plots of finished runs: a metric against rounds, against total bytes exchanged, and against epsilon.

Runs that share a label and a privacy setting and differ only in their seed are drawn as one curve, the
mean over seeds with a band of one standard deviation.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import differing_keys
from .errors import FedloraError
from .run_folder import ROUNDS_LOG, SUMMARY
from .tuning import higher_is_better


@dataclass
class Run:
    path: Path
    label: str
    target_epsilon: float  # privacy.epsilon of the config (else the accountant's, two digits); inf without DP
    rounds: list[int]  # the evaluated rounds
    values: dict[str, list[float]]  # metric -> its value at each evaluated round
    total_bytes: list[int]  # bytes up + down of all clients up to and including each evaluated round
    final_epsilon: float | None  # the accountant's epsilon at the end
    setting: dict  # the config without its seed: runs drawn as one curve must share it
    baselines: dict[str, float] | None = None  # summary.json's chance and majority-class accuracy
    run_bytes: int | None = None  # bytes up + down of the whole run (summary.json), set-up included


def read_run(run_dir: str | Path, label: str | None = None) -> Run:
    """A run folder written by `fedlora run` (its rounds.jsonl; the label from its summary.json)."""
    path = Path(run_dir)
    log = path / ROUNDS_LOG
    if not log.is_file():
        raise FedloraError(f"{path}: no {ROUNDS_LOG}; is it a folder written by `fedlora run`?")
    summary = json.loads((path / SUMMARY).read_text()) if (path / SUMMARY).is_file() else {}
    config = summary.get("config", {})
    rounds, values, total_bytes, cumulative, epsilon = [], {}, [], 0, None
    for number, line in enumerate(log.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise FedloraError(f"{log} line {number}: not a JSON object") from None
        if record.get("failed"):
            continue
        cumulative += record.get("bytes_up", 0) + record.get("bytes_down", 0)
        epsilon = record.get("epsilon", epsilon)
        if record.get("eval"):
            rounds.append(record["round"])
            total_bytes.append(cumulative)
            for metric, value in record["eval"].items():
                values.setdefault(metric, []).append(value)
    if not rounds:
        raise FedloraError(f"{log}: no evaluated round to plot")
    method = config.get("method", {}).get("name", path.name)
    rank = config.get("adapter", {}).get("rank")
    target = config.get("privacy", {}).get("epsilon")
    if target is None and epsilon is not None:  # private by privacy.noise_multiplier alone
        target = float(f"{epsilon:.2g}")
    return Run(path, label or (method if method == "full" or rank is None else f"{method} r={rank}"),
               math.inf if target is None else float(target), rounds, values, total_bytes, epsilon,
               {k: v for k, v in config.items() if k != "seed"}, summary.get("baselines"),
               summary["bytes_up_total"] + summary["bytes_down_total"] if "bytes_up_total" in summary else cumulative)


def run_folders(paths: list[str | Path]) -> list[Path]:
    """Each path that is a run folder (it has rounds.jsonl), else every finished run folder below it (a
    tuning's or an experiment's output)."""
    found = []
    for path in map(Path, paths):
        if (path / ROUNDS_LOG).is_file() or not path.is_dir():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob(SUMMARY) if (p.parent / ROUNDS_LOG).is_file())
        if not below:
            raise FedloraError(f"{path}: neither a run folder nor a folder holding finished runs")
        found += below
    return found


def _mean_curve(runs: list[Run], metric: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and standard deviation over seeds, on the evaluated rounds all the runs share."""
    shared = sorted(set.intersection(*(set(r.rounds) for r in runs)))
    ys = np.array([[r.values[metric][r.rounds.index(k)] for k in shared] for r in runs])
    xs = np.array([[(k if x == "round" else r.total_bytes[r.rounds.index(k)]) for k in shared] for r in runs])
    return xs.mean(0), ys.mean(0), ys.std(0)


def _groups(runs: list[Run]) -> dict[tuple[str, float], list[Run]]:
    """Runs by label and privacy setting; the runs of one group may differ only in their seed."""
    groups: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        members = groups.setdefault((run.label, run.target_epsilon), [])
        if members and run.setting != members[0].setting:
            keys = ", ".join(differing_keys(run.setting, members[0].setting)[:4])
            raise FedloraError(f"{members[0].path} and {run.path} have the same label '{run.label}' but differ "
                               f"in more than their seed ({keys}): give each its own label with --labels")
        members.append(run)
    return groups



def _setting_name(label: str, epsilon: float, all_eps: set[float]) -> str:
    return label if all_eps == {math.inf} else f"{label}, " + ("no DP" if epsilon == math.inf else f"eps={epsilon:g}")


def plot_runs(runs: list[Run], out: str | Path, metric: str = "accuracy", title: str | None = None) -> Path:
    """One PNG with up to three panels: metric vs round, metric vs total bytes (log x) and, when some runs
    are private, final metric vs epsilon (one line per label; runs without DP at the right, as 'no DP').
    Accuracy panels show the chance and majority-class accuracy of the runs' evaluation data."""
    return _save(figure(runs, metric, title), out)


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out


def _check_metric(runs: list[Run], metric: str) -> None:
    missing = [str(r.path) for r in runs if metric not in r.values]
    if missing:
        raise FedloraError(f"metric '{metric}' is not in the evaluations of: {', '.join(missing)}")


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FedloraError("plotting needs matplotlib: pip install 'fedlora[plot]'") from None
    return plt


def figure(runs: list[Run], metric: str = "accuracy", title: str | None = None):
    """The matplotlib figure `plot_runs` writes."""
    plt = _pyplot()
    _check_metric(runs, metric)
    groups = _groups(runs)
    all_eps = {eps for _, eps in groups}
    private = any(eps != math.inf for eps in all_eps)
    fig, axes = plt.subplots(1, 3 if private else 2, figsize=(15 if private else 10.5, 4.2))
    for (label, eps), members in groups.items():
        name = _setting_name(label, eps, all_eps)
        for ax, x in zip(axes, ("round", "bytes")):
            xs, mean, std = _mean_curve(members, metric, x)
            if x == "bytes":  # nothing exchanged yet has no place on a log axis
                xs, mean, std = xs[xs > 0], mean[xs > 0], std[xs > 0]
            line, = ax.plot(xs, mean, marker="o", markersize=3, label=name)
            if len(members) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("round")
    axes[1].set_xlabel("total bytes exchanged, all clients (log scale)")
    _bytes_axis(axes[1])
    if private:
        _epsilon_panel(axes[2], groups, metric)
    baselines = {(name, r.baselines[key]) for r in runs if r.baselines and metric == "accuracy"
                 for key, name in (("chance", "chance"), ("majority", "majority class"))}
    for ax in axes:
        for name, value in sorted(baselines):  # runs evaluated on different data: one line each
            ax.axhline(value, color="grey", linewidth=1, linestyle=":" if name == "chance" else "--",
                       label=f"{name} {value:.2f}")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _epsilon_panel(ax, groups: dict[tuple[str, float], list[Run]], metric: str) -> None:
    finite = sorted({eps for _, eps in groups if eps != math.inf})
    positions = {eps: i for i, eps in enumerate(finite)} | {math.inf: len(finite)}
    for label in dict.fromkeys(label for label, _ in groups):
        settings = sorted(eps for lab, eps in groups if lab == label)
        finals = [[r.values[metric][-1] for r in groups[(label, eps)]] for eps in settings]
        ax.errorbar([positions[e] for e in settings], [np.mean(f) for f in finals],
                    yerr=[np.std(f) for f in finals], marker="o", capsize=3, label=label)
    ax.set_xticks(range(len(positions)), [f"{e:g}" for e in finite] + ["no DP"])
    ax.set_xlabel("privacy budget epsilon (delta fixed)")
    ax.legend(fontsize=7)


def _bytes_axis(ax) -> None:
    """A log axis of bytes labelled in MB, spanning at least a factor 2.5, with fewer labels a decade the more
    decades it spans (matplotlib labels every minor tick of a narrow log axis, and the labels overlap)."""
    from matplotlib import ticker

    ax.set_xscale("log")
    low, high = ax.get_xlim()
    if high / low < 2.5:
        middle = math.sqrt(low * high)
        low, high = middle / 1.6, middle * 1.6
        ax.set_xlim(low, high)
    subs = (1.0,) if high / low > 100 else (1.0, 3.0) if high / low > 10 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value / 1e6:g} MB"))


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """The indices of the points (bytes, metric) that no other point dominates (as few bytes or fewer and a
    metric as good or better, one of them strictly), in order of bytes."""
    sign = 1 if higher_is_better else -1
    front = []
    for i, (b, m) in enumerate(points):
        if not any((b2 <= b and sign * m2 >= sign * m) and (b2 < b or sign * m2 > sign * m)
                   for j, (b2, m2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_figure(runs: list[Run], metric: str = "accuracy", title: str | None = None):
    """Final metric against the whole run's bytes (log scale), one panel per privacy setting: one marker per
    label (method and rank) at the mean over its seeds, the seeds' sample standard deviation as error bars,
    one colour per method, the non-dominated points joined."""
    plt = _pyplot()
    _check_metric(runs, metric)
    groups = _groups(runs)
    settings = sorted({eps for _, eps in groups})
    methods = sorted({label.split(" r=")[0] for label, _ in groups})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.6), squeeze=False)
    higher = higher_is_better(metric)
    labels = []
    for ax, eps in zip(axes[0], settings):
        points, shown = [], set()
        for (label, e), members in groups.items():
            if e != eps:
                continue
            method = label.split(" r=")[0]
            finals = [r.values[metric][-1] for r in members]
            x, y = float(np.mean([r.run_bytes for r in members])), float(np.mean(finals))
            spread = float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0
            ax.errorbar([x], [y], yerr=[spread], marker="o", capsize=3, color=colours[method],
                        label=method if method not in shown else None, linestyle="none")
            shown.add(method)
            labels.append(ax.annotate(f"{label[len(method):].strip()} (n={len(finals)})", (x, y),
                                      textcoords="offset points", xytext=(5, 4), fontsize=7, color=colours[method],
                                      bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none",
                                            "alpha": 0.8}, zorder=4))
            points.append((x, y))
        front = pareto_front(points, higher)
        # ringed as well as joined, so that a front of one point shows
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="black", linestyle="--",
                linewidth=1, marker="o", markersize=12, markerfacecolor="none", label="non-dominated", zorder=0)
        _bytes_axis(ax)
        ax.set_xlabel("total bytes of the run, all clients, up and down (log scale)")
        ax.set_ylabel(f"final {metric}")
        ax.set_title("no DP" if eps == math.inf else f"epsilon {eps:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _keep_apart(fig, labels)
    return fig


def _keep_apart(fig, labels) -> None:
    """Move each point's label up or down, in steps of its height, to the nearest place inside its panel where it
    overlaps no label placed before it, and join a moved label to its point: points a few MB and a few tenths of
    a point apart would otherwise print their labels over each other."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    placed = []
    for label in sorted(labels, key=lambda a: (a.xy[1], a.xy[0])):
        x, y = label.xyann
        step = Text.get_window_extent(label, renderer).height * 72 / fig.dpi + 1
        panel = label.axes.get_window_extent(renderer)
        for k in (0, *(sign * i for i in range(1, 12) for sign in (1, -1)), 0):  # none free: where it was
            label.xyann = (x, y + k * step)
            box = Text.get_window_extent(label, renderer)  # the text's own box
            if (panel.y0 <= box.y0 and box.y1 <= panel.y1) and not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)
        if k:
            label.axes.annotate("", label.xy, xytext=label.xyann, textcoords="offset points", zorder=3,
                                arrowprops={"arrowstyle": "-", "color": label.get_color(), "linewidth": 0.5,
                                            "shrinkA": 0, "shrinkB": 3})


def plot_pareto(runs: list[Run], out: str | Path, metric: str = "accuracy", title: str | None = None) -> Path:
    """pareto_figure written as a PNG."""
    return _save(pareto_figure(runs, metric, title), out)
