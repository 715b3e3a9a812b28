"""LoRA-SB initialisation: B, R, A from a truncated SVD of the approximate first full fine-tuning step.

G = -eta * sign(sum of dL/dW over the init examples)  (an Adam-like first step)
G ~ U_r S_r V_r^T  ->  B = U_r, R = S_r, A = V_r^T, s = 1
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch

from .adapters import AdaptedModel
from .privacy.grad_sample import for_base_weights

Losses = Callable[[dict], torch.Tensor]  # batch -> per-example losses


@contextmanager
def _base_weights_trainable(adapted: AdaptedModel):
    model = adapted.model
    weights = {name: layer.base.weight for name, layer in adapted.layers.items()}
    was_training = model.training
    model.train()
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        yield weights
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        model.train(was_training)


def gradient_sums(adapted: AdaptedModel, batches: Iterable[dict], example_losses: Losses) -> dict[str, torch.Tensor]:
    """Sum over examples of dL/dW0 for every adapted layer (as d_out x d_in), the model in training mode."""
    with _base_weights_trainable(adapted) as weights:
        for batch in batches:
            example_losses(batch).sum().backward()
        return {name: (w.grad.T if adapted.layers[name].transposed else w.grad).detach().clone()
                for name, w in weights.items()}


def private_gradient_sum(adapted: AdaptedModel, batches: Iterable[dict], example_losses: Losses, clip_norm: float,
                         noise_multiplier: float, generator: torch.Generator, path: str = "auto") -> dict[str, torch.Tensor]:
    """The same sum with every example's whole gradient (all layers together) clipped to clip_norm and
    Gaussian noise of std noise_multiplier * clip_norm added once: a release that is private on its own."""
    recorder = for_base_weights(adapted, path)
    total: dict[str, torch.Tensor] = {}
    with _base_weights_trainable(adapted):
        for batch in batches:
            with recorder.recording(batch.get("attention_mask")):
                example_losses(batch).sum().backward()
            sums, _ = recorder.clipped_sum(clip_norm)
            for name, g in sums.items():
                total[name] = total[name] + g if name in total else g
    out = {}
    for name, layer in adapted.layers.items():
        shape = layer.base.weight.shape
        g = total.get(name, torch.zeros(shape, device=layer.base.weight.device))
        g = g + torch.randn(shape, generator=generator, device=generator.device).to(g.device) * noise_multiplier * clip_norm
        out[name] = g.T if layer.transposed else g
    return out


def lora_sb_factors(grad_sum: torch.Tensor, rank: int, eta: float, niter: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, R, A) of the rank-r truncated SVD of G = -eta sign(grad_sum)."""
    G = -eta * torch.sign(grad_sum.float())
    q = min(rank + 8, *G.shape)  # a few extra directions make the randomized SVD's top r accurate
    with torch.random.fork_rng(devices=[G.device] if G.is_cuda else []):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(G, q=q, niter=niter)
    dtype = grad_sum.dtype
    return U[:, :rank].contiguous().to(dtype), torch.diag(S[:rank]).to(dtype), V[:, :rank].T.contiguous().to(dtype)
