"""Local training of one client: a plain loop over its batches."""
from __future__ import annotations

from typing import Iterable

import torch

from .config import TrainConfig


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def local_train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[dict],
                max_grad_norm: float | None = None) -> list[float]:
    """One optimizer step per batch; returns the loss of every step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
