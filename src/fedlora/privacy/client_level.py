"""Client-level (user-level) differential privacy: DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping
(Andrew et al. 2021), privacy.unit = "client". What is protected is everything one client contributes over the
run.

Every round the server samples its cohort by Poisson sampling of the population at rate q = clients_per_round /
num_clients. Each sampled client clips its update (its upload minus what it received) to L2 norm S; the server
sums the clipped updates, adds Gaussian noise of std z_update S to every coordinate, and divides by the expected
cohort m = q N, a fixed denominator, so that one client moves the average by at most S / m whoever else took part.
The accountant composes the sampled Gaussian mechanism of noise multiplier z over the rounds (Opacus' RDP or PRV,
as for DP-SGD).

Adaptive clipping follows the clients' update norms to a target quantile gamma: each client also reports whether
its norm was within S; the server noises the count (std sigma_b, the count centred so that one client changes it
by 1/2) and sets S <- S exp(-eta (b - gamma)), b the noised fraction within S. The two releases of a round together
are a Gaussian mechanism of noise multiplier z = (z_update^-2 + (2 sigma_b)^-2)^-1/2 (Andrew et al., Theorem 1):
the update's noise is raised so that z is what the accountant was planned with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import ConfigError
from .accounting import calibrate_noise, epsilon_of
from .randomness import noise_generator, sampling_rng

State = dict[str, torch.Tensor]


def update_norm(upload: State, reference: State) -> float:
    """The L2 norm of upload - reference over all its tensors together."""
    return math.sqrt(sum((upload[k].double() - reference[k].double()).pow(2).sum().item() for k in upload))


def clip_update(upload: State, reference: State, bound: float) -> tuple[State, float]:
    """The upload with its change from `reference` scaled to L2 norm at most `bound`, and the change's norm before."""
    norm = update_norm(upload, reference)
    if norm <= bound:
        return upload, norm
    scale = bound / norm
    return {k: (reference[k] + (v - reference[k]) * scale).to(v.dtype) for k, v in upload.items()}, norm


@dataclass(frozen=True)
class ClientLevelPlan:
    """The mechanism every round runs, planned from the config alone (before any weights or data load)."""
    sample_rate: float  # q
    expected_cohort: float  # m = q N
    rounds: int
    delta: float
    noise_multiplier: float  # z: the round's releases together, what the accountant composes
    update_noise_multiplier: float  # z_update: the noise on the sum of the updates, over S
    count_stddev: float | None  # sigma_b: the noise on the count within S (adaptive clipping), else None


def client_level_plan(cfg) -> ClientLevelPlan:
    """The plan of privacy.unit = "client" for `cfg`; a ConfigError naming the keys when it cannot hold."""
    p, fed = cfg.privacy, cfg.federation
    return _plan(p.accountant, p.epsilon, p.noise_multiplier, p.delta, fed.clients_per_round, fed.num_clients,
                 fed.rounds, p.clipping == "adaptive", p.count_stddev)


@lru_cache(maxsize=64)
def _plan(kind, epsilon, given_sigma, delta, cohort, population, rounds, adaptive, count_stddev) -> ClientLevelPlan:
    q = cohort / population
    delta = delta or min(1e-5, 1 / (10 * population))
    segments = [[(q, rounds, None)]]
    if given_sigma is not None or not rounds:  # no rounds: nothing released, nothing to calibrate
        sigma = given_sigma or 1.0
    else:
        try:
            sigma = calibrate_noise(kind, epsilon, delta, segments)
        except ConfigError:
            raise ConfigError(f"privacy.epsilon = {epsilon} cannot be reached by {rounds} rounds (federation.rounds) "
                              f"at sample rate {q:.4g} (federation.clients_per_round / num_clients) and delta "
                              f"{delta:g}") from None
    if epsilon is not None and rounds:
        spent = epsilon_of(kind, [(sigma, q, rounds)], delta)
        if spent > epsilon * (1 + 1e-6):
            raise ConfigError(f"privacy: {rounds} rounds (federation.rounds) at sample rate {q:.4g} and "
                              f"privacy.noise_multiplier = {sigma:g} spend client-level epsilon {spent:.3f} > "
                              f"privacy.epsilon = {epsilon:g} (delta {delta:g}); lower federation.rounds or "
                              "federation.clients_per_round, or raise privacy.noise_multiplier")
    update_sigma, count = sigma, None
    if adaptive:
        count = count_stddev if count_stddev is not None else cohort / 20
        if sigma >= 2 * count:
            raise ConfigError(f"privacy.clipping = 'adaptive': the noise multiplier {sigma:.4g} leaves nothing for "
                              f"the update once the clip count's noise (privacy.count_stddev = {count:g}) is paid: "
                              f"it must be below 2 x count_stddev = {2 * count:g}; raise privacy.count_stddev")
        update_sigma = (sigma ** -2 - (2 * count) ** -2) ** -0.5
    return ClientLevelPlan(q, float(cohort), rounds, delta, sigma, update_sigma, count)


class ClientLevelDP:
    """The server's side of client-level DP: the cohort's Poisson draw, the noised average of the clipped
    updates, the clipping bound (adaptive or fixed) and the rounds released, for the accountant."""

    def __init__(self, cfg, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.plan = client_level_plan(cfg)
        self.device = device
        self.clip = cfg.privacy.client_clip
        self.rounds_released = 0

    @property
    def noise_multiplier(self) -> float:
        return self.plan.noise_multiplier

    @property
    def delta(self) -> float:
        return self.plan.delta

    def cohort(self, r: int) -> list[int]:
        """Round r's clients: every one of the N included independently with probability q (its size a binomial
        draw, its members then a uniform draw of that many: the same distribution, and no list of N)."""
        draw = sampling_rng(self.cfg, "cohort", r)
        population = self.cfg.federation.num_clients
        size = int(draw.binomial(population, self.plan.sample_rate))
        return sorted(int(c) for c in draw.choice(population, size, replace=False)) if size else []

    def release(self, reference: State, update_sum: State, within: int | None, r: int) -> tuple[State, dict]:
        """Round r's private average: reference + (sum of the clipped updates + noise) / m, and the round's record
        of it. `within`: how many clients' updates were within the bound before clipping (adaptive clipping)."""
        m = self.plan.expected_cohort
        std = self.plan.update_noise_multiplier * self.clip
        generator = noise_generator(self.cfg, "client-noise", r, device=self.device)
        noise = {k: torch.normal(0.0, std, v.shape, generator=generator, device=self.device, dtype=torch.float32)
                 for k, v in update_sum.items()}
        mean = {k: (reference[k].float() + (update_sum[k].float() + noise[k]) / m).to(reference[k].dtype)
                for k in update_sum}
        record = {"client_clip": self.clip,
                  "noise_norm": math.sqrt(sum(n.double().pow(2).sum().item() for n in noise.values())) / m,
                  "update_norm": math.sqrt(sum(v.double().pow(2).sum().item() for v in update_sum.values())) / m}
        if self.plan.count_stddev is not None:
            self.clip, record["within_clip"] = self.adapted_clip(within or 0, r)
        self.rounds_released += 1
        return mean, record

    def adapted_clip(self, within: int, r: int) -> tuple[float, float]:
        """The next round's bound and the noised fraction of clients within this round's."""
        p, m = self.cfg.privacy, self.plan.expected_cohort
        generator = noise_generator(self.cfg, "clip-count-noise", r)
        centred = within - m / 2  # each client counts +-1/2: one client changes the sum by 1/2
        noised = centred + float(torch.normal(0.0, self.plan.count_stddev, (1,), generator=generator))
        fraction = noised / m + 0.5
        return self.clip * math.exp(-p.clip_learning_rate * (fraction - p.target_quantile)), fraction

    def epsilon(self, rounds: int | None = None) -> float:
        """The client-level epsilon of the rounds released so far (or of `rounds`)."""
        n = self.rounds_released if rounds is None else rounds
        return epsilon_of(self.cfg.privacy.accountant, [(self.noise_multiplier, self.plan.sample_rate, n)] if n else [],
                          self.delta)

    def summary(self) -> dict:
        return {"unit": "client", "noise_multiplier": self.noise_multiplier,
                "update_noise_multiplier": self.plan.update_noise_multiplier, "delta": self.delta,
                "accountant": self.cfg.privacy.accountant, "sample_rate": self.plan.sample_rate,
                "rounds": self.rounds_released, "epsilon": self.epsilon(), "client_clip": self.clip}

    def state_dict(self) -> dict:
        return {"unit": "client", "clip": self.clip, "rounds_released": self.rounds_released,
                "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("noise_multiplier")  # absent in checkpoints of older versions
        if saved is not None and abs(saved - self.noise_multiplier) > 1e-9 * saved:
            # the accountant composes every released round at one noise multiplier
            raise ConfigError(f"privacy: the rounds run so far used noise multiplier {saved:.6g}, this config "
                              f"plans {self.noise_multiplier:.6g} (federation.rounds changed with privacy.epsilon "
                              "given?); resume with the run's federation.rounds, or give privacy.noise_multiplier")
        self.clip, self.rounds_released = float(state["clip"]), int(state["rounds_released"])


def sum_clipped(uploads: list[State], reference: State, bound: float) -> tuple[State, list[float]]:
    """The sum of the uploads' changes from `reference`, each scaled to L2 norm at most `bound`; each change's norm
    before (a client that clipped its own sends a change within the bound, which this leaves as it is)."""
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in reference.items()}
    norms = []
    for upload in uploads:
        norm = update_norm(upload, reference)
        scale = min(1.0, bound / norm) if norm > 0 else 1.0
        for k in total:
            total[k] += (upload[k].float() - reference[k].float()) * scale
        norms.append(norm)
    return total, norms
