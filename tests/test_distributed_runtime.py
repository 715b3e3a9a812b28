"""Distributed DP in the simulator (privacy.mechanism = "distributed"): the clients' messages, the server's
release of their secure sum, the withheld rounds, the accounting."""
import math

import pytest
import torch

from fedlora.client import ClientTrainer
from fedlora.federation import FederationServer
from fedlora.privacy import distributed as dd
from fedlora.simulator import Simulator

from conftest import read_log


def distributed(sim_config, name="ffa", cohort=4, clients=4, rounds=2, **privacy):
    """Every client in every round (q = 1) unless `cohort` < `clients`; Fed-SB set up from public data (the toy
    file)."""
    sections = {"method": {"name": name},
                "federation": {"num_clients": clients, "clients_per_round": cohort, "rounds": rounds},
                "privacy": {"unit": "client", "randomness": "seeded", "mechanism": "distributed",
                            "client_clip": 0.05} | privacy}
    if name == "fedsb":
        public = sim_config().data
        sections["fedsb"] = {"init_examples": 24, "init_data": "public", "public_data": {
            "name": None, "path": public.path, "eval_path": public.eval_path, "text_columns": ["sentence"],
            "label_column": "label"}}
    return sim_config(**sections)


def spy_on_messages(monkeypatch):
    """Each client's (round, client, upload, start upload) as it seals its update, and what the server gets."""
    sealed, closed = [], []
    real_seal, real_close = ClientTrainer.seal, FederationServer.close_round

    def seal(self, client, r, update, start, plan):
        sealed.append((r, client, {k: v.clone() for k, v in update.payload.items()},
                       self.method.upload(client, start, r)))
        return real_seal(self, client, r, update, start, plan)

    def close(self, r, clients, outcomes, *args, **kwargs):
        closed.append((r, [o.update.payload if o.update is not None else None for o in outcomes],
                       kwargs.get("distributed_sum"), {k: v.clone() for k, v in self.method.global_state.items()}))
        return real_close(self, r, clients, outcomes, *args, **kwargs)

    monkeypatch.setattr(ClientTrainer, "seal", seal)
    monkeypatch.setattr(FederationServer, "close_round", close)
    return sealed, closed


@pytest.mark.parametrize("name", ["ffa", "fedsb"])
def test_the_release_is_the_sum_of_the_clipped_changes_within_the_rounding(sim_config, tmp_path, monkeypatch, name):
    """With little noise the server's new state is reference + sum_i g_i min(1, S / ||g_i||) / m, computed by
    hand from each client's own upload, within the rounding's bound (n gamma sqrt(D) in the sum) plus the noise
    (six standard deviations of its norm); the server never holds an upload, only the sum mod 2^bits."""
    cfg = distributed(sim_config, name, noise_multiplier=1e-5)
    sealed, closed = spy_on_messages(monkeypatch)
    sim = Simulator(cfg, tmp_path, progress=False)
    sim.run()
    plan = sim.server.client_dp.mechanism
    for r, payloads, total, before in closed[:1]:
        assert all(p == {} for p in payloads)  # sealed: the payloads are gone before the server closes the round
        assert total.dtype == torch.int64 and int(total.min()) >= 0 and int(total.max()) < 2 ** plan.bits
        mine = [(upload, start) for rr, _, upload, start in sealed if rr == r]
        assert len(mine) == 4
        expected_sum = {}
        for upload, start in mine:
            change = {k: upload[k].double() - start[k].double() for k in upload}
            norm = math.sqrt(sum(v.pow(2).sum().item() for v in change.values()))
            for k, v in change.items():
                expected_sum[k] = expected_sum.get(k, 0) + v * min(1.0, cfg.privacy.client_clip / norm)
        assert max(math.sqrt(sum(v.pow(2).sum().item() for v in upload_change.values()))
                   for upload_change in [{k: u[k].double() - s[k].double() for k in u} for u, s in mine]) > 0.05
        after = read_log(tmp_path)[r]
        assert after["survivors"] == 4 and "withheld" not in after
        released = sim.server.method.global_state if len(closed) == 1 else closed[1][3]
        error = math.sqrt(sum((((released[k].double() - before[k].double()) * plan.expected_cohort)
                                - expected_sum[k]).pow(2).sum().item() for k in expected_sum))
        rounding = 4 * plan.granularity * math.sqrt(plan.padded_dimension)
        noise = 6 * math.sqrt(4 * plan.client_variance * plan.dimension) * plan.granularity
        # the state is float32: each value of reference + change / m is rounded to 2^-24 of its magnitude
        float32 = plan.expected_cohort * math.sqrt(plan.dimension) * 2 ** -23 * max(
            v.abs().max().item() for k, v in released.items() if k in expected_sum)
        signal = math.sqrt(sum(v.pow(2).sum().item() for v in expected_sum.values()))
        bound = rounding + noise + float32
        assert error <= bound and bound < 0.01 * signal, (error, rounding, noise, float32, signal)


def test_the_sum_is_the_clients_integers_plus_their_noise_exactly(sim_config, tmp_path, monkeypatch):
    """Seeded mode: the sum the server decodes equals, mod 2^bits, the sum of every client's rounded integers
    and noise share recomputed from its own upload and its own generator."""
    cfg = distributed(sim_config, noise_multiplier=1.0)
    sealed, closed = spy_on_messages(monkeypatch)
    sim = Simulator(cfg, tmp_path, progress=False)
    sim.run()
    plan = sim.server.client_dp.mechanism
    for r, _, total, _ in closed:
        clean, noise = torch.zeros(plan.padded_dimension, dtype=torch.int64), torch.zeros_like(total)
        for rr, c, upload, start in sealed:
            if rr != r:
                continue
            g = dd.noise_generator(cfg, "distributed-noise", r, c)
            clean += dd.quantise(dd.flat_change(upload, start, plan.dimension), plan, dd.rotation_seed(cfg, r), g)
            noise += dd.skellam_noise(plan, g)
        assert torch.equal(total, torch.remainder(clean + noise, plan.modulus))
        assert noise.double().var().item() == pytest.approx(4 * plan.client_variance, rel=0.2)


def test_a_round_below_the_minimum_of_survivors_is_withheld(sim_config, tmp_path, monkeypatch):
    """One of 4 clients fails (n_min = 4): nothing of the round is released, the state stays, nothing is charged;
    the next round, complete, is released and charged one round."""
    cfg = distributed(sim_config, noise_multiplier=1.0)
    real = ClientTrainer.update

    def update(self, client, r, *args, **kwargs):
        if r == 1 and client == 2:
            raise RuntimeError("lost")
        return real(self, client, r, *args, **kwargs)

    monkeypatch.setattr(ClientTrainer, "update", update)
    sealed, closed = spy_on_messages(monkeypatch)
    sim = Simulator(cfg, tmp_path, progress=False)
    summary = sim.run()
    log = read_log(tmp_path)
    assert log[1]["survivors"] == 3 and "fewer than n_min = 4" in log[1]["withheld"]
    assert log[1]["epsilon"] == 0.0 and "withheld" not in log[2]
    plan = sim.server.client_dp.mechanism
    assert log[1]["epsilon_if_released"] == pytest.approx(dd.epsilon(plan, survivors=[4, 3]))
    assert log[1]["epsilon_if_released"] > dd.epsilon(plan, 2)  # 3 clients' noise is less than planned
    assert all(torch.equal(closed[1][3][k], v) for k, v in closed[0][3].items())  # round 1 changed nothing
    assert log[2]["epsilon"] == pytest.approx(dd.epsilon(plan, 1))
    assert summary["privacy"]["epsilon"] == pytest.approx(dd.epsilon(plan, 1)) and summary["privacy"]["rounds"] == 1


def test_a_cohort_drawn_below_the_minimum_is_not_trained(sim_config, tmp_path, monkeypatch):
    cfg = distributed(sim_config, cohort=3, noise_multiplier=1.0)  # q = 0.75, n_min = 3
    trained = []
    real = ClientTrainer.update
    monkeypatch.setattr(ClientTrainer, "update", lambda self, c, r, *a, **k: trained.append((r, c)) or real(self, c, r, *a, **k))
    sim = Simulator(cfg, tmp_path, progress=False)
    sim.run()
    for record in read_log(tmp_path)[1:]:
        drawn = sim.server.client_dp.__class__.__mro__[1].cohort(sim.server.client_dp, record["round"])
        if len(drawn) < 3:
            assert record["clients"] == [] and "withheld" in record
            assert not [c for r, c in trained if r == record["round"]]
        else:
            assert record["clients"] == drawn


def test_the_summary_reports_the_mechanisms_epsilons(sim_config, tmp_path):
    cfg = distributed(sim_config, epsilon=8.0)
    sim = Simulator(cfg, tmp_path, progress=False)
    privacy = sim.run()["privacy"]
    plan = sim.server.client_dp.mechanism
    assert privacy["mechanism"] == "distributed" and privacy["rounds"] == 2
    assert privacy["epsilon"] == pytest.approx(dd.epsilon(plan, 2)) and privacy["epsilon"] <= 8.0
    assert privacy["server_epsilon"] == pytest.approx(dd.server_epsilon(plan, 2))
    assert privacy["noise_multiplier"] == plan.noise_multiplier
    # independently: every client in every round (q = 1), so no amplification: Agarwal et al.'s Theorem 3.5 at
    # the plan's sensitivities and n_min clients' variance, composed over 2 rounds, converted by Opacus
    from opacus.accountants.analysis.rdp import get_privacy_spent

    mu, l1, l2 = plan.min_survivors * plan.client_variance, plan.l1_sensitivity, plan.l2_sensitivity
    orders = list(dd.ORDERS)
    rdp = [2 * (a * l2 ** 2 / (2 * mu) + min(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * mu ** 2), 3 * l1 / (2 * mu)))
           for a in orders]
    assert privacy["epsilon"] == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=plan.delta)[0], rel=1e-9)
    assert (privacy["dimension"], privacy["modulus_bits"]) == (dd.update_dimension(sim.method), 32)


def test_secret_randomness_differs_between_runs(sim_config, tmp_path):
    cfg = distributed(sim_config, noise_multiplier=1.0)
    cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"randomness": "secret"})})
    states = []
    for out in ("a", "b"):
        sim = Simulator(cfg, tmp_path / out, progress=False)
        sim.run()
        states.append(sim.method.global_state)
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_resumed_run_continues_the_mechanism(sim_config, tmp_path):
    """Seeded: one round, then resumed to two, ends where two rounds straight end, with the same accounting."""
    cfg = distributed(sim_config, noise_multiplier=1.0)
    straight = Simulator(cfg, tmp_path / "straight", progress=False)
    expected = straight.run()
    one = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 1})})
    Simulator(one, tmp_path / "resumed", progress=False).run()
    resumed = Simulator(cfg, tmp_path / "resumed", progress=False)
    summary = resumed.run(resume=True)
    for k, v in straight.method.global_state.items():
        assert torch.equal(resumed.method.global_state[k], v), k
    assert summary["privacy"]["epsilon"] == expected["privacy"]["epsilon"]
    assert summary["privacy"]["server_epsilon"] == expected["privacy"]["server_epsilon"]


@pytest.mark.parametrize("mechanism", ["central", "distributed"])
def test_resuming_with_more_rounds_at_a_target_epsilon_is_refused(sim_config, tmp_path, mechanism):
    """With privacy.epsilon given, more rounds re-calibrate the noise; the rounds already run used the old one,
    which the accountant would no longer charge: the resume is refused, naming the keys."""
    from fedlora.errors import ConfigError

    cfg = distributed(sim_config, epsilon=8.0, rounds=1)
    if mechanism == "central":
        cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"mechanism": "central"})})
    Simulator(cfg, tmp_path, progress=False).run()
    longer = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 3})})
    with pytest.raises(ConfigError, match="federation.rounds") as err:
        Simulator(longer, tmp_path, progress=False).run(resume=True)
    assert "privacy.noise_multiplier" in str(err.value)


def test_federation_min_clients_raises_the_minimum_of_survivors(sim_config):
    cfg = distributed(sim_config, noise_multiplier=1.0, min_survivors=0.5)
    assert dd.distributed_plan(cfg, 100).min_survivors == 2
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"min_clients": 3})})
    assert dd.distributed_plan(cfg, 100).min_survivors == 3
