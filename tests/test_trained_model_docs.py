"""The documented commands for one's own data and a trained model run exactly as written, in a copy of
examples/ beside the checkout's environment, on the real MiniLM."""
import json
import os
import shutil
import subprocess
import tomllib

import pytest

from conftest import ROOT, minilm_path

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

from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

summary = json.load(open("runs/news/summary.json"))
labels = json.load(open("runs/news/adapter/labels.json"))
base = AutoModelForSequenceClassification.from_pretrained(summary["model_source"], **labels)
adapter = PeftModel.from_pretrained(base, "runs/news/adapter").eval()
merged = AutoModelForSequenceClassification.from_pretrained("runs/news-merged").eval()
tokenizer = AutoTokenizer.from_pretrained("runs/news-merged")
batch = tokenizer(["The striker scores twice in the derby on Sunday."], return_tensors="pt")
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
