"""LoRA-SB initialisation: B, R, A from a truncated SVD of the approximate first full fine-tuning step.

G = -eta * sign(sum of dL/dW over the init examples)  (an Adam-like first step)
G ~ U_r S_r V_r^T  ->  B = U_r, R = S_r, A = V_r^T, s = 1
"""
from __future__ import annotations

from typing import Iterable

import torch

from .adapters import AdaptedModel


def gradient_sums(adapted: AdaptedModel, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """Sum over examples of dL/dW0 for every adapted layer (as d_out x d_in), the model in training mode."""
    model = adapted.model
    weights = {name: layer.base.weight for name, layer in adapted.layers.items()}
    was_training = model.training
    model.train()
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        for batch in batches:
            loss = model(**batch).loss * batch["labels"].shape[0]  # the model's loss is a batch mean
            loss.backward()
        return {name: (w.grad.T if adapted.layers[name].transposed else w.grad).detach().clone()
                for name, w in weights.items()}
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        model.train(was_training)


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
