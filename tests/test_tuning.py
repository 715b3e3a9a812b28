"""`fedlora tune`: the best setting by the mean over seeds on held-out training rows, the evaluation split never
opened, finished trials skipped on a rerun, and best.toml the config with the chosen values."""
import json
import tomllib

import pytest

import fedlora.simulator
from fedlora.cli import main
from fedlora.config import build_config, load_config
from fedlora.errors import ConfigError
from fedlora.tuning import parse_grid, tune

# (lr, seed) -> accuracy at rounds 1 and 2 (the last). Built so that the best mean over seeds (lr 0.01) is not
# the best single trial (lr 0.1, seed 1), and the best round (lr 0.001's round 1) is not the best final value.
ACCURACY = {(0.001, 0): (0.95, 0.60), (0.001, 1): (0.93, 0.62),
            (0.01, 0): (0.70, 0.80), (0.01, 1): (0.71, 0.78),
            (0.1, 0): (0.50, 0.55), (0.1, 1): (0.60, 0.90)}


class FakeSimulator:
    """Writes the run folder a finished run leaves, with the accuracy ACCURACY gives its lr and seed."""
    runs = []

    def __init__(self, cfg, out, progress=True, data=None, **_):
        self.cfg, self.out = cfg, out

    def run(self, resume=False):
        FakeSimulator.runs.append(self.cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        per_round = ACCURACY[(self.cfg.train.lr, self.cfg.seed)]
        rounds = [{"round": r, "eval": {"accuracy": a, "loss": 1 - a}, "seconds": 1.5}
                  for r, a in enumerate(per_round, 1)]
        (self.out / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
        summary = {"final_eval": rounds[-1]["eval"], "bytes_up_total": 100, "bytes_down_total": 200,
                   "privacy": None, "config": self.cfg.to_dict()}
        (self.out / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def fake_runs(monkeypatch):
    FakeSimulator.runs = []
    monkeypatch.setattr(fedlora.simulator, "Simulator", FakeSimulator)
    return FakeSimulator.runs


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "base.toml"
    path.write_text('seed = 0\n[method]\nname = "ffa"\n[train]\nlr = 0.5\nlocal_steps = 3\n')
    return path


def test_the_best_mean_over_seeds_is_chosen_and_written_back(fake_runs, config_file, tmp_path):
    result = tune(config_file, {"train.lr": [0.001, 0.01, 0.1]}, out=tmp_path / "t", seeds=2, progress=False)
    assert result.best == {"train.lr": 0.01}  # mean 0.79, against 0.61 and 0.725 (whose seed 1 has the top 0.90)
    # every trial evaluated on held-out training rows (the default 0.1), seeds 0 and 1, the rest of the config kept
    assert sorted((c.train.lr, c.seed) for c in fake_runs) == sorted(ACCURACY)
    assert {c.data.holdout_fraction for c in fake_runs} == {0.1} and {c.train.local_steps for c in fake_runs} == {3}
    record = json.loads((tmp_path / "t" / "tuning.json").read_text())
    assert [(t["setting"]["train.lr"], t["seed"], t["metric"]) for t in record["trials"]] == [
        (lr, seed, final) for (lr, seed), (_, final) in ACCURACY.items()]
    assert all(t["bytes_up"] == 100 and t["bytes_down"] == 200 and t["seconds"] == 3.0 for t in record["trials"])
    assert record["privacy"] is None and record["holdout_fraction"] == 0.1
    best = tomllib.loads((tmp_path / "t" / "best.toml").read_text())
    assert best == {"seed": 0, "method": {"name": "ffa"}, "train": {"lr": 0.01, "local_steps": 3}}
    assert build_config(best).data.holdout_fraction is None  # the chosen config evaluates on the real split again


def test_pick_best_takes_each_trials_best_round(fake_runs, config_file, tmp_path):
    result = tune(config_file, {"train.lr": [0.001, 0.01, 0.1]}, out=tmp_path / "t", seeds=2, pick="best",
                  progress=False)
    assert result.best == {"train.lr": 0.001}  # rounds 1: 0.95 and 0.93
    assert tune(config_file, {"train.lr": [0.001, 0.01, 0.1]}, out=tmp_path / "loss", seeds=2, metric="loss",
                progress=False).best == {"train.lr": 0.01}  # the loss is minimised


def test_a_rerun_skips_finished_trials(fake_runs, config_file, tmp_path):
    grid = {"train.lr": [0.001, 0.01], "train.local_steps": [3]}
    tune(config_file, grid, out=tmp_path / "t", seeds=2, progress=False)
    assert len(fake_runs) == 4
    unfinished = sorted((tmp_path / "t" / "trials").iterdir())[1]
    (unfinished / "summary.json").unlink()  # as if stopped in the middle of this trial
    again = tune(config_file, grid, out=tmp_path / "t", seeds=2, progress=False)
    assert len(fake_runs) == 5 and (fake_runs[-1].train.lr, fake_runs[-1].seed) == (0.001, 1)
    assert again.best == {"train.lr": 0.01, "train.local_steps": 3}


def test_the_command_line(fake_runs, config_file, tmp_path, capsys):
    assert main(["tune", str(config_file), "--grid", "train.lr=0.001, 0.01,0.1", "--seeds", "2",
                 "--out", str(tmp_path / "t"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "best: train.lr=0.01: accuracy 0.7900 +- 0.0141 over 2 seeds" in out and "best.toml" in out


def test_grids_and_settings_that_cannot_be_tuned_are_refused(config_file, tmp_path):
    assert parse_grid(["adapter.target_modules=['query','value'],['query']", "train.lr=1e-3,2e-3"]) == {
        "adapter.target_modules": [["query", "value"], ["query"]], "train.lr": [1e-3, 2e-3]}
    for bad in (["train.lr"], ["train.lr="], ["train.lr=1,2", "train.lr=3"]):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid(bad)
    with pytest.raises(ConfigError, match="train.lr"):
        tune(config_file, {"train.lr": [-1.0]}, out=tmp_path / "t", progress=False)
    with pytest.raises(ConfigError, match="data.eval_path"):
        tune(config_file, {"train.lr": [0.1]}, out=tmp_path / "t", progress=False,
             overrides=["data.eval_path='dev.tsv'"])


def test_tuning_under_privacy_says_what_its_epsilon_leaves_out(fake_runs, config_file, tmp_path):
    tune(config_file, {"train.lr": [0.01]}, out=tmp_path / "t", progress=False,
         overrides=["privacy.epsilon=3.0", "federation.num_clients=2", "federation.clients_per_round=2"])
    note = json.loads((tmp_path / "t" / "tuning.json").read_text())["privacy"]
    assert "Papernot and Steinke" in note and "public data" in note


def test_real_trials_never_open_the_evaluation_split(tiny_bert_dir, toy_data, tmp_path, monkeypatch):
    """Real runs on the tiny model, the data a local copy of a preset whose evaluation file is unreadable as
    data: tuning finishes, and no file but the training file is read."""
    import shutil

    import fedlora.data.presets as presets

    root = tmp_path / "data"
    (root / "sst2").mkdir(parents=True)
    shutil.copy(toy_data["path"], root / "sst2" / "train.tsv")
    (root / "sst2" / "dev.tsv").write_text("not\ta\tGLUE\tfile\n\x00\x01\n")
    opened = []
    read_file = presets._read_file
    monkeypatch.setattr(presets, "_read_file", lambda path, *a, **k: opened.append(path) or read_file(path, *a, **k))
    config = tmp_path / "tiny.toml"
    config.write_text(f"""seed = 1
[method]
name = "ffa"
[model]
path = "{tiny_bert_dir}"
[adapter]
rank = 2
[data]
name = "sst2"
root = "{root}"
max_length = 16
[federation]
num_clients = 2
clients_per_round = 2
rounds = 1
[train]
local_steps = 2
batch_size = 8
[eval]
every = 1
""")
    result = tune(config, {"train.lr": [0.01, 0.05]}, out=tmp_path / "t", holdout_fraction=0.25, progress=False)
    assert {path.name for path in opened} == {"train.tsv"}
    assert all(0.0 <= t.metric <= 1.0 for t in result.trials) and result.best["train.lr"] in (0.01, 0.05)
    assert result.best == max(result.scores, key=lambda row: row["mean"])["setting"]


def test_best_toml_keeps_the_configs_paths_working_from_its_own_folder(fake_runs, tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "c.toml"
    config.write_text('[method]\nname = "ffa"\n[data]\nname = "none"\npath = "train.csv"\n')
    monkeypatch.chdir(tmp_path)
    tune("configs/c.toml", {"train.lr": [0.001, 0.01]}, out="runs/t", progress=False)
    assert {c.data.path for c in fake_runs} == {"configs/train.csv"}
    best = build_config(tomllib.loads((tmp_path / "runs" / "t" / "best.toml").read_text()))
    assert best.data.path == "../../configs/train.csv"
    assert load_config(tmp_path / "runs" / "t" / "best.toml").data.path == str(tmp_path / "configs" / "train.csv")
