"""Client-level DP (privacy.unit = "client"): every client's contribution clipped to S by the server whatever the
client sent, the noise of the planned std, adaptive clipping moving S to the target quantile, epsilon as
dp-accounting computes it, the Poisson cohort, the refusals before anything loads, and Flower equal to the
simulator."""
import math
import time

import numpy as np
import pytest
import torch

from conftest import read_log
from fedlora.api import make_config as build_config
from fedlora.client import ClientUpdate
from fedlora.errors import ConfigError
from fedlora.federation import Outcome
from fedlora.privacy.client_level import ClientLevelDP, client_level_plan, clip_update, sum_clipped, update_norm
from fedlora.simulator import Simulator
from test_privacy import google_epsilon


def client_dp(sim_config, **privacy):
    return sim_config(method={"name": "ffa"}, federation={"num_clients": 4, "clients_per_round": 3, "rounds": 2},
                      privacy={"unit": "client", "randomness": "seeded"} | privacy)


def test_a_clients_change_is_clipped_to_the_bound_and_its_direction_kept():
    torch.manual_seed(0)
    reference = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    upload = {k: v + 10 * torch.randn_like(v) for k, v in reference.items()}
    clipped, norm = clip_update(upload, reference, 0.5)
    assert norm == pytest.approx(update_norm(upload, reference)) and norm > 5
    assert update_norm(clipped, reference) == pytest.approx(0.5, rel=1e-5)
    for k in reference:  # the same direction: the change scaled by 0.5 / norm
        assert torch.allclose(clipped[k] - reference[k], (upload[k] - reference[k]) * 0.5 / norm, atol=1e-6)
    small = {k: v + 1e-3 for k, v in reference.items()}
    assert clip_update(small, reference, 0.5)[0] is small


def test_the_server_clips_every_contribution_whatever_the_client_sent(sim_config, tmp_path, monkeypatch):
    """A client that did not clip (a huge upload) still adds at most S to the noised sum; the sum is the
    hand-computed sum of g_i min(1, S / ||g_i||)."""
    cfg = client_dp(sim_config, noise_multiplier=1.0, client_clip=0.05)
    sim = Simulator(cfg, tmp_path, progress=False)
    server = sim.server
    seen = {}

    def spy(self, reference, update_sum, within, r):
        seen["sum"], seen["within"] = update_sum, within
        return original(self, reference, update_sum, within, r)

    original = ClientLevelDP.release
    monkeypatch.setattr(ClientLevelDP, "release", spy)
    with server.open_run(False):
        sim.initialise()
        reference = server.reference(0, 1)
        torch.manual_seed(1)
        changes = [{k: scale * torch.randn_like(v) for k, v in reference.items()} for scale in (1e3, 1e-4, 0.3)]
        outcomes = [Outcome(c, ClientUpdate({k: reference[k] + g[k] for k in reference}, float("nan"),
                                            within_clip=update_norm(g, {k: 0 * v for k, v in g.items()}) <= 0.05),
                            released=True) for c, g in enumerate(changes)]
        server.close_round(1, [0, 1, 2], outcomes, 0, time.time())
    expected = {k: sum(g[k] * min(1.0, 0.05 / update_norm(g, {j: 0 * v for j, v in g.items()})) for g in changes)
                for k in reference}
    for k in reference:
        assert torch.allclose(seen["sum"][k], expected[k], atol=1e-6)
    alone, _ = sum_clipped([outcomes[0].update.payload], reference, 0.05)
    assert update_norm(alone, {k: 0 * v for k, v in alone.items()}) == pytest.approx(0.05, rel=1e-5)
    assert seen["within"] == 1
    row = read_log(tmp_path)[1]
    assert row["client_clip"] == 0.05 and row["epsilon"] > 0


def test_clients_clip_their_own_update_in_the_simulator(sim_config, tmp_path):
    cfg = client_dp(sim_config, noise_multiplier=1.0, client_clip=0.01)
    sim = Simulator(cfg, tmp_path, progress=False)
    with sim.server.open_run(False):
        sim.initialise()
        clients = [0, 1, 2]
        outcomes, _ = sim.train_round(clients, 1)
    reference = sim.server.reference(0, 1)
    for o in outcomes:
        assert update_norm(o.update.payload, reference) <= 0.01 * (1 + 1e-5)
        assert o.update.within_clip is False  # a learning rate of 0.01 moves the head by more than 0.01


def test_the_noise_has_the_planned_std(sim_config):
    """Across many coordinates the noise added to the average is N(0, (z S / m)^2): a factor-2 error fails."""
    cfg = client_dp(sim_config, noise_multiplier=1.3, client_clip=0.2)
    dp = ClientLevelDP(cfg)
    reference = {"w": torch.zeros(200, 100)}
    mean, record = dp.release(reference, {"w": torch.zeros(200, 100)}, None, 1)
    m = cfg.federation.clients_per_round
    std = (mean["w"] * m).std().item()
    assert std == pytest.approx(1.3 * 0.2, rel=0.05)
    assert abs((mean["w"] * m).mean().item()) < 4 * 1.3 * 0.2 / math.sqrt(20000)
    assert record["noise_norm"] == pytest.approx(mean["w"].norm().item(), rel=1e-4)
    assert dp.rounds_released == 1


def test_secret_noise_differs_between_servers_and_seeded_noise_repeats(sim_config):
    reference = {"w": torch.zeros(50)}
    draws = {}
    for randomness in ("secret", "seeded"):
        cfg = client_dp(sim_config, noise_multiplier=1.0, randomness=randomness)
        draws[randomness] = [ClientLevelDP(cfg).release(reference, {"w": torch.zeros(50)}, None, 1)[0]["w"]
                             for _ in range(2)]
    assert not torch.equal(*draws["secret"])
    assert torch.equal(*draws["seeded"])


def test_adaptive_clipping_moves_the_bound_to_the_target_quantile(sim_config):
    """100 clients whose update norms are 1, 2, ..., 100, all sampled each round: from S = 1 the bound climbs
    to near the median, 50, and stays there; with target quantile 0.9, near 90."""
    norms = np.arange(1, 101)
    for quantile, expected in ((0.5, 50), (0.9, 90)):
        cfg = sim_config(method={"name": "ffa"}, federation={"num_clients": 100, "clients_per_round": 100, "rounds": 5},
                         privacy={"unit": "client", "randomness": "seeded", "noise_multiplier": 1.0,
                                  "client_clip": 1.0, "clipping": "adaptive", "target_quantile": quantile})
        dp = ClientLevelDP(cfg)
        path = []
        for r in range(1, 201):
            within = int((norms <= dp.clip).sum())
            dp.clip, _ = dp.adapted_clip(within, r)
            path.append(dp.clip)
        assert path[10] > path[0] > 1.0  # it climbs from below
        late = np.array(path[100:])
        assert abs(np.median(late) - expected) < 0.1 * expected, (quantile, np.median(late))


def test_adaptive_clipping_pays_for_the_count_from_the_update_noise(sim_config):
    """Andrew et al.'s Theorem 1: z = (z_update^-2 + (2 sigma_b)^-2)^-1/2 is what the accountant charges."""
    cfg = sim_config(method={"name": "ffa"}, federation={"num_clients": 1000, "clients_per_round": 100, "rounds": 5},
                     privacy={"unit": "client", "noise_multiplier": 1.0, "clipping": "adaptive"})
    plan = client_level_plan(cfg)
    assert plan.count_stddev == 5.0  # expected cohort / 20
    assert (plan.update_noise_multiplier ** -2 + (2 * plan.count_stddev) ** -2) ** -0.5 == pytest.approx(1.0)
    assert plan.update_noise_multiplier > 1.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_of_a_run_equals_dp_accountings(sim_config, tmp_path, accountant):
    cfg = client_dp(sim_config, noise_multiplier=0.9, accountant=accountant)
    summary = Simulator(cfg, tmp_path, progress=False).run()
    privacy, log = summary["privacy"], read_log(tmp_path)
    q = 3 / 4
    assert privacy["unit"] == "client" and privacy["rounds"] == 2 and privacy["sample_rate"] == q
    assert privacy["delta"] == 1e-5
    google = google_epsilon(accountant, [(0.9, q, 2)], 1e-5)
    assert privacy["epsilon"] == pytest.approx(google, rel=0.02)
    assert log[1]["epsilon"] == pytest.approx(google_epsilon(accountant, [(0.9, q, 1)], 1e-5), rel=0.02)


def test_a_target_epsilon_is_met_by_the_calibrated_noise(sim_config):
    cfg = sim_config(method={"name": "ffa"}, federation={"num_clients": 1000, "clients_per_round": 50, "rounds": 30},
                     privacy={"unit": "client", "epsilon": 3.0})
    plan = client_level_plan(cfg)
    assert plan.delta == 1e-5
    # the default accountant, "auto", takes the smaller of the RDP and PRV bounds
    spent = min(google_epsilon(kind, [(plan.noise_multiplier, 0.05, 30)], plan.delta) for kind in ("rdp", "prv"))
    assert 3.0 * 0.97 <= spent <= 3.0 * 1.02


def test_the_cohort_is_a_poisson_draw_of_the_population(sim_config):
    cfg = sim_config(method={"name": "ffa"}, federation={"num_clients": 1000, "clients_per_round": 50, "rounds": 5},
                     privacy={"unit": "client", "noise_multiplier": 1.0, "randomness": "seeded"})
    dp = ClientLevelDP(cfg)
    sizes = [len(dp.cohort(r)) for r in range(1, 401)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.03)
    assert np.var(sizes) == pytest.approx(1000 * 0.05 * 0.95, rel=0.2)  # a binomial's, not a fixed size's 0
    counts = np.bincount(np.concatenate([dp.cohort(r) for r in range(1, 401)]), minlength=1000)
    assert counts.min() > 0 and counts.max() < 60  # every client drawn alike (mean 20)


def test_a_round_whose_cohort_is_empty_releases_noise_alone(sim_config, tmp_path, monkeypatch):
    cfg = client_dp(sim_config, noise_multiplier=1.0)
    monkeypatch.setattr(ClientLevelDP, "cohort", lambda self, r: [])
    summary = Simulator(cfg, tmp_path, progress=False).run()
    rows = read_log(tmp_path)
    assert [r["clients"] for r in rows[1:]] == [[], []]
    assert summary["privacy"]["rounds"] == 2 and rows[2]["noise_norm"] > 0


@pytest.mark.parametrize("sections, words", [
    ({"method": {"name": "fedex"}}, ["privacy.unit = 'client'", "fedex", "sum"]),
    ({"method": {"name": "flora"}}, ["privacy.unit = 'client'", "flora"]),
    ({"method": {"name": "fedsb"}}, ["privacy.unit = 'client'", "fedsb.init_data"]),
    ({"federation": {"weighting": "examples"}}, ["federation.weighting"]),
    ({"server": {"aggregation": "median"}}, ["server.aggregation"]),
    ({"privacy": {"clip_norm": 0.5}}, ["clip_norm", "privacy.unit"]),
    ({"privacy": {"noise_multiplier": 0.3, "epsilon": 1.0}}, ["privacy.epsilon", "federation.rounds"]),
    ({"privacy": {"clipping": "adaptive", "count_stddev": 0.1}}, ["count_stddev"]),
    ({"federation": {"clients_per_round": 9}}, ["clients_per_round", "num_clients"]),
])
def test_bad_client_level_settings_are_refused_before_loading_naming_the_keys(sections, words):
    raw = {"method": {"name": "ffa"}, "model": {"path": "/nonexistent/model"},
           "federation": {"num_clients": 4, "clients_per_round": 3, "rounds": 20},
           "privacy": {"unit": "client", "noise_multiplier": 1.0}}
    for section, values in sections.items():
        raw[section] = raw.get(section, {}) | values
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_example_level_keys_and_client_level_keys_do_not_mix():
    with pytest.raises(ConfigError, match="client_clip"):
        build_config({"privacy": {"epsilon": 3.0, "client_clip": 0.2}})
    with pytest.raises(ConfigError, match="privacy.unit = 'client' configures no mechanism"):
        build_config({"privacy": {"unit": "client"}})
    with pytest.raises(ConfigError, match="privacy.clip_norm configures no mechanism"):  # no DP, silently: refused
        build_config({"privacy": {"clip_norm": 0.5, "delta": 1e-6}})
    # privacy.epsilon = "none" (--set privacy.epsilon=none) turns DP off, whatever the unit
    off = build_config({"privacy": {"unit": "client", "client_clip": 3.0, "clipping": "adaptive", "epsilon": "none"}})
    assert not off.privacy.enabled and not off.privacy.per_client


def test_a_client_level_run_resumes_where_it_stopped(sim_config, tmp_path):
    cfg = client_dp(sim_config, noise_multiplier=1.0, clipping="adaptive", count_stddev=1.0)
    whole = Simulator(cfg, tmp_path / "whole", progress=False).run()
    short = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 1})})
    Simulator(short, tmp_path / "split", progress=False).run()
    resumed = Simulator(cfg, tmp_path / "split", progress=False).run(resume=True)
    assert resumed["privacy"] == whole["privacy"]
    assert resumed["final_eval"] == pytest.approx(whole["final_eval"])



# -- populations ---------------------------------------------------------------------------------------------

def test_a_sampled_population_computes_each_client_from_the_seed_alone():
    from fedlora.data.partition import PopulationSizes, SampledPopulation

    population = SampledPopulation(120, 10 ** 6, 3, 9, seed=5)
    assert len(population) == 10 ** 6
    for c in (0, 17, 999_999):
        rows = population[c]
        assert np.array_equal(rows, population[c])  # the same whenever asked
        assert 3 <= len(rows) <= 9 and len(set(rows.tolist())) == len(rows) and rows.max() < 120
        assert population.sizes[c] == len(rows) == PopulationSizes(10 ** 6, 3, 9, seed=5)[c]
    sizes = [population.sizes[c] for c in range(2000)]
    assert set(sizes) == set(range(3, 10))  # every size in the range is drawn
    assert not np.array_equal(population[1], population[2])
    with pytest.raises(IndexError):
        population[10 ** 6]


def test_a_sampled_population_needs_its_sizes():
    with pytest.raises(ConfigError, match="data.client_examples is required"):
        build_config({"data": {"partition": "sampled"}})
    with pytest.raises(ConfigError, match="data.client_examples applies"):
        build_config({"data": {"client_examples": [2, 5]}})


def traced_peak_of_a_round(sim_config, tmp_path, num_clients: int) -> tuple[int, list[int]]:
    import tracemalloc

    cfg = sim_config(method={"name": "ffa"}, eval={"every": 0, "max_examples": 8},
                     data={"partition": "sampled", "client_examples": [2, 6]},
                     federation={"num_clients": num_clients, "clients_per_round": 3, "rounds": 1},
                     privacy={"unit": "client", "noise_multiplier": 1.0, "randomness": "seeded"})
    tracemalloc.start()
    try:
        sim = Simulator(cfg, tmp_path / str(num_clients), progress=False)
        sim.run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, read_log(tmp_path / str(num_clients))[1]["clients"]


def test_a_population_of_a_million_clients_runs_a_round_at_the_memory_of_a_thousand(sim_config, tmp_path):
    """The Python heap's peak (tracemalloc: numpy's arrays included) of a whole run of one round; a list or an
    array with an entry per client (8 MB and more at 10^6) fails it."""
    small, _ = traced_peak_of_a_round(sim_config, tmp_path, 1000)
    large, cohort = traced_peak_of_a_round(sim_config, tmp_path, 10 ** 6)
    assert large - small < 2 * 2 ** 20, (small, large)
    assert all(0 <= c < 10 ** 6 for c in cohort)
