"""Low-rank adapters on any transformers model.

Two parameterisations of the update of a frozen weight W0 (d_out x d_in):
    LoRA:     W0 + s B A        A: r x d_in, B: d_out x r
    LoRA-SB:  W0 + s B R A      R: r x r
and a third, "full", where the target weights themselves are the federated state.

The federated state of a model is a flat dict of tensors:
    "<layer>.lora_A", "<layer>.lora_B", "<layer>.lora_R"   adapter factors
    "<layer>.weight"                                        full-weight mode
    "<head param>" (e.g. "classifier.weight")               task head, trained by every method
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Literal

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError

Parameterisation = Literal["lora", "lorasb", "full"]
FACTORS = ("lora_A", "lora_B", "lora_R")


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) whatever the storage layout: Conv1D stores its weight as d_in x d_out, a quantised
    linear layer (bitsandbytes) as packed bytes."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    d0, d1 = module.weight.shape
    return (d1, d0) if isinstance(module, Conv1D) else (d0, d1)


class LowRankLayer(nn.Module):
    """A frozen linear layer plus the low-rank update s * B [R] A."""

    def __init__(self, base: nn.Module, rank: int, scaling: float, with_r: bool, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.transposed = isinstance(base, Conv1D)
        self.d_out, self.d_in = weight_shape(base)
        self.rank = rank
        self.scaling = scaling
        # the base's dtype, or float32 on a quantised base (its weight holds integers)
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        factory = dict(device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.zeros(rank, self.d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, rank, **factory))
        self.lora_R = nn.Parameter(torch.eye(rank, **factory)) if with_r else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.recorder = None  # set while per-example gradients are being recorded (privacy.grad_sample)
        self.clients = None  # set while several clients, each with its own factors, train at once (parallel)

    def factor_linear(self, t: torch.Tensor, factor: str) -> torch.Tensor:
        """t @ factor^T, with each example's own client's factor while clients train together."""
        if self.clients is not None:
            return self.clients.linear(self, t, factor)
        return nn.functional.linear(t, getattr(self, factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self.dropout(x).to(self.lora_A.dtype)  # a no-op but for float32 adapters on a lower-precision model
        h = self.factor_linear(xd, "lora_A")
        u = self.factor_linear(h, "lora_R") if self.lora_R is not None else h
        out = self.base(x)
        if self.recorder is not None or self.clients is not None or out.dtype != u.dtype:
            delta = self.factor_linear(u, "lora_B")
            if self.recorder is not None:
                self.recorder.record_factors(self, xd, h, u, delta)
            return out + (self.scaling * delta).to(out.dtype)
        # base(x) + s * u B^T as one fused multiply-add: no separate passes to scale and add the update
        fused = torch.addmm(out.reshape(-1, self.d_out), u.reshape(-1, self.rank), self.lora_B.t(), alpha=self.scaling)
        return fused.view(out.shape)

    def add_to_base(self, delta: torch.Tensor) -> None:
        """Add a d_out x d_in update to W0 in the weight's own layout."""
        with torch.no_grad():
            self.base.weight.add_(delta.T if self.transposed else delta)

    def base_weight(self) -> torch.Tensor:
        """W0 as d_out x d_in (a view)."""
        return self.base.weight.T if self.transposed else self.base.weight


def low_rank_delta(state: dict[str, torch.Tensor], layer: str, scaling: float) -> torch.Tensor:
    """s B [R] A for one layer, from a flat state dict."""
    B, A = state[f"{layer}.lora_B"], state[f"{layer}.lora_A"]
    R = state.get(f"{layer}.lora_R")
    return scaling * (B @ (R @ A if R is not None else A))


def low_rank_spectral_norm(state: dict[str, torch.Tensor], layer: str, scaling: float) -> float:
    """||s B [R] A||_2, exactly, through the r x r core of the factors' QR decompositions."""
    B, A = state[f"{layer}.lora_B"].double(), state[f"{layer}.lora_A"].double()
    R = state.get(f"{layer}.lora_R")
    core = torch.linalg.qr(B).R @ (R.double() if R is not None else torch.eye(B.shape[1], dtype=B.dtype))
    core = core @ torch.linalg.qr(A.T).R.T
    return abs(scaling) * torch.linalg.matrix_norm(core, ord=2).item()


def spectral_norm(weight: torch.Tensor, exact_up_to: int = 1024) -> float:
    """||W||_2: exact for a weight with a side of at most `exact_up_to`, else a randomized SVD with power
    iterations from a fixed seed (within 1% even of a Gaussian matrix's, whose top values nearly coincide;
    a full SVD of every layer of a 7B model would take minutes)."""
    weight = weight.detach().float()
    if min(weight.shape) <= exact_up_to:
        return torch.linalg.matrix_norm(weight, ord=2).item()
    with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
        torch.manual_seed(0)
        return torch.svd_lowrank(weight, q=16, niter=32)[1][0].item()


def _match(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _in_any(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class AdaptedModel:
    """A transformers model with low-rank adapters (or trainable full target weights) and a task head."""

    def __init__(self, model: nn.Module, *, parameterisation: Parameterisation, rank: int, scaling: float,
                 target_modules: list[str], head_modules: list[str], dropout: float = 0.0):
        self.model = model
        self.parameterisation = parameterisation
        self.rank = rank
        self.scaling = scaling
        self.target_modules = list(target_modules)
        self.head_modules = list(head_modules)
        for p in model.parameters():
            p.requires_grad_(False)

        named = dict(model.named_modules())
        missing = [h for h in head_modules if h not in named]
        if missing:
            raise ConfigError(f"adapter.modules_to_save: no module named {missing} in {type(model).__name__}")
        targets = [n for n, m in named.items()
                   if is_adaptable(m) and _match(n, target_modules) and not _in_any(n, head_modules)]
        if not targets:
            raise ConfigError(f"adapter.target_modules {target_modules} matches no linear layer of "
                              f"{type(model).__name__} (examples of names: {_linear_names(model)[:6]})")
        self.layers: dict[str, LowRankLayer] = {}
        self.full_layers: dict[str, nn.Module] = {}
        for name in targets:
            module = named[name]
            if parameterisation == "full":
                self.full_layers[name] = module
                continue
            d_out, d_in = weight_shape(module)
            if rank > min(d_out, d_in):
                raise ConfigError(f"adapter.rank {rank} is larger than layer {name} ({d_out} x {d_in})")
            layer = LowRankLayer(module, rank, scaling, with_r=parameterisation == "lorasb", dropout=dropout)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            self.layers[name] = layer
        self.head_params = {n: p for n, p in model.named_parameters() if _in_any(n, head_modules)}
        # full mode measures its update against the pretrained weights
        self.pretrained = ({n: m.weight.detach().clone() for n, m in self.full_layers.items()}
                           if parameterisation == "full" else {})

    # -- the flat federated state ------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return list(self.layers or self.full_layers)

    def parameters_by_key(self) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for name, layer in self.layers.items():
            for factor in FACTORS:
                p = getattr(layer, factor)
                if p is not None:
                    params[f"{name}.{factor}"] = p
        for name, module in self.full_layers.items():
            params[f"{name}.weight"] = module.weight
        params.update(self.head_params)
        return params

    def state(self, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        params = self.parameters_by_key()
        keys = params.keys() if keys is None else keys
        return {k: params[k].detach().clone() for k in keys}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.parameters_by_key()
        unknown = set(state) - set(params)
        if unknown:
            raise KeyError(f"unknown state keys: {sorted(unknown)[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def keys_of(self, kinds: Iterable[str], head: bool = True) -> list[str]:
        """State keys of the given factor kinds ("lora_A", "lora_B", "lora_R", "weight"), plus the head."""
        kinds = tuple(kinds)
        keys = [k for k in self.parameters_by_key() if k not in self.head_params and k.rpartition(".")[2] in kinds]
        return keys + (list(self.head_params) if head else [])

    def set_trainable(self, keys: Iterable[str]) -> list[nn.Parameter]:
        keys = set(keys)
        trainable = []
        for k, p in self.parameters_by_key().items():
            p.requires_grad_(k in keys)
            if k in keys:
                trainable.append(p)
        return trainable

    # -- initialisation -----------------------------------------------------------------------
    def lora_init(self, generator: torch.Generator, layers: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """PEFT's LoRA init (A Kaiming-uniform with a = sqrt(5), B = 0); one generator for all layers,
        so every layer draws its own A."""
        state = {}
        for name in (self.layers if layers is None else layers):
            layer = self.layers[name]
            A = torch.empty(layer.rank, layer.d_in, dtype=layer.lora_A.dtype)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            state[f"{name}.lora_A"] = A.to(layer.lora_A.device)
            state[f"{name}.lora_B"] = torch.zeros_like(layer.lora_B)
            if layer.lora_R is not None:
                state[f"{name}.lora_R"] = torch.eye(layer.rank, dtype=layer.lora_R.dtype, device=layer.lora_R.device)
        return state

    def head_init(self, generator: torch.Generator, std: float = 0.02) -> dict[str, torch.Tensor]:
        """A seeded task head (normal weights, zero biases), identical wherever the seed is."""
        state = {}
        for k, p in self.head_params.items():
            t = torch.zeros(p.shape, dtype=p.dtype)
            if p.dim() > 1:
                t.normal_(0.0, std, generator=generator)
            state[k] = t.to(p.device)
        return state

    # -- deltas and the base weights ----------------------------------------------------------
    def layer_delta(self, state: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
        """The update this state applies to one layer's weight, as d_out x d_in."""
        if self.parameterisation == "full":
            module = self.full_layers[layer]
            w = state[f"{layer}.weight"] - self.pretrained[layer]
            return w.T if isinstance(module, Conv1D) else w
        return low_rank_delta(state, layer, self.scaling)

    def delta_to_base(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per layer, ||s B [R] A||_2 / ||W0||_2: how far the state moves each adapted weight, in its own scale."""
        return {name: low_rank_spectral_norm(state, name, self.scaling) / spectral_norm(layer.base_weight())
                for name, layer in self.layers.items()}

    def add_to_base(self, deltas: dict[str, torch.Tensor]) -> None:
        for layer, delta in deltas.items():
            self.layers[layer].add_to_base(delta)

    def merge(self) -> None:
        """Fold the current adapters into W0 and zero B: the model computes the same function after."""
        state = self.state(self.keys_of(FACTORS, head=False))
        self.add_to_base({layer: self.layer_delta(state, layer) for layer in self.layers})
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_B.zero_()

    def base_weights(self) -> dict[str, torch.Tensor]:
        return {n: layer.base.weight.detach().clone() for n, layer in self.layers.items()}

    def load_base_weights(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, w in weights.items():
                self.layers[n].base.weight.copy_(w)

    def base_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights under their original names, adapters left out."""
        out = {}
        for k, v in self.model.state_dict().items():
            if any(f in k.split(".") for f in FACTORS):
                continue
            out[k.replace(".base.", ".")] = v
        return out

    # -- export -------------------------------------------------------------------------------
    def export_peft(self, out_dir: str | Path, state: dict[str, torch.Tensor], *, base_model: str | None,
                    task_type: str | None, alpha: float | None = None, label_names: list[str] | None = None) -> Path:
        """Write a standard PEFT LoRA adapter. LoRA-SB exports as lora_B = B R, lora_A = A. A classifier's
        class names go to labels.json (see `write_labels`)."""
        if self.parameterisation == "full":
            raise ValueError("full fine-tuning has no adapter to export")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in self.layers:
            B, A = state[f"{name}.lora_B"], state[f"{name}.lora_A"]
            R = state.get(f"{name}.lora_R")
            if R is not None:
                B = B @ R
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().cpu().contiguous()
        for k in self.head_params:
            tensors[f"base_model.model.{k}"] = state[k].detach().cpu().contiguous()
        save_file(tensors, str(out_dir / "adapter_model.safetensors"))
        fan_in_fan_out = any(layer.transposed for layer in self.layers.values())
        config = {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": alpha if alpha is not None else self.scaling * self.rank,
            "lora_dropout": 0.0,
            "target_modules": sorted(self.layers),
            "modules_to_save": self.head_modules or None,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
        }
        (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
        if label_names is not None:
            write_labels(out_dir, label_names)
        return out_dir


LABELS_FILE = "labels.json"


def label_config(label_names: list[str]) -> dict:
    """num_labels, id2label and label2id of a classifier: the keyword arguments that give
    AutoModelForSequenceClassification.from_pretrained the right head and class names."""
    return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
            "label2id": {name: k for k, name in enumerate(label_names)}}


def write_labels(folder: str | Path, label_names: list[str]) -> Path:
    path = Path(folder) / LABELS_FILE
    path.write_text(json.dumps(label_config(label_names), indent=2, ensure_ascii=False))
    return path


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_adaptable(m)]
