"""Using a finished run: `fedlora eval`, `predict` and `export --merged`, checked against the run's own figures,
PEFT's loading of the exported adapter, and transformers' loading of the merged folder."""
import json
import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import fedlora
from fedlora.cli import main
from fedlora.errors import FedloraError
from fedlora.inference import load_trained
from fedlora.simulator import Simulator

from conftest import config_with

TOPICS = {1: ["stocks fell", "the market rose", "bank profits"], 2: ["the team won", "a late goal", "cup final"],
          3: ["new phone chip", "a software update", "faster laptops"], 4: ["the election", "a new law", "voters"]}


def news_rows(rnd: random.Random, n: int) -> str:
    """Headerless CSV rows: label (1-4, as AG News ships them), title, description."""
    rows = []
    for _ in range(n):
        label = rnd.randint(1, 4)
        rows.append(f'{label},"{rnd.choice(TOPICS[label])}","{rnd.choice(["today", "again", "at last"])}"')
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def news(tmp_path_factory):
    path = tmp_path_factory.mktemp("news")
    rnd = random.Random(0)
    (path / "train.csv").write_text(news_rows(rnd, 96))
    (path / "test.csv").write_text(news_rows(rnd, 40))
    (path / "other.csv").write_text(news_rows(rnd, 24))
    return path


def news_config(tiny_bert_dir, news, method="fedsb", **sections):
    raw = {
        "seed": 2, "method": {"name": method}, "model": {"path": tiny_bert_dir}, "adapter": {"rank": 4},
        "data": {"name": "none", "path": str(news / "train.csv"), "eval_path": str(news / "test.csv"),
                 "header": False, "text_columns": [1, 2], "label_column": 0, "max_length": 16},
        "federation": {"num_clients": 3, "clients_per_round": 2, "rounds": 2},
        "train": {"local_steps": 2, "batch_size": 8, "lr": 0.02},
        "eval": {"every": 1, "batch_size": 7, "max_examples": 30},
        "fedsb": {"init_examples": 24},
    }
    return config_with(raw, sections)


@pytest.fixture(scope="module")
def news_run(tiny_bert_dir, news, tmp_path_factory):
    out = tmp_path_factory.mktemp("news-run")
    summary = Simulator(news_config(tiny_bert_dir, news), out, progress=False).run()
    return out, summary


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_headerless_labels_1_to_4_train_as_four_classes(news_run, tiny_bert_dir):
    out, summary = news_run
    assert summary["labels"] == ["1", "2", "3", "4"]
    labels = json.loads((out / "adapter" / "labels.json").read_text())
    assert labels == json.loads((out / "labels.json").read_text())
    assert labels["num_labels"] == 4 and labels["id2label"] == {"0": "1", "1": "2", "2": "3", "3": "4"}
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == tiny_bert_dir  # model.path as configured
    # the export loads in PEFT with num_labels = 4 (a 5-way head, from labels read as ids, would not); the
    # tiny base model was saved with a 2-way head of its own
    base = AutoModelForSequenceClassification.from_pretrained(adapter["base_model_name_or_path"], **labels,
                                                              ignore_mismatched_sizes=True)
    assert base.config.num_labels == 4
    PeftModel.from_pretrained(base, out / "adapter")


def test_preset_export_names_the_hub_id_and_loads_with_its_labels(news, tmp_path):
    from conftest import minilm_path

    local = minilm_path()
    cfg = news_config(local, news, method="ffa", model={"name": "minilm-l6", "path": None},
                      federation={"num_clients": 2, "clients_per_round": 1, "rounds": 1},
                      train={"local_steps": 1}, eval={"every": 0, "max_examples": 8})
    summary = Simulator(cfg, tmp_path, progress=False).run()
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert summary["model_source"] == local  # where the weights were read from, recorded apart
    labels = json.loads((tmp_path / "adapter" / "labels.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(summary["model_source"], **labels)
    PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert base.config.num_labels == 4 and list(base.config.id2label.values()) == ["1", "2", "3", "4"]


def test_eval_reproduces_the_runs_final_figures(news_run, capsys):
    out, summary = news_run
    code, printed, err = run_cli(capsys, "eval", out, "--json")
    assert code == 0, err
    metrics = json.loads(printed)
    assert metrics["accuracy"] == summary["final_eval"]["accuracy"]
    assert metrics["loss"] == summary["final_eval"]["loss"]
    assert {k for k in metrics if k.startswith("accuracy/")} <= {f"accuracy/{n}" for n in ("1", "2", "3", "4")}


def test_predict_matches_the_peft_loaded_export_and_eval_per_class(news_run, news, capsys):
    out, _ = news_run
    lines = (news / "other.csv").read_text().splitlines()
    gold = [line.split(",")[0] for line in lines]
    texts = [[field.strip('"') for field in line.split(",")[1:]] for line in lines]
    inputs = out / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"text": a, "text_pair": b}) + "\n" for a, b in texts))
    code, printed, err = run_cli(capsys, "predict", out, "--input", inputs)
    assert code == 0, err
    predicted = [json.loads(line) for line in printed.splitlines()]
    assert len(predicted) == len(texts) and all(p["label"] == str(p["id"] + 1) for p in predicted)

    adapter = out / "adapter"
    labels = json.loads((adapter / "labels.json").read_text())
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        base_path, **labels, ignore_mismatched_sizes=True), adapter).eval()
    run = load_trained(out)
    enc = run.task.tokenizer([a for a, _ in texts], [b for _, b in texts], truncation=True, max_length=16,
                             padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = peft(**enc).logits.argmax(-1).tolist()
    assert [p["id"] for p in predicted] == ids
    assert [p["label"] for p in predicted] == [labels["id2label"][str(k)] for k in ids]

    # per-class figures on another file: each class's share of its rows predicted right
    code, printed, err = run_cli(capsys, "eval", out, "--data", news / "other.csv", "--json",
                                 "--set", "eval.max_examples=1000")
    assert code == 0, err
    metrics = json.loads(printed)
    hits = [p["label"] == g for p, g in zip(predicted, gold)]
    assert metrics["accuracy"] == pytest.approx(sum(hits) / len(hits))
    for name in sorted(set(gold)):
        mine = [h for h, g in zip(hits, gold) if g == name]
        assert metrics[f"accuracy/{name}"] == pytest.approx(sum(mine) / len(mine))


def test_merged_export_computes_the_adapted_model(news_run, tmp_path, capsys):
    out, _ = news_run
    code, printed, err = run_cli(capsys, "export", out, "--merged", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "1", 1: "2", 2: "3", 3: "4"}
    run = load_trained(out)
    batch = run.task.batch(range(16), run.load_eval_data())
    batch.pop("labels")
    with torch.no_grad():
        ours, theirs = run.model(**batch).logits, merged(**batch).logits
    assert ours.std() > 0
    assert (ours - theirs).abs().max() < 1e-5
    code, _, err = run_cli(capsys, "export", out, "--merged", tmp_path / "merged")
    assert code == 2 and "not an empty folder" in err


def test_run_folder_errors(news_run, tmp_path, capsys):
    out, _ = news_run
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert code == 2 and "not a finished run (no summary.json" in err
    with pytest.raises(FedloraError, match=r"not a finished run \(no summary.json.*--resume"):
        fedlora.load_run(tmp_path)  # the Python API reads run folders through the same reader
    # a trained run is the run folder of the Python API with its model
    run, read = load_trained(out), fedlora.load_run(out)
    assert isinstance(run, fedlora.Run) and (run.out, run.rounds, run.summary) == (read.out, read.rounds, read.summary)
    assert run.final_eval == read.final_eval and run.adapter_path == read.adapter_path == out / "adapter"
    code, _, err = run_cli(capsys, "eval", out, "--set", "adapter.rank=2")
    assert code == 2 and "--set adapter.rank: only data.*, eval.* and device" in err
    code, _, err = run_cli(capsys, "eval", out, "--data", "nosuch")
    assert code == 2 and "--data nosuch: neither a file nor a data set preset" in err
    bad = tmp_path / "bad.csv"
    bad.write_text('5,"a","b"\n')
    code, _, err = run_cli(capsys, "eval", out, "--data", bad)
    assert code == 2 and f"{bad} line 1: label 5 does not occur in the training data" in err
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a", "text_pair": "b"}\n{"title": "b"}\n')
    code, printed, err = run_cli(capsys, "predict", out, "--input", inputs)
    assert code == 2 and f"{inputs}: 1 of 2 input lines could not be used (line 2)" in err
    assert json.loads(printed.splitlines()[1]) == {"line": 2, "error": "no key 'text' (keys: title)"}


MIXED = [  # (input line, why it cannot be used, or None)
    ('{"text": "stocks fell", "text_pair": "today"}', None),
    ("", "blank line (no text)"),
    ('{"text": "stocks up"', "not a valid JSON object (Expecting ',' delimiter at column 21)"),
    ("the team won\tagain", None),
    ('{"text": "", "text_pair": "again"}', "'text' is empty"),
    ("   ", "blank line (no text)"),
    ('"a late goal"', "expected 2 texts (text and text_pair), got 1: this model classifies pairs"),
    ('{"title": "b", "text_pair": "c"}', "no key 'text' (keys: title, text_pair)"),
    ('["cup final", "at last"]', None),
    ('{"text": "a new law", "text_pair": 7}', "'text_pair' is not text (a JSON int)"),
    ('"Voters" queue\tat last', None),  # plain text that starts with a quote
]


def test_predict_answers_every_input_line_in_order(news_run, tmp_path, capsys, monkeypatch):
    out, _ = news_run
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("".join(line + "\n" for line, _ in MIXED))
    code, printed, err = run_cli(capsys, "predict", out, "--input", mixed)
    results = [json.loads(line) for line in printed.splitlines()]
    assert len(results) == len(MIXED)
    bad = [n for n, (_, why) in enumerate(MIXED, 1) if why]
    assert code == 2 and err.strip().splitlines() == [
        f"fedlora: error: {mixed}: {len(bad)} of {len(MIXED)} input lines could not be used "
        f"(lines {', '.join(map(str, bad))}): see their output lines"]
    # the usable lines, alone, are predicted exactly as among the others
    good = tmp_path / "good.txt"
    good.write_text("".join(line + "\n" for line, why in MIXED if why is None))
    code, printed, err = run_cli(capsys, "predict", out, "--input", good)
    assert code == 0, err
    alone = iter(json.loads(line) for line in printed.splitlines())
    for n, ((_, why), result) in enumerate(zip(MIXED, results), 1):
        assert result == ({"line": n, "error": why} if why else next(alone))
    assert "label" in results[0] and next(alone, None) is None

    monkeypatch.setattr("sys.stdin", iter([]))
    code, printed, err = run_cli(capsys, "predict", out)
    assert (code, printed) == (2, "") and len(err.strip().splitlines()) == 1
    assert "<stdin>: no input lines" in err
    (tmp_path / "empty.txt").write_text("")
    code, printed, err = run_cli(capsys, "predict", out, "--input", tmp_path / "empty.txt")
    assert (code, printed) == (2, "") and f"{tmp_path / 'empty.txt'}: no input lines" in err


@pytest.mark.slow
def test_language_model_predict_and_merged_export(lm_config, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    summary = Simulator(lm_config(), out, progress=False).run()
    assert "labels" in summary and summary["labels"] is None and not (out / "labels.json").exists()
    code, printed, err = run_cli(capsys, "eval", out, "--json")
    assert code == 0, err
    assert json.loads(printed) == summary["final_eval"]
    monkeypatch.setattr("sys.stdin", iter(["What is 2 plus 3?\n", '{"prompt": "Is this review positive? fun"}\n']))
    code, printed, err = run_cli(capsys, "predict", out, "--set", "eval.max_new_tokens=5")
    assert code == 0, err
    generations = [json.loads(line)["generation"] for line in printed.splitlines()]
    assert len(generations) == 2
    code, _, err = run_cli(capsys, "export", out, "--merged", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    run = load_trained(out)
    batch = run.task.batch(range(4), run.load_eval_data())
    with torch.no_grad():
        ours = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["fedex", "full"])
def test_methods_that_change_the_base_weights(tiny_bert_dir, news, tmp_path, capsys, method):
    out = tmp_path / "run"
    summary = Simulator(news_config(tiny_bert_dir, news, method=method), out, progress=False).run()
    code, printed, err = run_cli(capsys, "eval", out, "--json")
    assert code == 0, err
    assert {k: v for k, v in json.loads(printed).items() if "/" not in k} == summary["final_eval"]
    code, _, err = run_cli(capsys, "export", out, "--merged", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    run = load_trained(out)
    batch = run.task.batch(range(16), run.load_eval_data())
    batch.pop("labels")
    with torch.no_grad():
        assert (run.model(**batch).logits - merged(**batch).logits).abs().max() < 1e-5
    saved = out / ("model" if method == "full" else "base_model") / "config.json"
    assert json.loads(saved.read_text())["id2label"] == {"0": "1", "1": "2", "2": "3", "3": "4"}
