import json
import math

import numpy as np
import pytest

from fedlora.cli import main
from fedlora.errors import FedloraError
from fedlora.plots import _mean_curve, figure, read_run

pytest.importorskip("matplotlib")


def write_run(folder, accuracies, bytes_per_round, method="fedsb", rank=16, epsilon=None, eval_every=1,
              config_epsilon="same", lr=1e-3):
    folder.mkdir(parents=True)
    lines = []
    for r, acc in enumerate(accuracies):
        evaluated = r % eval_every == 0 or r == len(accuracies) - 1
        lines.append({"round": r, "eval": {"accuracy": acc, "loss": 1 - acc} if evaluated else None,
                      "bytes_up": bytes_per_round[r], "bytes_down": 2 * bytes_per_round[r],
                      "epsilon": None if epsilon is None else epsilon * r / (len(accuracies) - 1)})
    lines.insert(2, {"round": 2, "failed": True, "clients": [0]})  # a failed attempt, then its successful rerun
    (folder / "rounds.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = {"method": {"name": method}, "adapter": {"rank": rank}, "train": {"lr": lr},
              "privacy": {"epsilon": epsilon if config_epsilon == "same" else config_epsilon}}
    (folder / "summary.json").write_text(json.dumps({"config": config}))
    return folder


def test_read_run_accumulates_bytes_and_skips_failed_attempts(tmp_path):
    run = read_run(write_run(tmp_path / "a", [0.5, 0.6, 0.7, 0.8, 0.9], [100, 10, 10, 10, 10], eval_every=2))
    assert run.label == "fedsb r=16" and run.target_epsilon == math.inf
    assert run.rounds == [0, 2, 4]
    assert run.values["accuracy"] == [0.5, 0.7, 0.9]
    assert run.total_bytes == [300, 300 + 2 * 30, 300 + 4 * 30]
    private = read_run(write_run(tmp_path / "b", [0.5, 0.6, 0.7], [1, 1, 1], method="ffa", rank=8, epsilon=3.0))
    assert private.target_epsilon == 3.0 and private.final_epsilon == pytest.approx(3.0)


def test_seeds_are_averaged_on_shared_rounds(tmp_path):
    a = read_run(write_run(tmp_path / "s0", [0.5, 0.6, 0.8], [10, 10, 10]))
    b = read_run(write_run(tmp_path / "s1", [0.5, 0.7, 0.6], [10, 10, 10]))
    xs, mean, std = _mean_curve([a, b], "accuracy", "round")
    assert xs.tolist() == [0, 1, 2]
    np.testing.assert_allclose(mean, [0.5, 0.65, 0.7])
    np.testing.assert_allclose(std, [0.0, 0.05, 0.1])
    xs, _, _ = _mean_curve([a, b], "accuracy", "bytes")
    assert xs.tolist() == [30, 60, 90]


def test_fedlora_plot_writes_a_png(tmp_path, capsys):
    runs = [write_run(tmp_path / f"r{i}", [0.5, 0.6 + i / 10, 0.7], [5, 5, 5], epsilon=eps)
            for i, eps in enumerate([None, 3.0, 1.0])]
    out = tmp_path / "plots" / "runs.png"
    assert main(["plot", *map(str, runs), "--out", str(out), "--labels", "fedsb,fedsb,fedsb"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


@pytest.mark.parametrize("problem, message", [
    ("no_log", "no rounds.jsonl"),
    ("bad_metric", "metric 'f1' is not in the evaluations"),
    ("labels", "--labels gives 2 labels for 1 run folders"),
    ("bad_line", "line 1: not a JSON object"),
])
def test_plot_errors_are_one_line(tmp_path, capsys, problem, message):
    run = tmp_path / "run"
    args = ["plot", str(run), "--out", str(tmp_path / "x.png")]
    if problem == "no_log":
        run.mkdir()
    elif problem == "bad_line":
        run.mkdir()
        (run / "rounds.jsonl").write_text("{oops\n")
    else:
        write_run(run, [0.5, 0.6], [1, 1])
        args += ["--metric", "f1"] if problem == "bad_metric" else ["--labels", "a,b"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    with pytest.raises(FedloraError):
        read_run(tmp_path / "nowhere")


def test_a_run_private_by_its_noise_multiplier_alone_is_placed_at_its_accountants_epsilon(tmp_path):
    run = read_run(write_run(tmp_path / "a", [0.5, 0.6, 0.7], [1, 1, 1], epsilon=2.3456, config_epsilon=None))
    assert run.target_epsilon == 2.3


def test_runs_that_differ_beyond_their_seed_are_not_averaged_as_seeds(tmp_path, capsys):
    a = write_run(tmp_path / "a", [0.5, 0.6], [1, 1])
    b = write_run(tmp_path / "b", [0.5, 0.7], [1, 1], lr=1e-2)
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "p.png")]) != 0
    assert "differ in more than their seed (train.lr)" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "p.png"), "--labels", "lr 1e-3,lr 1e-2"]) == 0


def test_a_run_reports_chance_and_majority_class_accuracy_of_its_evaluation_data(tmp_path, tiny_bert_dir, capsys):
    # 10 evaluation rows: 7 "b", 2 "a", 1 "c" -> always answering "b" scores 0.7; chance is 1/3
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"row {i},{'abc'[i % 3]}\n" for i in range(24)))
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\n" + "".join(f"dev {i},{label}\n" for i, label in enumerate("bbabbcbbab")))
    config = tmp_path / "tiny.toml"
    config.write_text(f'''method.name = "ffa"
model.path = "{tiny_bert_dir}"
adapter.rank = 2
federation = {{ num_clients = 2, clients_per_round = 2, rounds = 1 }}
train = {{ local_steps = 1, batch_size = 4 }}
[data]
name = "none"
path = "{train}"
eval_path = "{dev}"
text_columns = ["text"]
label_column = "label"
max_length = 8
''')
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["baselines"] == {"chance": pytest.approx(1 / 3), "majority": pytest.approx(0.7)}
    assert "(chance 0.3333, majority class 0.7000)" in capsys.readouterr().out
    assert read_run(tmp_path / "run").baselines == summary["baselines"]


def test_the_plot_draws_the_baselines_on_accuracy_panels(tmp_path):
    def baseline_lines(ax):
        return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()
                if line.get_label().startswith(("chance", "majority"))}

    a = write_run(tmp_path / "a", [0.5, 0.6], [1, 1], epsilon=2.0)
    summary = json.loads((a / "summary.json").read_text())
    (a / "summary.json").write_text(json.dumps(summary | {"baselines": {"chance": 0.25, "majority": 0.4}}))
    b = write_run(tmp_path / "b", [0.5, 0.7], [1, 1], method="ffa")
    fig = figure([read_run(a), read_run(b)])
    expected = {"chance 0.25": [0.25, 0.25], "majority class 0.40": [0.4, 0.4]}
    assert len(fig.axes) == 3 and all(baseline_lines(ax) == expected for ax in fig.axes)
    assert all(baseline_lines(ax) == {} for ax in figure([read_run(a)], metric="loss").axes)
    assert all(baseline_lines(ax) == {} for ax in figure([read_run(b)]).axes)


def test_the_pareto_front_keeps_the_points_nothing_beats():
    from fedlora.plots import pareto_front

    points = [(100, 0.70), (50, 0.72), (200, 0.80), (200, 0.75), (400, 0.80), (30, 0.60), (50, 0.72)]
    # (100, .70) loses to (50, .72); (200, .75) and (400, .80) to (200, .80); the duplicate (50, .72) keeps both
    assert pareto_front(points) == [5, 1, 6, 2]
    assert pareto_front([(1, 0.3), (2, 0.2), (3, 0.4)], higher_is_better=False) == [0, 1]  # a loss: lower wins


def test_fedlora_plot_pareto_draws_means_spreads_and_the_front(tmp_path, capsys):
    from fedlora.plots import pareto_figure, read_run, run_folders

    def with_totals(folder, total):
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps(summary | {"bytes_up_total": total // 4,
                                                                   "bytes_down_total": total - total // 4}))
        return folder

    runs = tmp_path / "experiment"
    # two seeds of Fed-SB at r=16, one of r=32, two of FFA-LoRA at r=8, and one private run in a panel of its own
    with_totals(write_run(runs / "fedsb16-s0", [0.5, 0.80], [5, 5]), 1_000)
    with_totals(write_run(runs / "fedsb16-s1", [0.5, 0.84], [5, 5]), 1_200)
    with_totals(write_run(runs / "fedsb32-s0", [0.5, 0.83], [5, 5], rank=32), 4_000)
    with_totals(write_run(runs / "ffa-s0", [0.5, 0.86], [5, 5], method="ffa", rank=8), 9_000)
    with_totals(write_run(runs / "ffa-s1", [0.5, 0.84], [5, 5], method="ffa", rank=8), 9_000)
    with_totals(write_run(runs / "private" / "ffa-eps3", [0.5, 0.7], [5, 5], method="ffa", rank=8, epsilon=3.0),
                9_000)
    folders = run_folders([runs])
    assert len(folders) == 6
    fig = pareto_figure([read_run(f) for f in folders])
    eps3, no_dp = fig.axes
    assert (eps3.get_title(), no_dp.get_title()) == ("epsilon 3", "no DP")
    markers = {}
    for container in no_dp.containers:  # one errorbar per method and rank: its mean and seed spread
        (x,), (y,) = container.lines[0].get_data()
        spread = container.lines[2][0].get_segments()[0][:, 1] if container.lines[2] else [y, y]
        markers[(round(x), round(y, 4))] = (round(spread[1] - y, 4), container.lines[0].get_color())
    assert markers.keys() == {(1_100, 0.82), (4_000, 0.83), (9_000, 0.85)}
    assert markers[(1_100, 0.82)][0] == round(float(np.std([0.80, 0.84], ddof=1)), 4)  # the sample std
    assert markers[(9_000, 0.85)][0] == round(float(np.std([0.86, 0.84], ddof=1)), 4)
    assert markers[(4_000, 0.83)][0] == 0.0  # one seed: no spread
    assert markers[(1_100, 0.82)][1] == markers[(4_000, 0.83)][1] != markers[(9_000, 0.85)][1]  # colour by method
    front = next(line for line in no_dp.get_lines() if line.get_label() == "non-dominated")
    assert front.get_xdata().tolist() == [1_100, 4_000, 9_000]  # each point adds accuracy for its bytes
    alone = next(line for line in eps3.get_lines() if line.get_label() == "non-dominated")
    assert alone.get_xdata().tolist() == [9_000] and alone.get_marker() == "o"  # a front of one point is ringed
    out = tmp_path / "pareto.png"
    assert main(["plot", "--pareto", str(runs), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_pareto_labels_of_crowded_points_do_not_overlap(tmp_path):
    from fedlora.plots import pareto_figure, read_run

    def with_total(folder, total):
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps(summary | {"bytes_up_total": total, "bytes_down_total": 0}))
        return folder

    # five (method, rank) points within 10% in bytes and 0.004 in accuracy, on an axis that spans 0.2 for a sixth:
    # their labels would all print at one spot
    runs = [with_total(write_run(tmp_path / f"{method}{rank}", [0.5, accuracy], [5, 5], method=method, rank=rank),
                       total)
            for method, rank, accuracy, total in [("ffa", 4, 0.800, 14_000_000), ("fedsb", 32, 0.801, 14_300_000),
                                                  ("fedit", 4, 0.802, 14_600_000), ("ffa", 8, 0.803, 14_900_000),
                                                  ("fedsb", 16, 0.804, 15_200_000), ("fedit", 8, 0.6, 90_000_000)]]
    fig = pareto_figure([read_run(f) for f in runs])
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(text, renderer) for text in fig.axes[0].texts if text.get_text()]  # not leaders
    assert len(boxes) == 6
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
