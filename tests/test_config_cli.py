"""Configs and the command line: bad input gives one line naming the key or the file."""
import json
from pathlib import Path

import pytest

from fedlora.api import load_config, make_config as build_config
from fedlora.cli import main
from fedlora.config import apply_overrides
from fedlora.errors import ConfigError
from fedlora.methods import METHODS


@pytest.mark.parametrize("raw,expected", [
    ({"federation": {"num_clients": 4, "clients_per_round": 8}}, "clients_per_round (8) must be at most num_clients (4)"),
    ({"adapter": {"rank": 0}}, "config key 'adapter.rank'"),
    ({"train": {"lr": -1}}, "config key 'train.lr'"),
    ({"method": {"name": "fedprox"}}, "config key 'method.name'"),
    ({"train": {"lerning_rate": 0.1}}, "unknown config key 'train.lerning_rate'"),
    ({"colour": "blue"}, "unknown config key 'colour'"),
    ({"data": {"partition": "label_proportion"}}, "data.label_proportions is required"),
    ({"data": {"partition": "label_proportion", "label_proportions": [[0.5, 0.5]]}}, "one row per client"),
    ({"eval": {"every": "often"}}, "config key 'eval.every'"),
])
def test_bad_configs_name_the_key(raw, expected):
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_parse_toml_values():
    raw = apply_overrides({}, ["train.lr=0.5", "adapter.target_modules=['query','value']", "method.name=ffa",
                               "data.name=rte"])
    cfg = build_config(raw)
    assert cfg.train.lr == 0.5 and cfg.adapter.target_modules == ["query", "value"]
    assert cfg.method.name == "ffa" and cfg.data.name == "rte"
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_config(bad)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nnum_clients = 2\nclients_per_round = 3\n")
    code, _, err = run_cli(capsys, "run", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2
    assert err.count("\n") == 1 and "federation" in err and "Traceback" not in err


def test_cli_reports_bad_data_file_with_its_line(tmp_path, capsys, tiny_bert_dir):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[model]
path = "{tiny_bert_dir}"
[data]
name = "sst2"
path = "{train}"
eval_path = "{train}"
""")
    code, _, err = run_cli(capsys, "run", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2
    assert "train.tsv" in err and "line 3" in err and err.count("\n") == 1


def test_cli_unknown_model_folder(tmp_path, capsys, toy_data):
    cfg = tmp_path / "c.toml"
    train = toy_data["path"]
    cfg.write_text(f'[model]\npath = "{tmp_path / "nowhere"}"\n[data]\npath = "{train}"\n')
    code, _, err = run_cli(capsys, "run", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "model.path: no such folder" in err and err.count("\n") == 1


def test_comm_reproduces_the_fed_sb_paper_counts(capsys):
    code, out, _ = run_cli(capsys, "comm", "--model", "mistral-7b", "--method", "fedsb", "--rank", "200", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["round"]["params_up"] == 32 * 7 * 200 ** 2 == 8_960_000
    assert report["round"]["bytes_up"] == 4 * 8_960_000
    _, out, _ = run_cli(capsys, "comm", "--model", "mistral-7b", "--method", "fedit", "--rank", "32", "--json")
    assert json.loads(out)["round"]["params_up"] == 83_886_080


def test_comm_methods_on_an_encoder(capsys):
    def report(method, clients=1):
        _, out, _ = run_cli(capsys, "comm", "--model", "minilm-l6", "--method", method, "--rank", "8",
                            "--clients", str(clients), "--json", "--target-modules", "query,value")
        return json.loads(out)

    d, r, head = 384, 8, 384 * 2 + 2
    layers = 12  # query and value in 6 layers
    assert report("fedit")["round"]["params_up"] == layers * r * 2 * d + head
    assert report("ffa")["round"]["params_up"] == layers * r * d + head
    assert report("fedsb")["round"]["params_up"] == layers * r * r + head
    assert report("fedsb")["init"]["params_up"] == layers * 2 * (r + 8) * d  # the default sign sketch, k = r + 8
    assert report("fedex")["round"]["params_down"] == layers * (r * 2 * d + d * d) + head
    assert report("flora", clients=5)["round"]["params_down"] == layers * 5 * r * 2 * d + head
    assert report("fedsa")["round"]["params_up"] == layers * r * d + head
    assert report("full")["round"]["params_up"] == layers * d * d + head
    code, _, err = run_cli(capsys, "comm", "--model", "nope", "--method", "fedsb", "--rank", "8")
    assert code == 2 and "--model" in err


def test_data_name_none_means_plain_files():
    assert build_config({"data": {"name": "none"}}).data.name is None
    assert build_config({"data": {"name": ""}}).data.name is None
    assert build_config({}).data.name == "sst2"


def test_an_empty_model_folder_is_a_one_line_error(tmp_path, capsys, toy_data):
    from fedlora.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f"""
model = {{path = '{empty}'}}
[data]
name = 'none'
path = '{toy_data['path']}'
eval_path = '{toy_data['eval_path']}'
text_columns = ['sentence']
label_column = 'label'
""")
    code = main(["run", str(config), "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"fedlora: error: model: cannot load '{empty}'") and err.count("\n") == 1


def test_comm_fedsb_setup_on_public_data_uploads_nothing():
    from fedlora.comm import communication_report

    d, r, layers = 384, 8, 12
    public = build_config({"fedsb": {"init_data": "public", "public_data": {"name": "imdb"}}})
    clients = communication_report("minilm-l6", "fedsb", r, target_modules=["query", "value"])
    on_public = communication_report("minilm-l6", "fedsb", r, target_modules=["query", "value"], settings=public)
    assert clients["init"]["params_up"] == layers * 2 * (r + 8) * d and on_public["init"]["params_up"] == 0
    assert clients["init"]["params_down"] == layers * (r + 8 + r * 2) * d  # Q, then B and A
    assert on_public["init"]["params_down"] == layers * r * 2 * d


# -- the command line's final line, --version, --help --------------------------------------------

def _toml(cfg, path):
    import tomli_w

    raw = cfg.model_dump(exclude_defaults=True)
    raw["data"]["name"] = "none"  # TOML has no None
    path.write_bytes(tomli_w.dumps(raw).encode())
    return path


@pytest.mark.parametrize("privacy", [None, "example", "client"])
def test_run_prints_one_round_and_the_privacy_spent(sim_config, tmp_path, capsys, privacy):
    from fedlora.cli import main

    extra = {"example": {"privacy": {"noise_multiplier": 1.0, "randomness": "seeded"}},
             "client": {"privacy": {"unit": "client", "noise_multiplier": 1.0, "randomness": "seeded"}}}
    cfg = sim_config(method={"name": "ffa"}, federation={"rounds": 1}, **extra.get(privacy, {}))
    out = tmp_path / "run"
    assert main(["run", str(_toml(cfg, tmp_path / "c.toml")), "--quiet", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    summary = json.loads((out / "summary.json").read_text())
    assert line.startswith("ffa: 1 round, final accuracy") and line.endswith(f" -> {out}")
    spent = summary["privacy"]
    if privacy is None:
        assert spent is None and "epsilon" not in line
    elif privacy == "example":
        assert spent["epsilon_max"] > 0
        assert f"; epsilon {spent['epsilon_max']:.3g} (delta {spent['delta']:g}, per example" in line
    else:
        assert spent["unit"] == "client" and spent["epsilon"] > 0
        assert f"; epsilon {spent['epsilon']:.3g} (delta {spent['delta']:g}, per client)" in line


def test_version_is_the_installed_one(capsys):
    from importlib.metadata import version

    from fedlora.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"fedlora {version('fedlora')}\n"


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["eval", "--help"], ["flower", "run", "--help"]])
def test_help_does_not_import_torch(argv):
    import subprocess
    import sys

    code = ("import sys\nfrom fedlora.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert "usage: fedlora" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "no torch", done.stderr


def test_one_override_string_is_one_override():
    import fedlora

    assert fedlora.make_config({"train": {"lr": 0.1}}, "train.lr=0.5").train.lr == 0.5
    assert fedlora.load_config(None, "federation.rounds = 7").federation.rounds == 7
    with pytest.raises(ConfigError, match=r"^overrides: expected a list of 'section.key=value' strings, got "
                                          r"\{'train.lr': 0.5\}$"):
        fedlora.make_config(None, {"train.lr": 0.5})


def test_eval_of_a_config_file_says_it_is_not_a_run_folder(tmp_path, capsys):
    config = tmp_path / "base.toml"
    config.write_text("[method]\nname = 'ffa'\n")
    assert main(["eval", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == (f"fedlora: error: {config}: a file, not a run folder (the folder `fedlora run --out` writes, "
                   "with summary.json, rounds.jsonl and the trained adapter)\n")


@pytest.mark.parametrize("overrides, message", [
    (["train.momentum=0.9"], r"train.momentum = 0.9 has no effect with train.optimizer = 'adamw'"),
    (["data.partition='iid'", "data.dirichlet_alpha=0.1"],
     r"data.dirichlet_alpha = 0.1 has no effect with data.partition = 'iid'"),
])
def test_a_setting_without_effect_is_refused_naming_both_keys(overrides, message):
    from fedlora.api import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    load_config(None, ["train.optimizer='sgd'", "train.momentum=0.9"])  # where they apply, they are taken
    load_config(None, ["data.partition='dirichlet'", "data.dirichlet_alpha=0.1"])
    load_config(None, ["data.partition='iid'", "data.dirichlet_alpha=0.5"])  # the default: nothing is lost


def test_another_methods_settings_are_a_warning_on_the_console_and_in_the_summary(sim_config, tmp_path, capsys):
    from fedlora.simulator import Simulator

    cfg = sim_config(method={"name": "ffa"}, federation={"rounds": 1}, fedsb={"init_examples": 48, "init": "dense"},
                     hetlora={"decay": 0.5})
    summary = Simulator(cfg, tmp_path, progress=True).run()
    expected = ["fedsb.init, fedsb.init_examples have no effect with method.name = 'ffa' (only a method of the "
                "fedsb family reads them)",
                "hetlora.decay has no effect with method.name = 'ffa' (only a method of the hetlora family reads "
                "them)"]
    assert summary["warnings"] == expected
    printed = capsys.readouterr().err
    assert all(f"warning: {w}" in printed for w in expected)
    assert METHODS["fedsb"].ignored_settings(sim_config(method={"name": "fedsb"}, fedsb={"init_examples": 48})) == []


def test_a_config_files_paths_resolve_against_its_folder_and_set_against_the_working_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder / "c.toml").write_text(
        '[model]\npath = "../models/tiny"\n[data]\nname = "none"\npath = "data/train.csv"\n'
        f'eval_path = "{tmp_path / "elsewhere" / "dev.csv"}"\nroot = "~/presets"\n'
        '[fedsb]\ninit_data = "public"\n[fedsb.public_data]\nname = "none"\npath = "public.csv"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(folder / "c.toml")
    assert cfg.model.path == str(tmp_path / "project" / "models" / "tiny")
    assert cfg.data.path == str(folder / "data" / "train.csv")
    assert cfg.data.eval_path == str(tmp_path / "elsewhere" / "dev.csv")  # absolute paths stay as written
    assert cfg.data.root == str(Path("~/presets").expanduser())
    assert cfg.fedsb.public_data.path == str(folder / "public.csv")
    # a relative config path gives paths relative to the working folder, as short as the user wrote them
    monkeypatch.chdir(tmp_path / "project")
    assert load_config("configs/c.toml").data.path == "configs/data/train.csv"
    # --set values are the command line's: relative to the working folder
    assert load_config("configs/c.toml", ["data.path='mine.csv'"]).data.path == "mine.csv"


def test_a_config_run_from_another_folder_finds_its_data(tmp_path, monkeypatch, capsys, tiny_bert_dir):
    from conftest import ROOT

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "news"
    assert main(["run", str(ROOT / "examples" / "news.toml"), "--quiet", "--out", str(out),
                 "--set", f"model.path='{tiny_bert_dir}'", "--set", "federation.rounds=1",
                 "--set", "train.local_steps=1", "--set", "eval.max_examples=16"]) == 0
    config = json.loads((out / "summary.json").read_text())["config"]
    assert config["data"]["path"] == str(ROOT / "examples" / "data" / "news_train.csv")


def test_none_sets_a_key_back_to_its_default_of_none():
    assert build_config({"fedsb": {"init_lr": "none"}}).fedsb.init_lr is None  # the reference's rule
    assert build_config({"privacy": {"epsilon": "none"}}).privacy.epsilon is None
    with pytest.raises(ConfigError, match="fedsb.init_lr"):
        build_config({"fedsb": {"init_lr": "fast"}})
