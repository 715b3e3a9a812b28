"""Where the randomness of differential privacy comes from: the Gaussian noise of every private release and
the Poisson draws that pick each step's examples.

privacy.randomness = "secret" (the default) seeds every such generator from the operating system's CSPRNG
(`secrets`), afresh each time one is asked for: nothing in the run config, which the server holds, lets
anyone regenerate a client's noise or sample. "seeded" derives them from the config's seed (seeding.py) so
that a simulation is bit-identical when run again or resumed; it is for experiments only, gives no privacy
against whoever holds the config, and a Flower run refuses it.
"""
from __future__ import annotations

import secrets

import numpy as np
import torch

from ..errors import ConfigError
from ..seeding import derive_seed


def _seed(cfg, purpose: str, *parts: int, bits: int) -> int:
    if cfg.privacy.randomness == "seeded":
        return derive_seed(cfg.seed, purpose, *parts)
    return secrets.randbits(bits)


def noise_generator(cfg, purpose: str, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for DP noise (a 63-bit seed: what torch's generators take)."""
    return torch.Generator(device).manual_seed(_seed(cfg, purpose, *parts, bits=63))


def sampling_rng(cfg, purpose: str, *parts: int) -> np.random.Generator:
    """A numpy generator for the Poisson draws of DP-SGD (a 128-bit seed)."""
    return np.random.default_rng(_seed(cfg, purpose, *parts, bits=128))


def refuse_seeded(cfg, where: str) -> None:
    """A deployment must not use config-derived DP randomness: the server could regenerate the noise."""
    if cfg.privacy.randomness == "seeded":
        raise ConfigError(f"privacy.randomness = 'seeded' is refused {where}: the server holds the run config and "
                          "could regenerate every client's noise and sample; use 'secret' (the default)")
