"""What a run prints while it works, and the configuration reference printed from the schema."""
import tomllib

from conftest import ROOT
from fedlora.cli import main
from fedlora.config_reference import MARKDOWN_COMMAND
from fedlora.config import Config, build_config
from fedlora.simulator import Simulator


def test_non_interactive_output_has_one_plain_line_per_step(sim_config, tmp_path, capsys):
    Simulator(sim_config(method={"name": "fedsb"}), tmp_path, progress=True).run()
    err = capsys.readouterr().err  # not a terminal: no bars
    assert "\r" not in err and "it/s" not in err
    lines = err.splitlines()
    assert lines[0].startswith("2 classes in ") and "'0' -> 0 (" in lines[0]
    set_up = [line for line in lines if line.startswith("set-up: client")]
    assert len(set_up) >= 3 and set_up[0].endswith(" s)")  # one per client and phase of Fed-SB's set-up
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == ["round 0/2 (set-up)", "round 1/2", "round 2/2"]
    assert all("accuracy" in line and "bytes up" in line for line in rounds)
    assert sum(line.startswith("evaluating 32 examples") for line in lines) == 3  # rounds 0, 1, 2


def test_quiet_run_prints_nothing(sim_config, tmp_path, capsys):
    Simulator(sim_config(), tmp_path, progress=False).run()
    assert capsys.readouterr().err == ""


def test_fedlora_config_prints_every_key_with_its_default(capsys):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert build_config(tomllib.loads(text)).to_dict() == Config().to_dict()  # valid TOML at the defaults
    assert 'header = true  # CSV/TSV files start with a header row' in text
    assert "# holdout_fraction = (not set)  # evaluate on this fraction of the training data" in text
    for name, field in Config.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and hasattr(section, "model_fields"):
            assert f"[{name}]" in text
            for key, sub in section.model_fields.items():
                if sub.description and not hasattr(sub.annotation, "model_fields"):
                    assert sub.description in text, f"{name}.{key}"


def test_run_help_points_to_the_configuration_reference(capsys):
    try:
        main(["run", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert "fedlora config" in out and "docs/configuration.md" in out


def test_docs_configuration_md_is_generated_from_the_field_descriptions(capsys):
    assert main(["config", "--markdown"]) == 0
    page = capsys.readouterr().out
    assert "| `data.header` | `true` | CSV/TSV files start with a header row" in page
    assert "| `privacy.epsilon` | not set |" in page and "\n## [fedsb]\n" in page
    for section, fields in [("", Config.model_fields), *((f"{name}.", field.annotation.model_fields)
                                                         for name, field in Config.model_fields.items()
                                                         if hasattr(field.annotation, "model_fields"))]:
        for key, field in fields.items():
            assert f"| `{section}{key}` |" in page, f"{section}{key}"
    shown = (ROOT / "docs" / "configuration.md").read_text()
    assert shown == page, f"docs/configuration.md is out of date: regenerate it with `.venv/bin/{MARKDOWN_COMMAND}`"


def test_the_round_line_shows_the_set_ups_largest_step_against_the_base_weights():
    from fedlora.progress import round_line

    record = {"round": 0, "clients": [0, 1], "eval": {"accuracy": 0.5}, "bytes_up": 10, "seconds": 1.0,
              "delta_to_base": {"layer.0.query": 0.002, "layer.1.value": 0.31, "layer.1.query": 0.05}}
    line = round_line(record, 20)
    assert line.startswith("round 0/20 (set-up): 2 clients, accuracy 0.5000")
    assert "||initial delta||/||W0|| up to 0.31 (layer.1.value)" in line
    assert "initial delta" not in round_line(record | {"delta_to_base": None, "round": 1}, 20)
