"""Every random draw of a run derives from the config's seed and where it happens (round, client, purpose)."""
import numpy as np
import torch

PURPOSES = {"init": 0, "sample": 1, "client": 2, "fresh_lora": 3, "partition": 4, "svd": 5, "noise": 6, "public": 7, "sketch": 8,
            "cohort": 9, "client-noise": 10, "clip-count-noise": 11, "rotation": 12,
            "distributed-noise": 13}


def derive_seed(seed: int, purpose: str, *parts: int) -> int:
    return int(np.random.SeedSequence([seed, PURPOSES[purpose], *parts]).generate_state(1, np.uint64)[0] >> 1)


def generator(seed: int, purpose: str, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *parts))


def rng(seed: int, purpose: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose, *parts))
