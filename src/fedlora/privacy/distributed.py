"""Distributed client-level DP (privacy.mechanism = "distributed"): every client noises its own update in the
integer domain that secure aggregation sums in, so that the sum the server unmasks already carries the noise
and no party ever sees a less noised update. The mechanism is the distributed Skellam mechanism (Agarwal,
Kairouz, Liu 2021, "The Skellam Mechanism for Differentially Private Federated Learning", Algorithm 1), with the
conditional randomized rounding of the distributed discrete Gaussian (Kairouz, Liu, Steinke 2021, Section 4);
TensorFlow Federated's DistributedDpSumFactory composes the same steps. Skellam rather than the discrete
Gaussian: a sum of independent Skellam variates is Skellam, so the noise of the unmasked sum is exactly of the
mechanism's distribution whoever survives, and Poisson samplers are at hand.

A client, each round (`encode`):
  1. clips its flat update x (dimension d) to L2 norm S;
  2. pads it with zeros to D = k B, B a power of 2 (`block_size`: the largest that pads by at most 1/16 of d,
     so that the integers sent are at most 6% more than the values), and rotates each of the k blocks:
     x'_j = H diag(s_j) x_j / sqrt(B), H the Walsh-Hadamard matrix, s random signs from the round's rotation
     seed, which every client and the server share (the rotation is orthogonal and public; it spreads the
     norm over the coordinates, so that no coordinate is large and the modulus can be small);
  3. scales by 1/gamma and rounds every coordinate up or down at random, unbiased, repeating the draw until the
     integer vector y has ||y||^2 <= Delta2^2 (conditional randomized rounding, beta = exp(-1/2)), where
         Delta2 = min(S/gamma + sqrt(D),
                      sqrt((S/gamma)^2 + D/4 + sqrt(2 ln(1/beta)) (S/gamma + sqrt(D)/2)))
     (Kairouz et al. 2021, Theorem 1 and Section 4.1: a single draw exceeds the second bound with probability at
     most beta; the first always holds); for integers ||y||_1 <= min(sqrt(D) Delta2, Delta2^2) = Delta1;
  4. adds Skellam noise Pois(v/2) - Pois(v/2) of variance v to every coordinate, drawn from its secret
     generator (randomness.noise_generator), and sends (y + noise) mod 2^bits.
The server sums the messages mod 2^bits (secure aggregation), maps the sum to centred integers in
[-2^(bits-1), 2^(bits-1)), multiplies by gamma, undoes the rotation and drops the padding (`decode`); as in
DP-FedAvg it divides by the expected cohort m = q N.

The plan (`distributed_plan`, from the config and the update's dimension alone) sets the noise so that
n_min = ceil(privacy.min_survivors x m) clients together add the central variance of the Gaussian mechanism:
n_min v = (z S / gamma)^2 in integer units; n >= n_min survivors' sum carries Sk of variance
n v >= (z S / gamma)^2 exactly. A round with fewer survivors must not be released (`release_epsilon` says what
it would cost). z is privacy.noise_multiplier, or else the central calibration's (client_level_plan, with
privacy.accountant) raised until this module's `epsilon` fits privacy.epsilon.

Granularity gamma: the finest for which the probability that any coordinate of the sum leaves
[-2^(bits-1), 2^(bits-1)) (and wraps around) is at most WRAP_PROBABILITY per round, with the cohort at most
n_max, the smallest n with P(Binomial(N, q) > n) <= WRAP_PROBABILITY / 2 (`wrap_probability`):
    P(wrap | n) <= D [2 exp(-(t1 gamma)^2 B / (2 (n S)^2)) + 2 exp(-t3 asinh(r) + n v (sqrt(1 + r^2) - 1))],
    r = t3 / (n v),
for any t1 + t3 = 2^(bits-1) - 1 - n: the sum of the rotated updates has norm <= n S and, the signs being
independent of the updates, each of its coordinates is sub-Gaussian with variance proxy (n S)^2 / B
(Hoeffding, within the coordinate's block, whose norm is at most n S); the rounding moves each coordinate of each client by less than 1 (at most n in all); the noise
is Sk of variance n v, whose two-sided tail is bounded by the Chernoff bound of its moment generating function
exp(n v (cosh(theta) - 1)). gamma is coarsened where needed so that no client's Poisson rate exceeds
MAX_POISSON_RATE (torch.poisson's float64 rejection sampler; a sampler exact in integer arithmetic is not
used). A plan whose gamma exceeds S / sqrt(D) (a clipped update's typical coordinate: rounding would drown it)
is refused, naming privacy.modulus_bits. The default modulus, 2^32, is Flower SecAgg+'s; TFF stops at 2^22
because it computes in float32, where this module computes in int64 and float64 (hence at most 2^48).

Accounting. The RDP of one round, at integer order alpha, is the Skellam mechanism's (Agarwal et al. 2021,
Theorem 3.5, written for noise of variance mu = n_min v per coordinate):
    eps_Sk(alpha) = alpha Delta2^2 / (2 mu)
                    + min(((2 alpha - 1) Delta2^2 + 6 Delta1) / (4 mu^2), 3 Delta1 / (2 mu))
whose first term is the Gaussian mechanism's alpha / (2 z'^2) with z' = sqrt(mu) / Delta2 ~ z (Delta2 ~ S /
gamma): the second, the discrete mechanism's cost, vanishes as mu grows. Neighbouring runs differ in one
client's update (replaced by zero), the client's participation and its noise share being the same in both:
the relation under which the sum's noise does not depend on the client's data. Two guarantees follow:
  * `epsilon`: of the released models, to whoever does not learn the rounds' cohorts (the guarantee central
    DP-FedAvg gives): the round's RDP amplified by Poisson sampling at rate q with the general upper bound of
    Zhu & Wang 2019 ("Poisson Subsampled Renyi Differential Privacy", Theorem 6), for integer alpha,
        (1/(alpha-1)) log[(1-q)^(alpha-1) (alpha q - q + 1) + C(alpha,2) q^2 (1-q)^(alpha-2) e^eps(2)
                          + 3 sum_{l=3..alpha} C(alpha,l) q^l (1-q)^(alpha-l) e^((l-1) eps(l))],
    capped by eps(alpha) itself, composed over the rounds and converted to (epsilon, delta) as Opacus' RDP
    accountant does. This bound holds for any mechanism and is looser than the sampled Gaussian's exact RDP that
    the central mechanism is accounted with (the factor 3): the plan raises z until it fits privacy.epsilon.
    It charges the sum's noise as that of n_min clients whether or not the client was sampled, as the papers'
    accounting does; but the client's own noise share is present only in the runs where it was sampled, a
    difference this bound does not charge (an open point of this guarantee; `server_epsilon` has none).
  * `server_epsilon`: to the server, which learns who took part and each round's noised sum: no amplification;
    the rounds whose sum held the client's update composed at eps_Sk (the client's share is in both runs).
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.special import gammaln, logsumexp
from scipy.stats import binom

from ..errors import ConfigError
from ..seeding import derive_seed
from .client_level import ClientLevelDP, State, client_level_plan
from .randomness import noise_generator

WRAP_PROBABILITY = 1e-6  # per round: some coordinate of the sum wraps around the modulus
BETA = math.exp(-0.5)  # conditional rounding: a draw is repeated with probability at most beta (Kairouz et al.)
MAX_POISSON_RATE = 2.0 ** 30
MAX_ROUNDING_DRAWS = 200
ORDERS = tuple(range(2, 129)) + (160, 192, 256)


@dataclass(frozen=True)
class DistributedPlan:
    """What every client and the server run in every round; integer units are multiples of `granularity`."""
    dimension: int  # d, the flat update's length
    padded_dimension: int  # D = k B
    block: int  # B, a power of 2: the rotation's block
    clip: float  # S
    noise_multiplier: float  # z: n_min clients' noise is (z S)^2 per coordinate, in the update's units
    sample_rate: float  # q
    expected_cohort: float  # m = q N
    min_survivors: int  # n_min
    max_cohort: int  # n_max, the largest cohort the wrap-around bound allows for
    rounds: int
    delta: float
    bits: int
    granularity: float  # gamma
    client_variance: float  # v, each client's noise variance per coordinate, integer units
    l2_sensitivity: float  # Delta2, integer units, after rounding
    l1_sensitivity: float  # Delta1
    wrap_probability: float  # the bound at max_cohort survivors

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def central_variance(self) -> float:
        """The noise variance per coordinate, integer units, of n_min survivors' sum: (z S / gamma)^2."""
        return self.min_survivors * self.client_variance


# -- the plan -------------------------------------------------------------------------------------------------

def rounded_l2_bound(norm: float, dimension: int, beta: float = BETA) -> float:
    """Delta2: the L2 norm of a vector of norm `norm` (integer units) after conditional randomized rounding."""
    always = norm + math.sqrt(dimension)
    root = math.sqrt(dimension)
    likely = math.sqrt(norm ** 2 + dimension / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + root / 2))
    return min(always, likely)


def _skellam_tail(t: float, variance: float) -> float:
    """P(|X| >= t) for X ~ Sk of `variance` (Pois(variance/2) - Pois(variance/2)): the Chernoff bound."""
    if variance == 0:
        return 0.0
    if t <= 0:
        return 1.0
    r = t / variance
    return min(1.0, 2 * math.exp(-t * math.asinh(r) + variance * (math.sqrt(1 + r * r) - 1)))


def block_size(dimension: int) -> int:
    """B: the largest power of 2 for which padding `dimension` to a multiple of B adds at most dimension / 16."""
    block = 1 << max(0, math.ceil(math.log2(max(1, dimension))))
    while block > 1 and math.ceil(dimension / block) * block > dimension + dimension / 16:
        block //= 2
    return block


def wrap_probability(granularity: float, dimension: int, clip: float, survivors: int, client_variance: float,
                     bits: int, block: int | None = None) -> float:
    """An upper bound on the probability that some coordinate of `survivors` clients' sum wraps around 2^bits
    (the module's docstring gives the formula); `dimension` is the padded D, `block` B (default D)."""
    block = dimension if block is None else block
    budget = 2.0 ** (bits - 1) - 1 - survivors
    if budget <= 0:
        return 1.0
    signal = survivors * clip / granularity  # the sum's norm bound, integer units
    variance = survivors * client_variance
    best = 1.0
    for share in np.linspace(0.0, 1.0, 65):
        t1, t3 = share * budget, (1 - share) * budget
        tail_signal = 2 * math.exp(-t1 ** 2 * block / (2 * signal ** 2)) if signal > 0 else 0.0
        best = min(best, dimension * (tail_signal + _skellam_tail(t3, variance)))
    return min(1.0, best)


def max_cohort(population: int, sample_rate: float) -> int:
    """n_max: the smallest n with P(Binomial(N, q) > n) <= WRAP_PROBABILITY / 2."""
    if sample_rate >= 1:
        return population
    return int(binom.isf(WRAP_PROBABILITY / 2, population, sample_rate))


def make_plan(dimension: int, clip: float, noise_multiplier: float, sample_rate: float, population: int,
              min_survivors: int, bits: int, rounds: int = 1, delta: float = 1e-5) -> DistributedPlan:
    """The plan for these settings: gamma, the per-client variance and the sensitivities (the module's
    docstring); a ConfigError naming privacy.modulus_bits when the modulus cannot hold the sum."""
    block = block_size(dimension)
    padded = math.ceil(dimension / block) * block
    n_max = max(max_cohort(population, sample_rate), min_survivors)
    z2s2 = (noise_multiplier * clip) ** 2  # central variance in the update's units

    def wraps(gamma: float) -> float:
        return wrap_probability(gamma, padded, clip, n_max, z2s2 / gamma ** 2 / min_survivors, bits, block)

    coarsest = clip / math.sqrt(padded)
    if wraps(coarsest) > WRAP_PROBABILITY / 2:
        raise ConfigError(f"privacy.modulus_bits = {bits} cannot hold the sum of up to {n_max} clients' updates "
                          f"of dimension {dimension} and their noise (noise multiplier {noise_multiplier:.4g}) "
                          f"without a wrap-around probability above {WRAP_PROBABILITY:g}; raise privacy.modulus_bits")
    lo, hi = coarsest * 2.0 ** -60, coarsest  # wraps(hi) is within the target, and wraps() falls as gamma grows
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if wraps(mid) <= WRAP_PROBABILITY / 2:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-6:
            break
    gamma = max(hi, math.sqrt(z2s2 / (min_survivors * 2 * MAX_POISSON_RATE)))
    if gamma > coarsest:
        raise ConfigError(f"privacy.noise_multiplier: {noise_multiplier:.4g} needs Poisson rates above "
                          f"{MAX_POISSON_RATE:g} at a granularity fine enough for an update of dimension {dimension}")
    variance = z2s2 / gamma ** 2 / min_survivors
    l2 = rounded_l2_bound(clip / gamma, padded)
    l1 = min(math.sqrt(padded) * l2, l2 ** 2)
    return DistributedPlan(dimension, padded, block, clip, noise_multiplier, sample_rate, sample_rate * population,
                           min_survivors, n_max, rounds, delta, bits, gamma, variance, l2, l1, wraps(gamma))


def distributed_plan(cfg, dimension: int) -> DistributedPlan:
    """The plan of privacy.mechanism = "distributed" for `cfg` and a flat update of `dimension` values: z is
    privacy.noise_multiplier, or the smallest (to 1% in epsilon) for which `epsilon` fits privacy.epsilon,
    searched from the central calibration's z upwards; a ConfigError naming the keys when it cannot hold."""
    p, fed = cfg.privacy, cfg.federation
    central = client_level_plan(cfg)
    return _distributed_plan(dimension, p.client_clip, p.noise_multiplier, central.noise_multiplier, p.epsilon,
                             central.delta, fed.clients_per_round, fed.num_clients, fed.rounds, p.min_survivors,
                             p.modulus_bits, fed.min_clients)


@lru_cache(maxsize=64)
def _distributed_plan(dimension, clip, given_sigma, central_sigma, target, delta, cohort, population, rounds,
                      min_fraction, bits, min_clients=1) -> DistributedPlan:
    q = cohort / population
    # federation.min_clients raises n_min: a sum the run would not release must not be formed at all
    n_min = max(1, math.ceil(min_fraction * cohort - 1e-9), min_clients)

    def plan(sigma: float) -> DistributedPlan:
        return make_plan(dimension, clip, sigma, q, population, n_min, bits, rounds, delta)

    if given_sigma is not None or not rounds:
        chosen = plan(given_sigma or 1.0)
    else:
        lo, hi = central_sigma, central_sigma
        while epsilon(plan(hi)) > target:
            lo, hi = hi, hi * 1.5
            if hi > 1e4:
                raise ConfigError(f"privacy.epsilon = {target} cannot be reached by the distributed mechanism in "
                                  f"{rounds} rounds (federation.rounds)")
        for _ in range(60):
            if epsilon(plan(hi)) >= target * 0.99 or hi - lo < 1e-6 * hi:
                break
            mid = (lo + hi) / 2
            if epsilon(plan(mid)) > target:
                lo = mid
            else:
                hi = mid
        chosen = plan(hi)
    if target is not None and rounds:
        spent = epsilon(chosen)
        if spent > target * (1 + 1e-6):
            raise ConfigError(f"privacy: {rounds} rounds (federation.rounds) of the distributed mechanism at "
                              f"privacy.noise_multiplier = {chosen.noise_multiplier:g} spend epsilon {spent:.3f} > "
                              f"privacy.epsilon = {target:g} (delta {delta:g}); lower federation.rounds or raise "
                              "privacy.noise_multiplier")
    return chosen


# -- the client's side ------------------------------------------------------------------------------------------

def _hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """H x_j / sqrt(B) for every block x_j of B = `block` values (a power of 2 dividing len(x); orthogonal and
    its own inverse): the fast Walsh-Hadamard transform's butterflies, one level at a time."""
    n = x.numel()
    h = 1
    while h < block:
        pairs = x.view(-1, 2, h)
        x = torch.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), dim=1)
        h *= 2
    return x.reshape(n) / math.sqrt(block)


def _signs(rotation_seed: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rotation_seed)
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1


def rotate(x: torch.Tensor, rotation_seed: int, block: int | None = None) -> torch.Tensor:
    """H diag(s_j) x_j / sqrt(B) for every block x_j of a float64 vector of length k B (default B: its length,
    a power of 2)."""
    return _hadamard(x * _signs(rotation_seed, x.numel()), block or x.numel())


def unrotate(y: torch.Tensor, rotation_seed: int, block: int | None = None) -> torch.Tensor:
    return _hadamard(y, block or y.numel()) * _signs(rotation_seed, y.numel())


def clip(update: torch.Tensor, bound: float) -> torch.Tensor:
    """The flat update in float64, scaled to L2 norm at most `bound`."""
    x = update.detach().reshape(-1).to("cpu", torch.float64)
    norm = x.norm().item()
    return x * (bound / norm) if norm > bound else x


def quantise(update: torch.Tensor, plan: DistributedPlan, rotation_seed: int,
             generator: torch.Generator) -> torch.Tensor:
    """The clean integer vector (int64, length D) of a client: clipped, rotated, scaled by 1/gamma and rounded
    at random until its norm is within Delta2."""
    if update.numel() != plan.dimension:
        raise ValueError(f"the update has {update.numel()} values, the plan {plan.dimension}")
    x = torch.zeros(plan.padded_dimension, dtype=torch.float64)
    x[:plan.dimension] = clip(update, plan.clip)
    scaled = rotate(x, rotation_seed, plan.block) / plan.granularity
    floor = scaled.floor()
    up = scaled - floor
    bound = math.floor(plan.l2_sensitivity ** 2)
    for _ in range(MAX_ROUNDING_DRAWS):
        y = (floor + (torch.rand(plan.padded_dimension, generator=generator, dtype=torch.float64) < up)).long()
        if int((y * y).sum()) <= bound:
            return y
    raise RuntimeError(f"conditional rounding: {MAX_ROUNDING_DRAWS} draws above the norm bound")


def skellam_noise(plan: DistributedPlan, generator: torch.Generator) -> torch.Tensor:
    """One client's noise share: Pois(v/2) - Pois(v/2) in every coordinate (int64, length D)."""
    if plan.client_variance == 0:
        return torch.zeros(plan.padded_dimension, dtype=torch.int64)
    rate = torch.full((plan.padded_dimension,), plan.client_variance / 2, dtype=torch.float64)
    return (torch.poisson(rate, generator=generator) - torch.poisson(rate, generator=generator)).long()


def encode(update: torch.Tensor, plan: DistributedPlan, rotation_seed: int,
           generator: torch.Generator) -> torch.Tensor:
    """What a client sends into secure aggregation: (quantise(update) + skellam_noise) mod 2^bits, int64 in
    [0, 2^bits). `generator` must be secret (randomness.noise_generator): it draws the rounding and the noise."""
    return torch.remainder(quantise(update, plan, rotation_seed, generator) + skellam_noise(plan, generator),
                           plan.modulus)


def modular_sum(messages: list[torch.Tensor], bits: int) -> torch.Tensor:
    """The sum secure aggregation computes: of the messages, mod 2^bits."""
    total = torch.zeros_like(messages[0])
    for message in messages:
        total = torch.remainder(total + message, 1 << bits)
    return total


# -- the server's side ------------------------------------------------------------------------------------------

def centred(total: torch.Tensor, bits: int) -> torch.Tensor:
    """The sum mod 2^bits as integers in [-2^(bits-1), 2^(bits-1))."""
    total = torch.remainder(total.long(), 1 << bits)
    return torch.where(total >= 1 << (bits - 1), total - (1 << bits), total)


def decode(total: torch.Tensor, plan: DistributedPlan, rotation_seed: int) -> torch.Tensor:
    """The noised sum of the clipped updates (float32, length d) from the unmasked sum mod 2^bits."""
    x = centred(total, plan.bits).double() * plan.granularity
    return unrotate(x, rotation_seed, plan.block)[:plan.dimension].float()


# -- accounting -------------------------------------------------------------------------------------------------

def skellam_rdp(orders, l1: float, l2: float, variance: float) -> np.ndarray:
    """The RDP at integer `orders` of adding Sk noise of `variance` per coordinate to an integer vector of L1 and
    L2 sensitivities l1, l2 (Agarwal et al. 2021, Theorem 3.5)."""
    a = np.asarray(orders, dtype=float)
    if variance <= 0:
        return np.full(a.shape, np.inf)
    extra = np.minimum(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * variance ** 2), 3 * l1 / (2 * variance))
    return a * l2 ** 2 / (2 * variance) + extra


def poisson_subsampled_rdp(rdp: np.ndarray, q: float, orders=ORDERS) -> np.ndarray:
    """Zhu & Wang's general bound (Theorem 6) on the RDP at `orders` of a mechanism run on a Poisson sample at
    rate q, given its RDP `rdp[l - 2]` at every integer order l = 2, 3, ..., max(orders); capped by rdp itself."""
    out = []
    for alpha in orders:
        base = rdp[alpha - 2]
        if q >= 1 or not np.isfinite(base):
            out.append(base)
            continue
        if q <= 0:
            out.append(0.0)
            continue
        l = np.arange(2, alpha + 1)
        logs = (gammaln(alpha + 1) - gammaln(l + 1) - gammaln(alpha - l + 1) + l * math.log(q)
                + (alpha - l) * math.log1p(-q) + (l - 1) * rdp[l - 2])
        weights = np.where(l == 2, 1.0, 3.0)
        first = (alpha - 1) * math.log1p(-q) + math.log(alpha * q - q + 1)
        total = logsumexp(np.concatenate(([first], logs)), b=np.concatenate(([1.0], weights)))
        out.append(min(base, total / (alpha - 1)))
    return np.array(out)


def round_rdp(plan: DistributedPlan, survivors: int | None = None) -> np.ndarray:
    """The Skellam RDP at every integer order 2..max(ORDERS) of one round whose sum carries `survivors`
    clients' noise (default n_min)."""
    n = plan.min_survivors if survivors is None else survivors
    return skellam_rdp(np.arange(2, ORDERS[-1] + 1), plan.l1_sensitivity, plan.l2_sensitivity,
                       n * plan.client_variance)


def rdp_epsilon(rdp: np.ndarray, delta: float, orders=ORDERS) -> float:
    """(epsilon, delta) from RDP at `orders`, as Opacus' RDP accountant converts it."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not np.any(np.isfinite(rdp)):
        return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' note that the best order is the smallest
        return float(get_privacy_spent(orders=list(orders), rdp=np.asarray(rdp), delta=delta)[0])


def epsilon(plan: DistributedPlan, rounds: int | None = None, survivors: list[int] | None = None) -> float:
    """The epsilon of the released models after `rounds` rounds (default: the plan's), each at n_min clients'
    noise, or at the given `survivors` of each round (one entry per round), Poisson-amplified at rate q."""
    counts = survivors if survivors is not None else [plan.min_survivors] * (plan.rounds if rounds is None else rounds)
    if not counts:
        return 0.0
    total = np.zeros(len(ORDERS))
    for n, k in Counter(counts).items():
        total += k * poisson_subsampled_rdp(round_rdp(plan, n), release_rate(plan))
    return rdp_epsilon(total, plan.delta)


def release_rate(plan: DistributedPlan) -> float:
    """The probability that a given client's update is in a released round: q, raised because a cohort drawn
    below n_min is not released (that choice does not depend on anyone's data):
    q P(Bin(N - 1, q) >= n_min - 1) / P(Bin(N, q) >= n_min)."""
    q = plan.sample_rate
    if q >= 1:
        return 1.0
    population = round(plan.expected_cohort / q)
    released = binom.sf(plan.min_survivors - 1, population, q)
    return min(1.0, q * binom.sf(plan.min_survivors - 2, population - 1, q) / released) if released > 0 else 1.0


def server_epsilon(plan: DistributedPlan, rounds_in_sum: int | list[int]) -> float:
    """The epsilon against the server, which knows the cohorts: the client's update was in `rounds_in_sum`
    rounds' sums (a count, at n_min survivors each, or the survivors of each), no amplification."""
    counts = [plan.min_survivors] * rounds_in_sum if isinstance(rounds_in_sum, int) else list(rounds_in_sum)
    if not counts:
        return 0.0
    total = sum(k * round_rdp(plan, n)[np.array(ORDERS) - 2] for n, k in Counter(counts).items())
    return rdp_epsilon(total, plan.delta)


def release_epsilon(plan: DistributedPlan, survivors: int, target: float | None = None,
                    rounds: int | None = None) -> float:
    """The epsilon of the planned rounds if one round is released with only `survivors` clients' noise (the
    others at n_min); inf when none survived. A ConfigError when it exceeds `target`: the round must then
    not be released."""
    if survivors >= plan.min_survivors:
        return epsilon(plan, rounds)
    n = plan.rounds if rounds is None else rounds
    spent = epsilon(plan, survivors=[plan.min_survivors] * max(0, n - 1) + [survivors]) if survivors > 0 else math.inf
    if target is not None and spent > target:
        raise ConfigError(f"privacy.min_survivors: a round with {survivors} survivors (fewer than "
                          f"{plan.min_survivors}) would spend epsilon {spent:.3f} > privacy.epsilon = {target:g}; "
                          "it must not be released")
    return spent


# -- the runtimes' side: a client's message, and the server's release ----------------------------------------------

def update_dimension(method) -> int:
    """d: the values of a client's update, the largest of the method's uploads (RoLoRA's alternate: a round's
    update is zero-padded to d, so that one plan serves every round)."""
    params = method.adapted.parameters_by_key()
    return max(sum(params[k].numel() for k in method.adapted.keys_of(method.uploads_in(r))) for r in (1, 2))


def rotation_seed(cfg, r: int) -> int:
    """Round r's rotation: public (every client and the server derive it from the run's seed)."""
    return derive_seed(cfg.seed, "rotation", r)


def flat_change(upload: State, start: State, dimension: int) -> torch.Tensor:
    """upload - start, every tensor flattened in key order, zero-padded to `dimension` values (float64)."""
    x = torch.zeros(dimension, dtype=torch.float64)
    parts = [(upload[k].detach().double() - start[k].detach().double()).reshape(-1).cpu() for k in sorted(upload)]
    flat = torch.cat(parts) if parts else x[:0]
    if not torch.isfinite(flat).all():
        raise ValueError("the update is not finite")
    if flat.numel() > dimension:
        raise ValueError(f"the update has {flat.numel()} values, the plan {dimension}")
    x[:flat.numel()] = flat
    return x


def client_parts(cfg, plan: DistributedPlan, upload: State, start: State, r: int,
                 client: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's clean integers and noise share in round r, from its change from `start` (what it would
    upload untrained) and its secret generator; its message is their sum mod 2^bits (as `encode`)."""
    generator = noise_generator(cfg, "distributed-noise", r, client)
    clean = quantise(flat_change(upload, start, plan.dimension), plan, rotation_seed(cfg, r), generator)
    return clean, skellam_noise(plan, generator)


class DistributedDP(ClientLevelDP):
    """The server's side of privacy.mechanism = "distributed": the cohort's Poisson draw (as ClientLevelDP), and
    the release of the unmasked sum of the clients' messages, which already carries the noise: decoded,
    divided by the expected cohort, added to the reference. A round whose sum holds fewer than n_min clients'
    noise shares is withheld (nothing of it is released, nothing charged); a cohort drawn below n_min is not
    trained at all."""

    def __init__(self, cfg, dimension: int, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        self.mechanism = distributed_plan(cfg, dimension)
        self.participation: Counter = Counter()  # client -> the released sums that held its update

    @property
    def noise_multiplier(self) -> float:
        return self.mechanism.noise_multiplier

    def cohort(self, r: int) -> list[int]:
        drawn = super().cohort(r)
        return drawn if len(drawn) >= self.mechanism.min_survivors else []

    def message_bytes(self) -> int:
        """A client's message: D integers of privacy.modulus_bits each."""
        return math.ceil(self.mechanism.padded_dimension * self.mechanism.bits / 8)

    def release_sum(self, reference: State, total: torch.Tensor | None, clients: list[int],
                    r: int) -> tuple[State | None, dict]:
        """Round r's average from the unmasked sum of the messages of `clients` (mod 2^bits): reference +
        decode(total) / m, and the round's record; (None, record) when the round is withheld."""
        plan, survivors = self.mechanism, len(clients)
        record = {"client_clip": self.clip, "survivors": survivors, "min_survivors": plan.min_survivors}
        if total is None or survivors < plan.min_survivors:
            # what releasing it would have cost, the other planned rounds at n_min (None: no noise at all)
            cost = release_epsilon(plan, survivors) if survivors else None
            return None, record | {"withheld": f"{survivors} clients' noise in the sum, fewer than n_min = "
                                                f"{plan.min_survivors} (privacy.min_survivors, federation.min_clients)",
                                   "epsilon_if_released": cost}
        m = plan.expected_cohort
        flat = decode(total, plan, rotation_seed(self.cfg, r))
        mean, at = {}, 0
        for k in sorted(reference):
            n = reference[k].numel()
            change = flat[at:at + n].reshape(reference[k].shape).to(self.device)
            mean[k] = (reference[k].float() + change / m).to(reference[k].dtype)
            at += n
        # the noise of the sum is not known to anyone: its planned norm over the d values, in the average's units
        record["noise_norm"] = math.sqrt(survivors * plan.client_variance * plan.dimension) * plan.granularity / m
        self.rounds_released += 1
        self.participation.update(clients)
        return mean, record

    def epsilon(self, rounds: int | None = None) -> float:
        n = self.rounds_released if rounds is None else rounds
        return epsilon(self.mechanism, n)

    def summary(self) -> dict:
        plan = self.mechanism
        return super().summary() | {
            "mechanism": "distributed", "update_noise_multiplier": plan.noise_multiplier,
            # against the server, which knows the cohorts: the client in the most released sums
            "server_epsilon": server_epsilon(plan, max(self.participation.values(), default=0)),
            "modulus_bits": plan.bits,
            "granularity": plan.granularity, "min_survivors": plan.min_survivors, "dimension": plan.dimension,
            "padded_dimension": plan.padded_dimension, "wrap_probability": plan.wrap_probability}

    def state_dict(self) -> dict:
        return super().state_dict() | {"participation": {str(c): n for c, n in self.participation.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.participation = Counter({int(c): n for c, n in state.get("participation", {}).items()})
