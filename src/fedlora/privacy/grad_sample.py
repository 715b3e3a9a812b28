"""Per-example gradients of adapter factors and linear weights, from one forward and backward pass.

Every gradient here has the form sum_t a_t b_t^T over the tokens t of one example, with (a, b):
    LoRA / LoRA-SB layer y = W0 x + s B R A x   (R = I for LoRA), g = dL/d(B R A x) = s dL/dy
        B:  (g,            R A x)
        R:  (B^T g,        A x)
        A:  (R^T B^T g,    x)
    linear layer y = W x + b:  W: (dL/dy, x);  b: sum_t dL/dy_t
So only the layer inputs and output gradients are recorded, and each example's gradient is either
materialised (one einsum) or only its norm is computed with the ghost-norm identity
    ||sum_t a_t b_t^T||_F^2 = sum_{t,t'} (a_t . a_t') (b_t . b_t'),
which is cheaper when T (p + q) < p q. The clipped sum is then one einsum with per-example weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters import LowRankLayer

NormPath = Literal["auto", "ghost", "materialise"]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d) in float32."""
    t = t.float()
    return t.unsqueeze(1) if t.dim() == 2 else t.reshape(t.shape[0], -1, t.shape[-1])


class _Outer:
    """The per-example gradients sum_t a_t b_t^T of one parameter, shape (B, p, q) or (B, p) for biases."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor | None, path: NormPath):
        self.a, self.b = a, b
        if b is None:
            self.ghost = False
            self.grads = a.sum(1)
            return
        T, p, q = a.shape[1], a.shape[2], b.shape[2]
        self.ghost = path == "ghost" or (path == "auto" and T * (p + q) < p * q)
        self.grads = None if self.ghost else torch.einsum("btp,btq->bpq", a, b)

    def squared_norms(self) -> torch.Tensor:
        if self.ghost:
            return ((self.a @ self.a.transpose(1, 2)) * (self.b @ self.b.transpose(1, 2))).sum((1, 2))
        return self.grads.flatten(1).pow(2).sum(1)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        if self.ghost:
            return torch.einsum("btp,btq->pq", self.a * weights[:, None, None], self.b)
        return torch.einsum("b,b...->...", weights, self.grads)

    def client_sums(self, weights: torch.Tensor, slots) -> torch.Tensor:
        """The weighted sum over each client's own examples, shape (K, ...); `slots` (parallel.Slots) says
        which examples are whose."""
        a = slots.group(self.a * weights[:, None, None])  # (K, width, T, p)
        if self.b is None:
            return a.sum((1, 2))
        b = slots.group(self.b)
        return torch.einsum("kmp,kmq->kpq", a.flatten(1, 2), b.flatten(1, 2))


class PerExampleGradients:
    """Records what the per-example gradients of chosen parameters need during one forward/backward.

    `factors`: state key -> (LowRankLayer, "lora_A" | "lora_B" | "lora_R")
    `linears`: state key -> (nn.Linear or Conv1D module, "weight" | "bias")
    """

    def __init__(self, factors: dict[str, tuple[LowRankLayer, str]],
                 linears: dict[str, tuple[nn.Module, str]], path: NormPath = "auto"):
        self.factors = factors
        self.linears = linears
        self.path = path
        self.token_mask: torch.Tensor | None = None
        self._saved: dict[int, dict] = {}

    # -- recording ----------------------------------------------------------------------------
    def record_factors(self, layer: LowRankLayer, x: torch.Tensor, h: torch.Tensor, u: torch.Tensor,
                       delta: torch.Tensor) -> None:
        saved = self._saved.setdefault(id(layer), {})
        saved.update(x=x.detach(), h=h.detach(), u=u.detach())
        if delta.requires_grad:
            delta.register_hook(lambda g: saved.__setitem__("g", g.detach()))

    def _linear_hook(self, module, inputs, output):
        saved = self._saved.setdefault(id(module), {})
        saved["x"] = inputs[0].detach()
        if output.requires_grad:
            output.register_hook(lambda g: saved.__setitem__("g", g.detach()))

    @contextmanager
    def recording(self, token_mask: torch.Tensor | None = None):
        """Record during the forward and backward run inside this block; `token_mask` (B, T) marks the
        real tokens, so that padding can contribute nothing."""
        self._saved = {}
        self.token_mask = token_mask
        layers = {id(layer): layer for layer, _ in self.factors.values()}
        modules = {id(m): m for m, _ in self.linears.values()}
        for layer in layers.values():
            layer.recorder = self
        handles = [m.register_forward_hook(self._linear_hook) for m in modules.values()]
        try:
            yield self
        finally:
            for layer in layers.values():
                layer.recorder = None
            for h in handles:
                h.remove()

    # -- per-example gradients ----------------------------------------------------------------
    def _mask(self, a: torch.Tensor) -> torch.Tensor:
        m = self.token_mask
        if m is not None and a.shape[1] == m.shape[1]:
            return a * m[:, :, None].to(a.dtype)
        return a

    def _outers(self, project: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None
                ) -> dict[str, _Outer]:
        outers = {}
        by_layer: dict[int, dict[str, str]] = {}
        for key, (layer, factor) in self.factors.items():
            by_layer.setdefault(id(layer), {})[factor] = key
        for layer_id, keys in by_layer.items():
            layer = self.factors[next(iter(keys.values()))][0]
            s = self._saved[layer_id]
            g = self._mask(_rows(s["g"]))
            if "lora_B" in keys:
                outers[keys["lora_B"]] = _Outer(g, _rows(s["u"]), self.path)
            if "lora_R" in keys or "lora_A" in keys:
                gu = _times_factor(layer, g, "lora_B")  # B^T g per token
                if "lora_R" in keys:
                    outers[keys["lora_R"]] = _Outer(gu, _rows(s["h"]), self.path)
                if "lora_A" in keys:
                    gh = _times_factor(layer, gu, "lora_R") if layer.lora_R is not None else gu
                    outers[keys["lora_A"]] = _Outer(gh, _rows(s["x"]), self.path)
        for key, (module, param) in self.linears.items():
            s = self._saved[id(module)]
            g = self._mask(_rows(s["g"]))
            x = None if param == "bias" else _rows(s["x"])
            if project is not None:  # a weight's sketch L^T G R = sum_t (L^T g_t) (R^T x_t)^T
                left, right = project[key]
                g = g if left is None else g @ left.to(g.device, g.dtype)
                x = x if right is None else x @ right.to(x.device, x.dtype)
            outers[key] = _Outer(g, x, self.path)
        return outers

    def clipped_sum(self, clip_norm: float, slots=None, project=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(sum over examples of each example's whole gradient clipped to clip_norm, per-example norms).
        With `slots` (several clients' examples in one batch) the sums are per client, shape (K, ...).
        With `project` (linear weight key -> (L or None, R or None)) the per-example gradient G_e (d_out x d_in)
        of each linear weight is replaced by its sketch L^T G_e R, and the sketches are what is clipped."""
        outers = self._outers(project)
        norms = torch.stack([o.squared_norms() for o in outers.values()]).sum(0).sqrt()
        weights = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
        sums = {}
        for key, outer in outers.items():
            total = outer.weighted_sum(weights) if slots is None else outer.client_sums(weights, slots)
            module, param = self.linears.get(key, (None, ""))
            if isinstance(module, Conv1D) and param == "weight" and project is None:
                total = total.transpose(-1, -2)  # Conv1D stores its weight as d_in x d_out
            sums[key] = total
        return sums, norms

    def clipped_sums(self, parts: Iterable[dict], example_losses: Callable[[dict], torch.Tensor], clip_norm: float,
                     slots: Callable[[], object] | None = None, project=None
                     ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """The sum, over every example of the micro-batches `parts`, of its whole gradient clipped to clip_norm
        (see clipped_sum; `slots()` gives the clients of the part being summed), and each part's per-example
        losses (detached). The one path of DP-SGD, the joint training of several clients and the private
        set-up's gradient sums."""
        total: dict[str, torch.Tensor] = {}
        losses = []
        for part in parts:
            with self.recording(part.get("attention_mask")):
                part_losses = example_losses(part)
                part_losses.sum().backward()
            sums, _ = self.clipped_sum(clip_norm, slots() if slots is not None else None, project)
            for k, v in sums.items():
                total[k] = total[k] + v if k in total else v
            losses.append(part_losses.detach())
        return total, losses

    def per_example(self) -> dict[str, torch.Tensor]:
        """Materialised per-example gradients, shaped like the parameters (for tests and inspection)."""
        out = {}
        for key, outer in self._outers().items():
            grads = outer.grads if outer.grads is not None else torch.einsum("btp,btq->bpq", outer.a, outer.b)
            module = self.linears.get(key, (None, ""))[0]
            out[key] = grads.transpose(1, 2) if isinstance(module, Conv1D) and grads.dim() == 3 else grads
        return out


def _times_factor(layer: LowRankLayer, t: torch.Tensor, factor: str) -> torch.Tensor:
    """t @ factor per token, with each example's own client's factor while clients train together."""
    stacked = layer.clients.stacked(layer, factor) if layer.clients is not None else None
    if stacked is None:
        return t @ getattr(layer, factor).detach().float()
    return layer.clients.slots.linear(t, stacked.detach().float().transpose(1, 2))


def for_trainable(adapted, keys: list[str], path: NormPath = "auto") -> PerExampleGradients:
    """A recorder for the given state keys of an AdaptedModel (factors, head parameters, full weights)."""
    from ..errors import ConfigError

    factors, linears = {}, {}
    for key in keys:
        owner, _, param = key.rpartition(".")
        if owner in adapted.layers:
            factors[key] = (adapted.layers[owner], param)
            continue
        module = adapted.full_layers.get(owner) or adapted.model.get_submodule(owner)
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise ConfigError(f"privacy: no per-example gradient rule for '{key}' ({type(module).__name__}); "
                              "only adapter factors and linear layers can be trained under DP")
        linears[key] = (module, param)
    return PerExampleGradients(factors, linears, path)


def for_base_weights(adapted, path: NormPath = "auto") -> PerExampleGradients:
    """A recorder for the frozen W0 of every adapted layer (LoRA-SB's private initialisation)."""
    return PerExampleGradients({}, {name: (layer.base, "weight") for name, layer in adapted.layers.items()}, path)
