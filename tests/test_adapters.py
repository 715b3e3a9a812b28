"""Adapters against PEFT: the forward pass, and the exported adapter loaded by PeftModel."""
import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertForSequenceClassification, GPT2ForSequenceClassification

from fedlora.adapters import AdaptedModel
from fedlora.errors import ConfigError

from conftest import tiny_bert, tiny_gpt2


def adapt(model, parameterisation="lora", rank=4, scaling=2.0, targets=("query", "value"), heads=("classifier",)):
    return AdaptedModel(model, parameterisation=parameterisation, rank=rank, scaling=scaling,
                        target_modules=list(targets), head_modules=list(heads))


def randomise(adapted, seed=1):
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in adapted.state().items()}
    adapted.load_state(state)
    return state


def tokens(vocab=30522, batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # padded example
    return {"input_ids": ids, "attention_mask": mask}


def peft_twin(model, adapted, state, fan_in_fan_out=False):
    """The same adapter built with PEFT, its factors copied from our state."""
    cfg = LoraConfig(r=adapted.rank, lora_alpha=adapted.scaling * adapted.rank, target_modules=sorted(adapted.layers),
                     modules_to_save=adapted.head_modules, fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    sd = {}
    for name in adapted.layers:
        B = state[f"{name}.lora_B"]
        if f"{name}.lora_R" in state:
            B = B @ state[f"{name}.lora_R"]
        sd[f"base_model.model.{name}.lora_A.default.weight"] = state[f"{name}.lora_A"]
        sd[f"base_model.model.{name}.lora_B.default.weight"] = B
    for k in adapted.head_params:
        module, _, param = k.rpartition(".")
        sd[f"base_model.model.{module}.modules_to_save.default.{param}"] = state[k]
    missing = set(sd) - set(peft_model.state_dict())
    assert not missing, missing
    peft_model.load_state_dict(sd, strict=False)
    return peft_model.eval()


@pytest.mark.parametrize("parameterisation", ["lora", "lorasb"])
def test_forward_matches_peft_bert(parameterisation):
    base = tiny_bert()
    ours = copy.deepcopy(base)
    adapted = adapt(ours, parameterisation)
    state = randomise(adapted)
    batch = tokens()
    with torch.no_grad():
        expected = peft_twin(base, adapted, state)(**batch).logits
        got = ours(**batch).logits
    assert (got - expected).abs().max() < 1e-5
    assert (got - tiny_bert()(**batch).logits).abs().max() > 1e-3  # the adapter does change the output


def test_forward_matches_peft_gpt2_conv1d():
    base = tiny_gpt2()
    ours = copy.deepcopy(base)
    adapted = adapt(ours, "lora", targets=("c_attn", "c_fc"), heads=("score",))
    assert all(layer.transposed for layer in adapted.layers.values())
    state = randomise(adapted)
    batch = {"input_ids": torch.randint(2, 64, (2, 6))}
    with torch.no_grad():
        expected = peft_twin(base, adapted, state, fan_in_fan_out=True)(**batch).logits
        got = ours(**batch).logits
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("parameterisation", ["lora", "lorasb"])
def test_export_loads_in_peft_with_same_logits(tmp_path, parameterisation):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    ours = copy.deepcopy(base)
    adapted = adapt(ours, parameterisation, targets=("query", "key", "value", "dense"))
    state = randomise(adapted)
    adapted.export_peft(tmp_path / "adapter", state, base_model=str(tmp_path / "base"), task_type="SEQ_CLS")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] / config["r"] == pytest.approx(adapted.scaling)

    fresh = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    fresh.classifier.weight.data.zero_()  # the head must come from the adapter's modules_to_save
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    batch = tokens()
    with torch.no_grad():
        diff = (loaded(**batch).logits - ours(**batch).logits).abs().max()
    assert diff < 1e-5


def test_export_gpt2_conv1d(tmp_path):
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    ours = copy.deepcopy(base)
    adapted = adapt(ours, "lora", targets=("c_attn", "c_proj", "c_fc"), heads=("score",))
    state = randomise(adapted)
    adapted.export_peft(tmp_path / "adapter", state, base_model=None, task_type="SEQ_CLS")
    loaded = PeftModel.from_pretrained(GPT2ForSequenceClassification.from_pretrained(tmp_path / "base"),
                                       tmp_path / "adapter").eval()
    batch = {"input_ids": torch.randint(2, 64, (2, 6))}
    with torch.no_grad():
        assert (loaded(**batch).logits - ours(**batch).logits).abs().max() < 1e-5


def test_state_roundtrip_and_trainable_selection():
    adapted = adapt(tiny_bert(), "lorasb")
    state = randomise(adapted, seed=4)
    assert all(torch.equal(adapted.state()[k], v) for k, v in state.items())
    keys = adapted.keys_of(("lora_R",))
    assert keys and all(k.endswith("lora_R") or k.startswith("classifier") for k in keys)
    params = adapted.set_trainable(keys)
    assert len(params) == len(keys)
    trainable = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert all(n.endswith("lora_R") or n.startswith("classifier") for n in trainable)


def test_lora_init_is_seeded_and_differs_per_layer():
    adapted = adapt(tiny_bert())
    a = adapted.lora_init(torch.Generator().manual_seed(0))
    b = adapted.lora_init(torch.Generator().manual_seed(0))
    names = list(adapted.layers)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[f"{names[0]}.lora_A"], a[f"{names[1]}.lora_A"])
    assert all(not a[f"{n}.lora_B"].any() for n in names)
    bound = 1 / adapted.layers[names[0]].d_in ** 0.5  # kaiming_uniform(a=sqrt(5)) bound
    assert a[f"{names[0]}.lora_A"].abs().max() <= bound


def test_merge_into_base_in_real_layout():
    model = tiny_gpt2()
    adapted = adapt(model, "lora", targets=("c_fc",), heads=("score",))
    name, layer = next(iter(adapted.layers.items()))
    x = torch.randn(2, layer.d_in)
    before = layer(x)
    delta = torch.randn(layer.d_out, layer.d_in)
    layer.add_to_base(delta)
    assert torch.allclose(layer(x), before + x @ delta.T, atol=1e-5)


def test_bad_targets_and_rank_are_config_errors():
    with pytest.raises(ConfigError, match="adapter.target_modules"):
        adapt(tiny_bert(), targets=("nonexistent_proj",))
    with pytest.raises(ConfigError, match="adapter.rank 64 is larger than layer"):
        adapt(tiny_bert(), rank=64)
    with pytest.raises(ConfigError, match="adapter.modules_to_save"):
        adapt(tiny_bert(), heads=("lm_head",))


@pytest.mark.parametrize("model_fn,targets,heads", [(tiny_bert, ("query", "dense"), ("classifier",)),
                                                    (tiny_gpt2, ("c_attn", "c_fc"), ("score",))])
def test_merge_keeps_the_function(model_fn, targets, heads):
    model = model_fn()
    adapted = adapt(model, "lorasb", targets=targets, heads=heads)
    randomise(adapted, seed=2)
    batch = {"input_ids": torch.randint(2, 60, (2, 6))}
    with torch.no_grad():
        before = model(**batch).logits
        adapted.merge()
        after = model(**batch).logits
    assert all(not layer.lora_B.any() for layer in adapted.layers.values())
    assert (before - after).abs().max() < 1e-5
    assert (after - model_fn()(**batch).logits).abs().max() > 1e-3  # W0 did change
