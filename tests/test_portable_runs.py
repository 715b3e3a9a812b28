"""A finished run folder is self-contained: moved elsewhere, its training data deleted and used from another
folder, `fedlora eval --data`, `predict` and `export --merged` still work, for runs of every method, runs made
from the Python API on data held in memory, and runs of a method registered from a module of one's own. The
oracles: the figures the run itself logged while training, and the merged folder loaded by transformers alone."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import fedlora
from fedlora.cli import main
from fedlora.methods import METHODS
from fedlora.simulator import Simulator

from conftest import config_with

ALL_METHODS = ["fedit", "ffa", "fedsb", "fedex", "flora", "fedsa", "fedsvd", "rolora", "flexlora", "hetlora", "full"]
QUICK = {"fedsb", "flora", "full"}  # one of each kind: W0 untouched, W0 changed by the adapters, no adapter


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_run_config(tiny_bert_dir, method: str, data: dict):
    raw = {"seed": 4, "method": {"name": method}, "model": {"path": tiny_bert_dir}, "adapter": {"rank": 2},
           "data": {"name": None, "text_columns": ["sentence"], "label_column": "label", "max_length": 12,
                    "partition": "iid", **data},
           "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 2},
           "train": {"local_steps": 2, "batch_size": 8, "lr": 0.05},
           "eval": {"every": 1, "batch_size": 5}, "fedsb": {"init_examples": 16}}
    return config_with(raw, {})


def gold_rows(path) -> list[tuple[str, str]]:
    """(text, label) of a TSV file with a header row."""
    return [tuple(line.split("\t")) for line in path.read_text().splitlines()[1:]]


def check_portable(capsys, run, rows, eval_file, tmp_path):
    """From a folder that is not the run's: eval --data reproduces the run's final figures, predict agrees
    with them and with the merged export loaded by transformers alone."""
    summary = json.loads((run / "summary.json").read_text())
    code, printed, err = cli(capsys, "eval", run, "--data", eval_file, "--json")
    assert code == 0, err
    metrics = json.loads(printed)
    assert (metrics["accuracy"], metrics["loss"]) == (summary["final_eval"]["accuracy"], summary["final_eval"]["loss"])

    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps(text) + "\n" for text, _ in rows))  # JSON strings
    code, printed, err = cli(capsys, "predict", run, "--input", inputs)
    assert code == 0, err
    predicted = [json.loads(line) for line in printed.splitlines()]
    assert len(predicted) == len(rows)
    hits = [p["label"] == gold for p, (_, gold) in zip(predicted, rows)]
    assert sum(hits) / len(hits) == pytest.approx(summary["final_eval"]["accuracy"])

    code, _, err = cli(capsys, "export", run, "--merged", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.model_max_length == 12  # the run's data.max_length, not the base tokenizer's
    batch = tokenizer([text for text, _ in rows], truncation=True, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] <= 12
    with torch.no_grad():
        probs = merged(**batch).logits.softmax(-1)
    assert [merged.config.id2label[k] for k in probs.argmax(-1).tolist()] == [p["label"] for p in predicted]
    assert [round(p, 6) for p in probs.max(-1).values.tolist()] == pytest.approx(
        [p["probability"] for p in predicted], abs=2e-6)


def no_absolute_paths_into(run, where):
    """Nothing the run wrote for its model names the folder it was written in."""
    for name in ["model.json", "adapter/adapter_config.json"]:
        if (run / name).exists():
            assert str(where) not in (run / name).read_text(), name


@pytest.mark.parametrize("method", [m if m in QUICK else pytest.param(m, marks=pytest.mark.slow)
                                    for m in ALL_METHODS])
def test_a_cli_run_moved_without_its_training_data(tiny_bert_dir, toy_data, tmp_path, capsys, monkeypatch, method):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    for key, name in (("path", "train.tsv"), ("eval_path", "dev.tsv")):
        shutil.copy(toy_data[key], work / "data" / name)
    monkeypatch.chdir(work)  # the config names its files relative to where the run starts, as a TOML file does
    cfg = tiny_run_config(tiny_bert_dir, method, {"path": "data/train.tsv", "eval_path": "data/dev.tsv"})
    Simulator(cfg, "runs/r", progress=False).run()
    no_absolute_paths_into(work / "runs" / "r", work / "runs")
    if method in ("fedex", "flora"):  # the changed W0 ships in the folder and the adapter names it relatively
        config = json.loads((work / "runs/r/adapter/adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "base_model"

    moved = tmp_path / "elsewhere" / "moved-run"
    moved.parent.mkdir()
    shutil.move(work / "runs" / "r", moved)
    (work / "data" / "train.tsv").unlink()
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    # the recorded evaluation file is still there (its path was made absolute): eval needs no --data
    code, printed, err = cli(capsys, "eval", moved, "--json")
    assert code == 0, err
    summary = json.loads((moved / "summary.json").read_text())
    assert {k: v for k, v in json.loads(printed).items() if "/" not in k} == summary["final_eval"]

    keep = tmp_path / "dev-copy.tsv"
    shutil.move(work / "data" / "dev.tsv", keep)
    code, _, err = cli(capsys, "eval", moved)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"the run's evaluation file {work / 'data' / 'dev.tsv'} is not there" in err and "--data FILE" in err
    check_portable(capsys, moved, gold_rows(keep), keep, tmp_path)


@pytest.mark.parametrize("method", [m if m in QUICK else pytest.param(m, marks=pytest.mark.slow)
                                    for m in ALL_METHODS])
def test_a_python_api_run_on_data_in_memory(tiny_bert_dir, toy_data, tmp_path, capsys, monkeypatch, method):
    def records(path):
        names = {"0": "neg", "1": "pos"}
        return [{"text": text, "label": names[label]} for text, label in gold_rows(path)]

    train, dev = records(Path(toy_data["path"])), records(Path(toy_data["eval_path"]))
    cfg = tiny_run_config(tiny_bert_dir, method, {"text_columns": None, "label_column": None}).to_dict()
    out = tmp_path / "api-run"
    fedlora.run(cfg, out=out, train_data=train, eval_data=dev, progress=False)
    moved = tmp_path / "moved" / "run"
    shutil.move(out, moved)
    monkeypatch.chdir(tmp_path / "moved")

    code, _, err = cli(capsys, "eval", moved)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the run's evaluation data was held in memory" in err and "--data FILE" in err
    eval_file = tmp_path / "dev.jsonl"
    eval_file.write_text("".join(json.dumps(row) + "\n" for row in dev))
    check_portable(capsys, moved, [(row["text"], row["label"]) for row in dev], eval_file, tmp_path)


CUSTOM = '''
import fedlora
from fedlora.methods import Method


@fedlora.register_method
class HalfStepFFA(Method):
    """FFA-LoRA whose server moves B only half way to the clients' average."""
    name = "half-step-ffa"
    trains = uploads = downloads = ("lora_B",)

    def aggregate(self, payloads, weights, clients, round_):
        from fedlora.methods import Aggregate
        for key in payloads[0]:
            mean = sum(w * p[key] for w, p in zip(weights, payloads))
            self.global_state[key] = 0.5 * (self.global_state[key] + mean)
        return Aggregate()
'''


@pytest.fixture
def registry():
    """The registry of methods as it was, after the test."""
    saved = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(saved)


def test_a_registered_methods_run_loads_through_its_import_path(tiny_bert_dir, toy_data, tmp_path, capsys,
                                                                monkeypatch, registry):
    package = tmp_path / "mine"
    package.mkdir()
    (package / "half_step_method.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(package))
    import half_step_method  # noqa: F401 - registers the method

    run = tmp_path / "run"
    Simulator(tiny_run_config(tiny_bert_dir, "half-step-ffa", dict(toy_data)), run, progress=False).run()
    record = json.loads((run / "model.json").read_text())
    assert record["method"] == {"name": "half-step-ffa", "class": "half_step_method:HalfStepFFA"}
    summary = json.loads((run / "summary.json").read_text())

    # a new process knows nothing of the method until the run's record has its module imported
    del METHODS["half-step-ffa"], sys.modules["half_step_method"]
    code, printed, err = cli(capsys, "eval", run, "--json")
    assert code == 0, err
    assert {k: v for k, v in json.loads(printed).items() if "/" not in k} == summary["final_eval"]
    assert METHODS["half-step-ffa"].__module__ == "half_step_method"

    del METHODS["half-step-ffa"], sys.modules["half_step_method"]
    (package / "half_step_method.py").unlink()
    for command in (["eval", run], ["predict", run, "--input", tmp_path / "none.txt"],
                    ["export", run, "--merged", tmp_path / "merged"]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert ("the run's method 'half-step-ffa' is the class HalfStepFFA of module 'half_step_method', which "
                "cannot be imported (ModuleNotFoundError") in err


def test_a_run_without_model_json_is_rebuilt_from_its_training_data(tiny_bert_dir, toy_data, tmp_path, capsys):
    """Runs of versions before model.json: usable while their training data is where the config names it."""
    work = tmp_path / "data"
    work.mkdir()
    paths = {key: shutil.copy(toy_data[key], work / f"{key}.tsv") for key in ("path", "eval_path")}
    run = tmp_path / "run"
    Simulator(tiny_run_config(tiny_bert_dir, "fedit", {k: str(v) for k, v in paths.items()}), run,
              progress=False).run()
    (run / "model.json").unlink()
    summary = json.loads((run / "summary.json").read_text())
    code, printed, err = cli(capsys, "eval", run, "--json")
    assert code == 0, err
    assert {k: v for k, v in json.loads(printed).items() if "/" not in k} == summary["final_eval"]
    paths["path"].unlink()
    code, _, err = cli(capsys, "eval", run, "--data", paths["eval_path"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{run} has no model.json (a run of an older fedlora)" in err and str(paths["path"]) in err
