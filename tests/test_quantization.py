"""model.quantization on the CPU: the setting, the refusals (each before any data or weights are read), and
float32 adapters on a base whose weight holds integers. The quantised run itself is in test_cuda.py."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedlora import models
from fedlora.adapters import AdaptedModel
from fedlora.errors import ConfigError, FedloraError
from fedlora.inference import export_merged
from fedlora.init_sb import gradient_sums, private_gradient_sum
from fedlora.methods import METHODS
from fedlora.simulator import Simulator

from conftest import config_with


def quantised_config(sim_config, tmp_path, **sections):
    """A config whose model folder and data files do not exist: a refusal that comes first names neither."""
    cfg = sim_config(**sections)
    raw = cfg.to_dict()
    raw["model"]["path"] = str(tmp_path / "no-model")
    raw["data"] |= {"path": str(tmp_path / "no-data.tsv"), "eval_path": str(tmp_path / "no-data.tsv")}
    return config_with(raw, {})


def test_the_setting_takes_none_4bit_or_8bit(sim_config):
    assert sim_config().model.quantization == "none"
    assert sim_config(model={"quantization": "4bit"}).model.quantization == "4bit"
    with pytest.raises(ConfigError, match="model.quantization"):
        sim_config(model={"quantization": "3bit"})


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_without_cuda_the_run_is_refused_before_loading_anything(sim_config, tmp_path, bits):
    cfg = quantised_config(sim_config, tmp_path, device="cpu", method={"name": "ffa"}, model={"quantization": bits})
    with pytest.raises(ConfigError, match=rf"model.quantization = '{bits}' needs a CUDA device .*'cpu'"):
        Simulator(cfg, tmp_path / "run", progress=False)


@pytest.mark.parametrize("name,reason", [("fedex", "adds the aggregated update to the base weights W0"),
                                         ("flora", "adds the aggregated update to the base weights W0"),
                                         ("full", "trains the base weights themselves")])
def test_methods_that_write_into_w0_are_refused_with_the_reason(sim_config, tmp_path, name, reason):
    cfg = quantised_config(sim_config, tmp_path, device="cpu", method={"name": name}, model={"quantization": "4bit"})
    with pytest.raises(ConfigError, match=rf"model.quantization = '4bit': method '{name}' {reason}"):
        Simulator(cfg, tmp_path / "run", progress=False)


def test_a_missing_bitsandbytes_is_named_with_its_install(monkeypatch):
    monkeypatch.setattr(models, "QUANTIZATION_PACKAGE", "bitsandbytes_not_installed")
    with pytest.raises(ConfigError, match=r"model.quantization = '8bit' needs the bitsandbytes package: "
                                          r"pip install 'fedlora\[quant\]'"):
        models.check_quantization("8bit", METHODS["fedit"], torch.device("cuda"))
    models.check_quantization("none", METHODS["fedex"], torch.device("cpu"))  # nothing to check


def test_a_quantised_run_is_not_merged_into_its_base(tmp_path):
    run = SimpleNamespace(config=SimpleNamespace(model=SimpleNamespace(quantization="4bit")))
    with pytest.raises(FedloraError, match="model.quantization = '4bit'.*PEFT adapter"):
        export_merged(run, tmp_path / "merged")


class IntegerLinear(nn.Linear):
    """A stand-in for a bitsandbytes layer: integer weight codes and a scale, a packed weight shape, and
    output in the compute dtype (bfloat16 unless told)."""

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16):
        super().__init__(weight.shape[1], weight.shape[0], bias=False)
        self.scale, self.out_dtype = weight.abs().max() / 127, out_dtype
        self.weight = nn.Parameter((weight / self.scale).round().to(torch.int8).flatten()[:, None],
                                   requires_grad=False)

    def dequantised(self) -> torch.Tensor:
        return self.weight.view(self.out_features, self.in_features).float() * self.scale

    def forward(self, x):
        return (x.float() @ self.dequantised().T).to(self.out_dtype)


def integer_model(out_dtype=torch.bfloat16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(IntegerLinear(torch.randn(6, 10), out_dtype), nn.Tanh(),
                         IntegerLinear(torch.randn(3, 6), out_dtype))


@pytest.mark.parametrize("name", ["fedit", "ffa", "fedsa"])
def test_adapters_on_an_integer_base_are_float32_and_add_s_b_a_x(name):
    model = integer_model()
    adapted = AdaptedModel(model, parameterisation=METHODS[name].parameterisation, rank=2, scaling=0.5,
                           target_modules=["0", "2"], head_modules=[])
    g = torch.Generator().manual_seed(1)
    adapted.load_state({k: torch.randn(v.shape, generator=g) for k, v in adapted.state().items()})
    first = adapted.layers["0"]
    assert (first.d_out, first.d_in) == (6, 10)  # from the layer, not from the packed weight
    assert all(p.dtype == torch.float32 for p in adapted.parameters_by_key().values())
    x = torch.randn(4, 10)
    y = first(x)
    expected = x @ first.base.dequantised().T + 0.5 * x @ first.lora_A.T @ first.lora_B.T  # by hand, float32
    assert y.dtype == torch.bfloat16  # the base's output dtype
    assert torch.allclose(y.float(), expected, rtol=1e-2, atol=1e-2)
    keys = adapted.keys_of(METHODS[name].trains)
    params = adapted.set_trainable(keys)
    adapted.model(x).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert not any(layer.base.weight.requires_grad for layer in adapted.layers.values())


@pytest.mark.parametrize("private", [False, True])
def test_fedsb_set_up_gradient_on_an_integer_base_is_the_gradient_at_the_dequantised_weights(private):
    """Fed-SB's set-up reply on a base whose weights hold integers against autograd on a float copy holding
    the dequantised weights: sum_i dL_i/dW0, and under DP each example's gradient clipped (no noise)."""
    model = integer_model(torch.float32)
    adapted = AdaptedModel(model, parameterisation="lorasb", rank=2, scaling=1.0, target_modules=["0", "2"],
                           head_modules=[])
    adapted.load_state(adapted.lora_init(torch.Generator().manual_seed(1)))
    float_model = nn.Sequential(nn.Linear(10, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False))
    with torch.no_grad():
        for i in (0, 2):
            float_model[i].weight.copy_(model[i].base.dequantised())
    g = torch.Generator().manual_seed(2)
    batches = [{"x": torch.randn(4, 10, generator=g), "y": torch.randint(0, 3, (4,), generator=g)} for _ in range(2)]

    def losses_of(m):
        return lambda b: nn.functional.cross_entropy(m(b["x"]).float(), b["y"], reduction="none")

    clip = 0.05
    expected = {"0": torch.zeros(6, 10), "2": torch.zeros(3, 6)}
    for b in batches:
        for row in range(4):
            one = {"x": b["x"][row:row + 1], "y": b["y"][row:row + 1]}
            grads = torch.autograd.grad(losses_of(float_model)(one).sum(), [float_model[0].weight,
                                                                              float_model[2].weight])
            factor = min(1.0, clip / torch.cat([gr.flatten() for gr in grads]).norm().item()) if private else 1.0
            expected["0"] += factor * grads[0]
            expected["2"] += factor * grads[1]
    if private:
        got = private_gradient_sum(adapted, batches, losses_of(adapted.model), clip, 0.0, torch.Generator())
    else:
        got = gradient_sums(adapted, batches, losses_of(adapted.model))
    for name in expected:
        assert got[name].shape == expected[name].shape and expected[name].norm() > 0
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), name
    assert not any(layer.base.weight.requires_grad for layer in adapted.layers.values())
