"""One DP-SGD gradient: per-example clipping of the whole gradient, summed over the micro-batches of the
logical batch, Gaussian noise once per step, normalisation by the expected batch size (as Opacus'
BatchMemoryManager with its DPOptimizer)."""
from __future__ import annotations

from typing import Callable

import torch

from .grad_sample import PerExampleGradients


class DPSGD:
    def __init__(self, recorder: PerExampleGradients, params: dict[str, torch.nn.Parameter], clip_norm: float,
                 noise_multiplier: float, expected_batch_size: float, generator: torch.Generator):
        self.recorder = recorder
        self.params = params
        self.clip_norm = clip_norm
        self.noise_std = noise_multiplier * clip_norm
        self.expected_batch_size = expected_batch_size
        self.generator = generator

    def set_gradients(self, example_losses: Callable[[dict], torch.Tensor], parts: list[dict] | None) -> float | None:
        """Fill .grad of every trainable parameter with the private gradient of one logical batch, given as
        its micro-batches (their per-example clipped gradients summed before the one noise draw); returns the
        batch's mean loss. `parts` None is an empty Poisson draw: the step is noise alone."""
        sums, losses = self.recorder.clipped_sums(parts or [], example_losses, self.clip_norm)
        self.set_noised(sums)
        rows = sum(len(part) for part in losses)
        return sum(part.sum().item() for part in losses) / rows if rows else None

    def set_noised(self, sums: dict[str, torch.Tensor]) -> None:
        """.grad = (clipped sum + noise) / expected batch size; a key missing from `sums` gets noise alone."""
        for key, p in self.params.items():
            noise = torch.randn(p.shape, generator=self.generator, device=self.generator.device) * self.noise_std
            total = sums[key] + noise.to(p.device) if key in sums else noise.to(p.device)
            p.grad = (total / self.expected_batch_size).to(p.dtype)
