"""Client-level DP on Flower (privacy.unit = "client"): the same cohorts, noise, clipping bounds and global state
as the simulator, and what secure aggregation refuses."""
import pytest

pytest.importorskip("flwr", reason="flwr (the 'flower' extra of fedlora) is not installed")

from fedlora.errors import ConfigError  # noqa: E402
from fedlora.federation import FederationServer  # noqa: E402
from fedlora.flower import strategy as flower_strategy  # noqa: E402
from fedlora.flower.client_app import client_app  # noqa: E402
from fedlora.flower.project import to_run_config  # noqa: E402
from fedlora.simulator import Simulator  # noqa: E402

from conftest import read_log  # noqa: E402
from test_client_level_dp import client_dp  # noqa: E402
from test_flower import InMemoryGrid, assert_same_tensors, server_identity  # noqa: E402,F401
from test_flower_deploy import secagg_bound  # noqa: E402


@pytest.mark.parametrize("clipping, secagg", [("fixed", None), ("adaptive", None), ("fixed", 0.66)])
def test_flower_equals_the_simulator_under_client_level_dp(sim_config, tmp_path, monkeypatch, clipping, secagg):
    """Seeded mode (refused on a real deployment, allowed here to compare): the same cohorts, the same noise,
    the same clipping bounds and the same global state; through SecAgg+ within its quantisation."""
    privacy = {"noise_multiplier": 1.0, "client_clip": 0.05, "clipping": clipping}
    if clipping == "adaptive":
        privacy["count_stddev"] = 1.0
    cfg = client_dp(sim_config, **privacy)
    if secagg is not None:  # SecAgg+ needs 2 or more clients: every client in every round (q = 1)
        cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"clients_per_round": 4})})
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    monkeypatch.setattr(flower_strategy, "refuse_seeded", lambda cfg, where: None)
    strategy = flower_strategy.FedloraStrategy(FederationServer.from_config(cfg, tmp_path / "flower", progress=False),
                                               round_timeout=5, node_wait=0, secagg=secagg)
    strategy.start(InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients))
    tol = 1e-6 if secagg is None else secagg_bound(4) * 4
    assert_same_tensors(strategy.server.method.global_state, sim.method.global_state, tol=tol)
    ours, theirs = read_log(tmp_path / "sim"), read_log(tmp_path / "flower")
    for a, b in zip(ours[1:], theirs[1:], strict=True):
        assert a["clients"] == b["clients"] and a["client_clip"] == pytest.approx(b["client_clip"])
        assert a["epsilon"] == pytest.approx(b["epsilon"])
        assert b.get("secure_aggregation", False) == (secagg is not None)
    if clipping == "adaptive":
        assert ours[2]["client_clip"] != ours[1]["client_clip"]


def test_flower_refuses_adaptive_clipping_under_secure_aggregation(sim_config):
    cfg = sim_config(method={"name": "ffa"}, privacy={"unit": "client", "noise_multiplier": 1.0,
                                                      "clipping": "adaptive", "count_stddev": 1.0})
    with pytest.raises(ConfigError, match="privacy.clipping = 'adaptive'"):
        flower_strategy.check_supported(cfg, secagg=0.66)
