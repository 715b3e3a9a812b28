"""The documented commands for one's own data and a trained model run exactly as written, in a copy of
examples/ beside the checkout's environment, on the real MiniLM."""
import json
import os
import shutil
import subprocess
import tomllib

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fedlora.cli import main
from fedlora.simulator import Simulator

from conftest import ROOT, config_with, minilm_path

COMMANDS = [
    ".venv/bin/fedlora config",
    ".venv/bin/fedlora run examples/news.toml --out runs/news",
    ".venv/bin/fedlora eval runs/news",
    ".venv/bin/fedlora eval runs/news --data examples/data/news_train.csv --set eval.max_examples=100",
    ".venv/bin/fedlora predict runs/news --input examples/data/news_inputs.jsonl",
    'echo "Shares fall after a profit warning, reports say." | .venv/bin/fedlora predict runs/news',
    ".venv/bin/fedlora export runs/news --merged runs/news-merged",
]

PYTHON = '''import json
from pathlib import Path

from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

run = Path("runs/news")
labels = json.loads((run / "adapter/labels.json").read_text())
# FedEx-LoRA and FLoRA changed W0 itself: their adapter applies to the run's base_model/
if (run / "base_model").is_dir():
    base_path = run / "base_model"
else:
    base_path = json.loads((run / "summary.json").read_text())["model_source"]
base = AutoModelForSequenceClassification.from_pretrained(base_path, **labels)
adapter = PeftModel.from_pretrained(base, run / "adapter").eval()
merged = AutoModelForSequenceClassification.from_pretrained("runs/news-merged").eval()
tokenizer = AutoTokenizer.from_pretrained("runs/news-merged")  # truncates at the run's data.max_length
batch = tokenizer(["The striker scores twice in the derby on Sunday."], truncation=True, return_tensors="pt")
print(labels["id2label"][str(adapter(**batch).logits.argmax(-1).item())],
      merged.config.id2label[merged(**batch).logits.argmax(-1).item()])
'''


@pytest.fixture(scope="module")
def shown(tmp_path_factory):
    """Every command's (stdout, stderr), run in order in a folder laid out like the checkout."""
    minilm_path()
    folder = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "examples", folder / "examples")
    (folder / ".venv").symlink_to(ROOT / ".venv")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    outputs = {}
    for command in COMMANDS:
        done = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        outputs[command] = (done.stdout, done.stderr)
    python = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", PYTHON], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=600)
    assert python.returncode == 0, python.stderr[-3000:]
    return folder, outputs, python.stdout


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
def test_commands_for_own_data_and_a_trained_model(shown):
    folder, outputs, printed = shown
    out = lambda i: outputs[COMMANDS[i]][0]  # noqa: E731
    assert tomllib.loads(out(0))["data"]["header"] is True
    summary = json.loads((folder / "runs/news/summary.json").read_text())
    assert summary["labels"] == ["1", "2", "3", "4"]
    assert outputs[COMMANDS[1]][1].startswith("4 classes in examples/data/news_train.csv")
    assert out(1).startswith("fedsb: 2 rounds, final accuracy")
    figures = out(2).splitlines()
    final = summary["final_eval"]
    assert figures[0] == f"accuracy {final['accuracy']:.4f}, loss {final['loss']:.4f} (80 examples)"
    assert [line.split(":")[0].strip() for line in figures[1:]] == [f"accuracy/{k}" for k in "1234"]
    assert out(3).splitlines()[0].endswith("(100 examples)")
    predictions = [json.loads(line) for line in out(4).splitlines()]
    assert [p["label"] for p in predictions] == ["2", "4"]  # sports, science and technology
    assert json.loads(out(5))["label"] == "3"  # business
    assert (folder / "runs/news-merged/model.safetensors").is_file()
    assert printed.split() == ["2", "2"]


def test_the_commands_are_the_documented_ones():
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    missing = [c for c in COMMANDS if f"    {c}\n" not in docs]
    assert not missing, f"not in README.md or docs/: {missing}"
    assert PYTHON in docs


ALL_METHODS = ["fedit", "ffa", "fedsb", "fedex", "flora", "fedsa", "fedsvd", "rolora", "flexlora", "hetlora", "full"]
QUICK = {"fedsb", "fedex", "flora", "full"}


@pytest.mark.parametrize("method", [m if m in QUICK else pytest.param(m, marks=pytest.mark.slow)
                                    for m in ALL_METHODS])
def test_the_documented_peft_snippet_predicts_as_fedlora(method, tiny_bert_dir, toy_data, tmp_path, capsys):
    """The snippet as documented, on a run of each method: PEFT's classes and probabilities are those of
    `fedlora predict` (full FedAvg, which writes no adapter: its model/ folder's, as documented)."""
    cfg = config_with({"seed": 1, "method": {"name": method}, "model": {"path": tiny_bert_dir},
                       "adapter": {"rank": 2},
                       "data": {"name": None, **toy_data, "text_columns": ["sentence"], "label_column": "label",
                                "max_length": 10, "partition": "iid"},
                       "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 3},
                       "train": {"local_steps": 3, "batch_size": 8, "lr": 0.05},
                       "eval": {"every": 0}, "fedsb": {"init_examples": 16}}, {})
    run, merged = tmp_path / "run", tmp_path / "merged"
    Simulator(cfg, run, progress=False).run()
    texts = [line.split("\t")[0] for line in open(toy_data["eval_path"]).read().splitlines()[1:]]
    texts.append("a longer review than the run's ten tokens, so that truncation decides what the model reads")
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("".join(json.dumps(t) + "\n" for t in texts))
    assert main(["predict", str(run), "--input", str(inputs)]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["export", str(run), "--merged", str(merged)]) == 0
    capsys.readouterr()

    namespace = {}
    if method == "full":
        assert not (run / "adapter").exists()
        model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
        exec(PYTHON.split("run = Path")[0], namespace)  # the imports
        namespace["tokenizer"] = namespace["AutoTokenizer"].from_pretrained(merged)
    else:
        exec(PYTHON.replace("runs/news-merged", str(merged)).replace("runs/news", str(run)), namespace)
        model = namespace["adapter"]
    with torch.no_grad():
        batch = namespace["tokenizer"](texts, truncation=True, padding=True, return_tensors="pt")
        probs = model(**batch).logits.softmax(-1)
    assert batch["input_ids"].shape[1] == 10
    assert probs.argmax(-1).tolist() == [p["id"] for p in predicted]
    assert probs.max(-1).values.tolist() == pytest.approx([p["probability"] for p in predicted], abs=2e-6)
    assert len(set(p["probability"] for p in predicted)) > 1  # a model that learned something
