"""Distributed client-level DP (privacy.mechanism = "distributed"): the rotation undone exactly, the decoded sum
within the rounding bound of the clipped sum, the modular sum equal to the clients' integers and noise, the
noise of the planned variance, the accounting against the Gaussian's and a direct computation of the Renyi
divergence, and the refusals naming the keys."""
import dataclasses
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp
from scipy.special import logsumexp
from scipy.stats import poisson

from fedlora.api import make_config
from fedlora.config import build_config
from fedlora.errors import ConfigError
from fedlora.privacy import distributed as dd
from fedlora.privacy.randomness import noise_generator


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distributed_config(**privacy):
    return build_config({"method": {"name": "ffa"},
                         "federation": {"num_clients": 100, "clients_per_round": 10, "rounds": 50},
                         "privacy": {"unit": "client", "mechanism": "distributed"} | privacy})


# -- the rotation, the rounding and the modular sum ------------------------------------------------------------

def test_the_rotation_is_the_normalised_hadamard_transform_and_is_undone_exactly():
    x = torch.randn(16, dtype=torch.float64)
    signs = dd._signs(7, 16)
    expected = torch.from_numpy(scipy.linalg.hadamard(16).astype(np.float64)) @ (signs * x) / 4
    assert torch.allclose(dd.rotate(x, 7), expected, atol=1e-12)
    assert set(signs.tolist()) == {-1.0, 1.0}
    big = torch.randn(1 << 14, dtype=torch.float64)
    turned = dd.rotate(big, 123)
    assert turned.norm().item() == pytest.approx(big.norm().item(), rel=1e-12)
    assert torch.allclose(dd.unrotate(turned, 123), big, atol=1e-12)
    assert not torch.allclose(dd.unrotate(turned, 124), big, atol=1e-3)  # the seed is the rotation
    # blocks: the block-diagonal rotation, each block with its own signs
    x = torch.randn(3 * 8, dtype=torch.float64)
    signs = dd._signs(5, 24)
    blocks = scipy.linalg.block_diag(*[scipy.linalg.hadamard(8)] * 3).astype(np.float64) / math.sqrt(8)
    assert torch.allclose(dd.rotate(x, 5, 8), torch.from_numpy(blocks) @ (signs * x), atol=1e-12)
    assert torch.allclose(dd.unrotate(dd.rotate(x, 5, 8), 5, 8), x, atol=1e-12)


@pytest.mark.parametrize("dimension, block", [(1, 1), (16, 16), (17, 2), (4610, 256), (50_000, 2048), (1 << 20, 1 << 20)])
def test_the_block_pads_by_at_most_a_sixteenth(dimension, block):
    assert dd.block_size(dimension) == block
    padded = math.ceil(dimension / block) * block
    assert padded <= dimension * 17 / 16 and (block == 1 or math.ceil(dimension / (2 * block)) * 2 * block > dimension * 17 / 16)


def test_without_noise_the_decoded_sum_is_the_clipped_sum_within_the_rounding_bound():
    """Each coordinate is rounded by less than one unit gamma and the rotation is orthogonal, so the decoded
    sum of n clients is within n gamma sqrt(D) of the sum of the clipped updates (in L2)."""
    d, clip = 3000, 1.0
    plan = dd.make_plan(d, clip, 0.0, 0.5, 8, 4, 20)
    torch.manual_seed(0)
    updates = [torch.randn(d) * scale for scale in (0.01, 5.0, 0.02, 3.0)]  # two of them above the bound
    messages = [dd.encode(u, plan, 99, generator(i)) for i, u in enumerate(updates)]
    total = dd.modular_sum(messages, plan.bits)
    decoded = dd.decode(total, plan, 99).double()
    clipped = sum(dd.clip(u, clip) for u in updates)
    bound = len(updates) * plan.granularity * math.sqrt(plan.padded_dimension)
    error = (decoded - clipped).norm().item()
    assert 0 < error <= bound
    assert (decoded - sum(u.double() for u in updates)).norm().item() > 1.0  # the clipping took place
    clear = clipped.abs() > bound  # coordinates whose sign the rounding cannot flip
    assert (clipped[clear] < 0).sum() > 100 and torch.equal(decoded[clear] < 0, clipped[clear] < 0)
    assert (dd.centred(total, plan.bits) < 0).any() and total.min() >= 0 and total.max() < plan.modulus


def test_no_wrap_around_in_trials_at_the_narrowest_width_the_plan_accepts():
    """At the smallest modulus the plan accepts for the cohort, 200 rounds of the largest cohort it plans for,
    every client sending the same update of norm S (the sum's norm at its bound, n S), never leave
    [-2^(bits-1), 2^(bits-1)): the integer sum without the modulus stays inside, and the modular sum decodes to
    it. One bit fewer is refused with the numbers."""
    d, clip, population, q = 1000, 1.0, 200, 0.1
    bits = next(b for b in range(8, 33) if _accepted(d, clip, q, population, b))
    plan = dd.make_plan(d, clip, 1.0, q, population, 16, bits)
    update = torch.randn(d, generator=generator(3)).double()
    half = 1 << (bits - 1)
    for trial in range(200):
        g = generator(1000 + trial)
        raw = sum(dd.quantise(update, plan, trial, g) + dd.skellam_noise(plan, g) for _ in range(plan.max_cohort))
        assert int(raw.abs().max()) < half, (trial, bits)
        assert torch.equal(dd.centred(torch.remainder(raw, plan.modulus), bits), raw)
    with pytest.raises(ConfigError, match=f"privacy.modulus_bits = {bits - 1} cannot hold the sum of up to "
                                          f"{plan.max_cohort} clients"):
        dd.make_plan(d, clip, 1.0, q, population, 16, bits - 1)


def _accepted(d, clip, q, population, bits) -> bool:
    try:
        dd.make_plan(d, clip, 1.0, q, population, 16, bits)
        return True
    except ConfigError:
        return False


def test_centring_maps_the_residues_to_the_signed_range():
    bits = 8
    residues = torch.tensor([0, 1, 127, 128, 255, 256 + 3, -1])
    assert dd.centred(residues, bits).tolist() == [0, 1, 127, -128, -1, 3, -1]


def test_the_modular_sum_is_exactly_the_clean_integers_plus_the_noise():
    """encode = (quantise + skellam_noise) mod 2^bits with the generator in the same state, and the sum of the
    messages is the exact integer sum of every client's clean vector and noise, mod 2^bits."""
    d = 1000
    plan = dd.make_plan(d, 0.5, 1.2, 0.3, 10, 3, 24)
    torch.manual_seed(1)
    updates = [torch.randn(d) * s for s in (0.1, 2.0, 0.4)]
    messages, exact = [], torch.zeros(plan.padded_dimension, dtype=torch.int64)
    for i, update in enumerate(updates):
        secret = generator(100 + i)
        replay = torch.Generator()
        replay.set_state(secret.get_state())
        messages.append(dd.encode(update, plan, 5, secret))
        clean = dd.quantise(update, plan, 5, replay)
        noise = dd.skellam_noise(plan, replay)
        assert torch.equal(messages[-1], torch.remainder(clean + noise, plan.modulus))
        assert int((clean * clean).sum()) <= plan.l2_sensitivity ** 2  # conditional rounding's bound
        assert noise.abs().max() > 0
        exact += clean + noise
    assert torch.equal(dd.modular_sum(messages, plan.bits), torch.remainder(exact, plan.modulus))


def test_secret_generators_give_different_messages():
    cfg = distributed_config(noise_multiplier=1.0)
    plan = dd.make_plan(64, 0.1, 1.0, 0.1, 100, 8, 32)
    update = torch.full((64,), 0.01)
    first, second = (dd.encode(update, plan, 3, noise_generator(cfg, "client-noise", 1)) for _ in range(2))
    assert not torch.equal(first, second)


# -- the noise -------------------------------------------------------------------------------------------------

def _variance_matches(draws: torch.Tensor, planned: float) -> bool:
    """The sample variance of many independent draws within 5% of the planned: about ten of its standard
    errors at 2^16 draws, so a factor-2 error cannot pass."""
    return abs(draws.double().var().item() / planned - 1) < 0.05


def test_the_noise_of_the_sum_has_the_planned_variance():
    """n_min clients with zero updates: the decoded sum is their noise alone, of variance (z S)^2 per coordinate
    in the update's units (the rotation is orthogonal); in integer units (z S / gamma)^2. A plan with half the
    per-client variance fails the same test."""
    d, clip, z = 1 << 14, 0.2, 1.3
    plan = dd.make_plan(d, clip, z, 0.1, 100, 4, 32)
    assert plan.central_variance == pytest.approx((z * clip / plan.granularity) ** 2, rel=1e-12)
    zero = torch.zeros(d)
    decoded = torch.cat([dd.decode(dd.modular_sum([dd.encode(zero, plan, r, generator(10 * r + i))
                                                   for i in range(plan.min_survivors)], plan.bits), plan, r)
                         for r in range(4)])
    assert _variance_matches(decoded, (z * clip) ** 2)
    assert abs(decoded.double().mean().item()) < 5 * z * clip / math.sqrt(decoded.numel())
    halved = dataclasses.replace(plan, client_variance=plan.client_variance / 2)
    noise = torch.cat([sum(dd.skellam_noise(halved, generator(1000 * r + i)) for i in range(plan.min_survivors))
                       for r in range(4)])
    assert not _variance_matches(noise, plan.central_variance)
    assert _variance_matches(noise, halved.central_variance)


# -- accounting ------------------------------------------------------------------------------------------------

def _skellam_pmf(variance: float, half_width: int) -> np.ndarray:
    """Pois(v/2) - Pois(v/2) on -half_width..half_width, by convolving the two Poisson pmfs."""
    p = poisson.pmf(np.arange(half_width + 1), variance / 2)
    return np.convolve(p, p[::-1])


def _renyi(alpha: int, shift: int, variance: float, half_width: int = 300) -> float:
    """D_alpha(Sk + shift || Sk), summed over the support directly."""
    p = _skellam_pmf(variance, half_width)
    q = np.zeros_like(p)
    q[shift:] = p[:len(p) - shift]
    kept = (p > 1e-290) & (q > 1e-290)
    return float(logsumexp(alpha * np.log(q[kept]) + (1 - alpha) * np.log(p[kept])) / (alpha - 1))


@pytest.mark.parametrize("variance", [1.0, 5.0, 20.0, 100.0])
def test_the_skellam_rdp_bound_holds_against_a_direct_computation(variance):
    for alpha in (2, 3, 5, 8, 16):
        for shift in (1, 2, 3):
            direct = _renyi(alpha, shift, variance)
            bound = dd.skellam_rdp([alpha], shift, shift, variance)[0]
            assert direct <= bound * (1 + 1e-9), (alpha, shift)
            if variance >= 100:  # the discrete term has faded: the bound is near the truth
                assert bound <= 1.1 * direct, (alpha, shift)
        # two coordinates shifted by 1 and 2: the divergences add; L2 sqrt(5), L1 3
        both = _renyi(alpha, 1, variance) + _renyi(alpha, 2, variance)
        assert both <= dd.skellam_rdp([alpha], 3, math.sqrt(5), variance)[0] * (1 + 1e-9)


def test_the_poisson_amplification_bound_is_within_log3_of_the_sampled_gaussians_exact_rdp():
    """Zhu & Wang's general bound, given the Gaussian's RDP alpha / (2 z^2), lies between the sampled Gaussian's
    exact RDP (Opacus) and that plus log(3) / (alpha - 1); at q = 1 it is the Gaussian's."""
    z, q = 1.1, 0.02
    orders = np.array(dd.ORDERS)
    gaussian = np.arange(2, dd.ORDERS[-1] + 1) / (2 * z * z)
    ours = dd.poisson_subsampled_rdp(gaussian, q)
    exact = np.array(compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(dd.ORDERS)))
    assert np.all(ours >= exact * (1 - 1e-9))
    assert np.all(ours <= exact + np.log(3) / (orders - 1) + 1e-12)
    assert np.all((ours > exact + 1e-5)[(orders >= 3) & (orders <= 64)])  # the general bound, not the Gaussian's own
    assert np.allclose(dd.poisson_subsampled_rdp(gaussian, 1.0), orders / (2 * z * z))


def test_epsilon_falls_with_the_noise_and_grows_with_the_rounds():
    plans = [dd.make_plan(10_000, 0.1, z, 0.01, 1000, 8, 24, rounds=100) for z in (0.8, 1.0, 1.5)]
    epsilons = [dd.epsilon(p) for p in plans]
    assert epsilons[0] > epsilons[1] > epsilons[2] > 0
    assert dd.epsilon(plans[1], rounds=200) > epsilons[1] > dd.epsilon(plans[1], rounds=50)
    assert dd.epsilon(plans[1], rounds=0) == 0
    servers = [dd.server_epsilon(p, 3) for p in plans]
    assert servers[0] > servers[1] > servers[2]
    assert servers[1] > epsilons[1]  # 3 rounds known to the server cost more than 100 hidden among 1000 clients


def test_the_release_rate_is_the_chance_of_a_client_in_a_released_cohort():
    """Cohorts drawn below n_min are not released, which raises a client's chance of being in a released one
    above q: the formula against 200,000 Poisson cohorts, conditioned on their size."""
    plan = dd.make_plan(1000, 0.1, 1.0, 0.1, 100, 8, 32)
    rng = np.random.default_rng(0)
    members = rng.random((200_000, 100)) < 0.1
    released = members.sum(1) >= 8
    observed = members[released, 0].mean()
    assert dd.release_rate(plan) == pytest.approx(observed, abs=4 * math.sqrt(observed / released.sum()))
    assert dd.release_rate(plan) > 1.05 * 0.1
    assert dd.release_rate(dd.make_plan(1000, 0.1, 1.0, 1.0, 10, 8, 32)) == 1.0


def test_epsilon_approaches_the_gaussians_as_the_integers_grow_finer():
    """With more bits the noise in integer units grows, the rounding's inflation and the discrete term fade,
    and epsilon reaches the Gaussian mechanism's under the same amplification bound; that is at most 14% above
    Opacus' exact sampled-Gaussian figure here, and equal to it without sampling."""
    z, rounds, delta = 1.1, 200, 1e-5
    plans = {bits: dd.make_plan(100_000, 0.1, z, 0.01, 1000, 8, bits, rounds=rounds, delta=delta)
             for bits in (14, 16, 20, 32)}
    q = dd.release_rate(plans[32])  # a client's chance of being in a released round (cohorts below 8 are not)
    gaussian = dd.rdp_epsilon(rounds * dd.poisson_subsampled_rdp(np.arange(2, dd.ORDERS[-1] + 1) / (2 * z * z), q),
                              delta)
    spent = {bits: dd.epsilon(plan) for bits, plan in plans.items()}
    assert spent[14] > spent[16] > spent[20] >= spent[32] >= gaussian
    assert spent[14] > 1.1 * gaussian
    assert spent[32] == pytest.approx(gaussian, rel=1e-3)
    opacus = RDPAccountant()
    opacus.history = [(z, q, rounds)]
    assert opacus.get_epsilon(delta) < spent[32] < 1.14 * opacus.get_epsilon(delta)
    unsampled = dd.make_plan(100_000, 0.1, 5.0, 1.0, 10, 8, 32, rounds=10, delta=delta)
    opacus.history = [(5.0, 1.0, 10)]
    assert dd.epsilon(unsampled) == pytest.approx(opacus.get_epsilon(delta), rel=1e-3)


def test_a_round_with_too_few_survivors_costs_more_or_is_refused():
    plan = dd.make_plan(10_000, 0.1, 1.0, 0.01, 1000, 8, 24, rounds=100)
    planned = dd.epsilon(plan)
    assert dd.release_epsilon(plan, 8) == planned == dd.release_epsilon(plan, 12)
    fewer = [dd.release_epsilon(plan, n) for n in (6, 3, 1)]
    assert planned < fewer[0] < fewer[1] < fewer[2]
    assert dd.release_epsilon(plan, 0) == math.inf
    with pytest.raises(ConfigError, match="privacy.min_survivors") as err:
        dd.release_epsilon(plan, 1, target=fewer[0])
    assert "\n" not in str(err.value)
    assert dd.release_epsilon(plan, 6, target=fewer[0]) == fewer[0]
    # more survivors than n_min carry more noise: charging n_min is conservative
    assert dd.epsilon(plan, survivors=[12] * 100) < planned


# -- the plan from the config, and the refusals ----------------------------------------------------------------

def test_the_plan_from_the_config_fits_the_target_epsilon():
    cfg = distributed_config(epsilon=3.0)
    plan = dd.distributed_plan(cfg, 50_000)
    # 50,000 padded to a multiple of 2,048 (51,200: 2.4% more); 4,096 would pad by 6.5%, beyond 1/16
    assert (plan.block, plan.padded_dimension) == (2048, 51_200) and plan.bits == 32 and plan.rounds == 50
    assert plan.min_survivors == 8  # ceil(0.8 x 10)
    assert 0.97 * 3.0 <= dd.epsilon(plan) <= 3.0
    assert plan.wrap_probability <= dd.WRAP_PROBABILITY
    assert plan.central_variance == pytest.approx((plan.noise_multiplier * plan.clip / plan.granularity) ** 2)
    given = dd.distributed_plan(distributed_config(noise_multiplier=2.5, min_survivors=0.5, modulus_bits=20), 1000)
    assert given.noise_multiplier == 2.5 and given.min_survivors == 5 and given.bits == 20
    with pytest.raises(ConfigError, match="privacy.epsilon") as err:
        dd.distributed_plan(distributed_config(epsilon=1.0, noise_multiplier=0.5), 1000)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("privacy,federation,dimension", [
    ({"modulus_bits": 8}, {"num_clients": 400, "clients_per_round": 200}, 10_000),  # the cohort alone overflows
    ({"modulus_bits": 12}, {}, 1 << 20),  # the noise at the coarsest useful granularity overflows
])
def test_a_modulus_too_small_is_refused_naming_the_key(privacy, federation, dimension):
    cfg = build_config({"method": {"name": "ffa"},
                        "federation": {"num_clients": 100, "clients_per_round": 10, "rounds": 5} | federation,
                        "privacy": {"unit": "client", "mechanism": "distributed", "noise_multiplier": 1.0} | privacy})
    with pytest.raises(ConfigError, match="privacy.modulus_bits") as err:
        dd.distributed_plan(cfg, dimension)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("privacy,words", [
    ({"unit": "example", "epsilon": 3.0, "mechanism": "distributed"}, ["privacy.mechanism", "privacy.unit"]),
    ({"unit": "client", "epsilon": 3.0, "modulus_bits": 20}, ["privacy.modulus_bits", "privacy.mechanism"]),
    ({"unit": "client", "epsilon": 3.0, "min_survivors": 0.5}, ["privacy.min_survivors", "privacy.mechanism"]),
    ({"unit": "client", "epsilon": 3.0, "mechanism": "distributed", "clipping": "adaptive"},
     ["privacy.clipping", "privacy.mechanism"]),
    ({"unit": "client", "epsilon": 3.0, "mechanism": "distributed", "modulus_bits": 4}, ["privacy.modulus_bits"]),
])
def test_bad_distributed_settings_are_refused_before_loading_naming_the_keys(privacy, words):
    raw = {"method": {"name": "ffa"}, "model": {"path": "/nonexistent/model"},
           "federation": {"num_clients": 100, "clients_per_round": 10, "rounds": 20}, "privacy": privacy}
    with pytest.raises(ConfigError) as err:
        make_config(raw)  # what `fedlora run` builds and checks before anything loads
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert "\n" not in str(err.value)
