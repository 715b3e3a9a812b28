"""`fedlora methods` (every registered method as its class declares it) and `fedlora show` (a finished run as its
folder records it)."""
import re
from pathlib import Path

import pytest

from fedlora.api import make_config
from fedlora.cli import main
from fedlora.errors import ConfigError
from fedlora.methods import METHODS
from fedlora.methods.ffa import FFALoRA
from fedlora.simulator import Simulator

from conftest import read_log

ROOT = Path(__file__).resolve().parents[1]


def method_lines(capsys) -> dict[str, str]:
    assert main(["methods"]) == 0
    return dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())


def test_every_registered_method_has_a_line_from_its_class(capsys, monkeypatch):
    class Summed(FFALoRA):
        name = "summed-b"
        exact = None

    class Stacked(FFALoRA):
        name = "stacked-b"
        trains = uploads = ("lora_A", "lora_B")
        summed, exact = False, False

    monkeypatch.setitem(METHODS, Summed.name, Summed)
    monkeypatch.setitem(METHODS, Stacked.name, Stacked)
    lines = method_lines(capsys)
    assert list(lines) == list(METHODS)
    assert lines["summed-b"] == ("trains B, head; sends B, head; exact aggregation: not stated; client-level DP: yes; "
                                 "SecAgg+: yes")
    assert lines["stacked-b"] == ("trains A, B, head; sends A, B, head; exact aggregation: no; client-level DP: no "
                                  "(its server rule is not a sum); SecAgg+: no")


def test_exact_aggregation_agrees_with_the_readmes_methods_table(capsys):
    lines = method_lines(capsys)
    rows = [line.split(" | ") for line in (ROOT / "README.md").read_text().splitlines()
            if re.match(r"\| .*\(`\w+`\) \|", line)]
    table = {re.search(r"\(`(\w+)`\)", row[0]).group(1): row[4] for row in rows}
    assert len(table) == 11
    for name, exact in table.items():
        said = re.search(r"exact aggregation: (\w+)", lines[name]).group(1)
        assert exact.startswith(said), (name, exact, said)


def test_client_level_dp_support_is_what_a_config_gets(capsys):
    lines = method_lines(capsys)
    for name in ("fedit", "ffa", "fedsb", "fedex", "flora", "fedsa", "full", "fedsvd", "rolora", "flexlora", "hetlora"):
        said = re.search(r"client-level DP: ([^;]+);", lines[name]).group(1)
        try:
            make_config({"method": {"name": name}, "privacy": {"unit": "client", "noise_multiplier": 1.0}})
            refused = None
        except ConfigError as err:
            refused = str(err)
        if said == "yes":
            assert refused is None, name
        elif said.startswith("yes, with a set-up"):
            assert "set-up exchange reads the clients' data" in refused, name
        else:
            assert "cannot be private at the client level" in refused, name


def test_the_documented_methods_listing_is_the_commands(capsys):
    docs = (ROOT / "docs" / "running.md").read_text()
    built_in = [name for name, method in METHODS.items() if method.__module__.startswith("fedlora.methods.")]
    lines = method_lines(capsys)  # other tests may have registered methods of their own: those are left out
    shown = "".join(f"    {name}: {lines[name]}\n" for name in built_in)
    assert len(built_in) == 11 and "    $ fedlora methods\n" + shown + "\n" in docs


def test_show_reads_a_finished_run(sim_config, tmp_path, capsys):
    cfg = sim_config(method={"name": "ffa"}, federation={"rounds": 2},
                     privacy={"noise_multiplier": 1.0, "randomness": "seeded"})
    out = tmp_path / "run"
    Simulator(cfg, out, progress=False).run()
    log = read_log(out)
    assert main(["show", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{out}: ffa, 2 of 2 rounds logged, model {cfg.model.path}"
    assert lines[1] == (f"config: data {cfg.data.path} (dirichlet partition), 4 clients, 3 per round; adapter rank 4; "
                        "3 local steps of batch 8 at lr 0.01; seed 3")
    assert lines[2].startswith(f"final: accuracy {log[-1]['eval']['accuracy']:.4f}, loss "
                               f"{log[-1]['eval']['loss']:.4f} (chance 0.5000")
    assert lines[3].startswith(f"privacy: epsilon {log[-1]['epsilon']:.3g} (delta ")
    assert lines[4] == (f"traffic: {sum(r['bytes_up'] for r in log):,} bytes up, "
                        f"{sum(r['bytes_down'] for r in log):,} bytes down")
    assert lines[5].startswith(f"wall time: {sum(r['seconds'] for r in log):.1f} s over the logged rounds")


def test_show_of_a_folder_that_holds_no_finished_run(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"fedlora: error: {tmp_path}: not a finished run (no summary.json")
