"""Configs and the command line: bad input gives one line naming the key or the file."""
import json

import pytest

from fedlora.api import load_config, make_config as build_config
from fedlora.cli import main
from fedlora.config import apply_overrides
from fedlora.errors import ConfigError


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
