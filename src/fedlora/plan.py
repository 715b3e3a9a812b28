"""What the server and every client derive alike from the config: each client's shard of a shared training
file, and the federation's plan (which clients each round samples, the set-up's clients and examples, the DP
sample rates, the planned DP-SGD steps and so the noise multiplier)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import Config
from .data import partition
from .data.partition import PopulationSizes, SampledPopulation
from .errors import ConfigError
from .methods import check_method
from .privacy.accounting import calibrate_noise, planned_epsilon
from .seeding import derive_seed, rng
from .tasks import Task

Segment = tuple[float, int, float | None]  # DP-SGD steps: (sample rate, steps, own noise multiplier or None)


def client_shards(cfg: Config, task: Task) -> Sequence[np.ndarray]:
    """Every client's training examples (indices into the task's training split), from the config's partition:
    a list, or for data.partition = "sampled" a population whose clients' examples are computed when asked;
    with data.client_paths, every row of client i's own file."""
    d = cfg.data
    if d.client_paths:  # a natural partition: client i holds all of the i-th file (data.load_classification)
        rows = task.data.client_rows
        starts = np.cumsum([0] + rows)
        return [np.arange(starts[i], starts[i + 1]) for i in range(len(rows))]
    if d.partition == "sampled":
        return SampledPopulation(len(task.train_labels), cfg.federation.num_clients, *d.client_examples,
                                 seed=derive_seed(cfg.seed, "partition"))
    return partition(task.train_labels, cfg.federation.num_clients, d.partition,
                     seed=derive_seed(cfg.seed, "partition"), dirichlet_alpha=d.dirichlet_alpha,
                     label_proportions=d.label_proportions, min_client_examples=d.min_client_examples,
                     num_labels=task.num_groups)


def population_sizes(cfg: Config) -> PopulationSizes:
    """The sizes of data.partition = "sampled"'s clients, from the config alone."""
    return PopulationSizes(cfg.federation.num_clients, *cfg.data.client_examples, seed=derive_seed(cfg.seed, "partition"))


def shard_sizes(shards: Sequence[np.ndarray]) -> Sequence[int]:
    """Every client's number of examples (a sampled population computes each when asked)."""
    return shards.sizes if isinstance(shards, SampledPopulation) else [len(s) for s in shards]


@dataclass(frozen=True)
class PrivacySettings:
    """What a client trains with under DP, as the server's accountant planned it: the noise multiplier, delta,
    and the client's set-up examples (0 when it takes no part in a set-up exchange that reads client data)."""
    noise_multiplier: float
    delta: float
    init_examples: int = 0


class FederationPlan:
    """What the server and every client derive alike from the config and the clients' sizes."""

    def __init__(self, cfg: Config, client_sizes: Sequence[int]):
        self.cfg = cfg
        self.client_sizes = client_sizes
        self.set_up = check_method(cfg).set_up_plan(cfg)
        self.init_examples: dict[int, int] = {}  # the set-up's clients and the examples each reads
        if self.set_up is not None:
            init_clients = self.sample_clients(0)
            share = self.set_up.examples / sum(client_sizes[c] for c in init_clients)
            self.init_examples = {c: max(1, min(client_sizes[c], round(share * client_sizes[c])))
                                  for c in init_clients}

    @property
    def init_releases(self) -> int:
        """Private releases each set-up client makes under DP."""
        return self.set_up.releases if self.set_up is not None else 0

    def sample_clients(self, r: int) -> list[int]:
        fed = self.cfg.federation
        return sorted(int(c) for c in rng(self.cfg.seed, "sample", r).choice(
            fed.num_clients, fed.clients_per_round, replace=False))

    def sample_rate(self, client: int) -> float:
        return min(1.0, self.cfg.train.batch_size / self.client_sizes[client])

    def init_sample_rate(self, client: int, examples: int | None = None) -> float:
        return (examples or self.init_examples[client]) / self.client_sizes[client]

    def privacy_segments(self) -> list[list[Segment]]:
        """Every client's planned DP-SGD steps as (sample rate, steps, fixed noise or None) segments."""
        plans: list[list[Segment]] = [[] for _ in self.client_sizes]
        if self.init_releases:
            for c in self.init_examples:
                plans[c].append((self.init_sample_rate(c), self.init_releases, self.set_up.noise_multiplier))
        rounds = np.zeros(len(self.client_sizes), dtype=int)
        for r in range(1, self.cfg.federation.rounds + 1):
            rounds[self.sample_clients(r)] += 1
        for c, k in enumerate(rounds):
            if k:
                plans[c].append((self.sample_rate(c), int(k) * self.cfg.train.local_steps, None))
        return plans

    def delta(self) -> float:
        return self.cfg.privacy.delta or min(1e-5, 1 / (10 * max(self.client_sizes)))

    def noise_multiplier(self) -> float:
        """sigma: given, or calibrated so that no client's planned training exceeds privacy.epsilon; a plan
        that a given sigma cannot fit into the target is refused before any training."""
        p = self.cfg.privacy
        plans = self.privacy_segments()
        delta = self.delta()
        sigma = p.noise_multiplier if p.noise_multiplier is not None else calibrate_noise(
            p.accountant, p.epsilon, delta, plans)
        if p.epsilon is not None:
            planned = planned_epsilon(p.accountant, sigma, plans, delta)
            if planned > p.epsilon * (1 + 1e-6):
                worst = max(range(len(plans)), key=lambda c: sum(n for _, n, _ in plans[c]))
                steps = ", ".join(f"{n} steps at sample rate {q:.4g}" for q, n, _ in plans[worst])
                raise ConfigError(
                    f"privacy: the planned training spends epsilon {planned:.3f} > privacy.epsilon {p.epsilon} "
                    f"(noise_multiplier {sigma:.3f}, delta {delta:g}; e.g. client {worst}: {steps}); lower "
                    "federation.rounds or train.local_steps, or raise privacy.noise_multiplier")
        return sigma

    def init_noise_multiplier(self, sigma: float) -> float:
        return (self.set_up.noise_multiplier if self.set_up is not None else None) or sigma

    def privacy(self, client: int, sigma: float, delta: float) -> PrivacySettings:
        """What `client` trains with at the server's noise multiplier and delta."""
        return PrivacySettings(sigma, delta, self.init_examples.get(client, 0))

    def check_client_privacy(self, client: int, settings: PrivacySettings) -> None:
        """A client's own check of the settings a server asks it to train with (on Flower, the server calibrates
        them from every node's size, which no node knows): refused unless this client's own planned releases,
        at its own size, stay within privacy.epsilon at a delta of at most 1 / (10 n)."""
        p, n = self.cfg.privacy, self.client_sizes[client]
        sigma, delta = settings.noise_multiplier, settings.delta
        if settings.init_examples > n:
            raise ConfigError(f"privacy: the server asks client {client} for {settings.init_examples} set-up "
                              f"examples, more than its {n}")
        most = p.delta or min(1e-5, 1 / (10 * n))
        if delta > most * (1 + 1e-9):
            raise ConfigError(f"privacy: the server asks client {client} for delta {delta:g}, more than the "
                              f"{most:g} its {n} examples allow")
        if p.epsilon is None:
            if sigma < p.noise_multiplier * (1 - 1e-9):
                raise ConfigError(f"privacy: the server asks client {client} for noise multiplier {sigma:.4g}, "
                                  f"below privacy.noise_multiplier = {p.noise_multiplier:g}")
            return
        segments = self.privacy_segments()[client]
        if settings.init_examples and self.init_releases and client in self.init_examples:
            segments[0] = (self.init_sample_rate(client, settings.init_examples),) + segments[0][1:]
        spent = planned_epsilon(p.accountant, sigma, [segments], delta)
        if spent > p.epsilon * (1 + 1e-6):
            raise ConfigError(f"privacy: at the server's noise multiplier {sigma:.4g} client {client}'s planned "
                              f"training on its {n} examples would spend epsilon {spent:.3f} > privacy.epsilon "
                              f"{p.epsilon:g}")
