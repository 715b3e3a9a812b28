"""Distributed DP on Flower (privacy.mechanism = "distributed" with secagg-threshold): the nodes' noised
integers go through SecAgg+'s integer sum, the server unmasks only their sum, and the run equals the
simulator's exactly in seeded mode."""
import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="flwr (the 'flower' extra of fedlora) is not installed")

from fedlora.client import ClientTrainer  # noqa: E402
from fedlora.errors import ConfigError  # noqa: E402
from fedlora.federation import FederationServer  # noqa: E402
from fedlora.flower import strategy as flower_strategy  # noqa: E402
from fedlora.flower.client_app import client_app  # noqa: E402
from fedlora.flower.project import to_run_config  # noqa: E402
from fedlora.privacy import distributed as dd  # noqa: E402
from fedlora.simulator import Simulator  # noqa: E402

from conftest import read_log  # noqa: E402
from test_distributed_runtime import distributed  # noqa: E402
from test_flower import InMemoryGrid, server_identity  # noqa: E402,F401
from test_flower_deploy import capture_masked_vectors  # noqa: E402


def flower_run(cfg, out, monkeypatch, secagg=0.5, grid=None):
    monkeypatch.setattr(flower_strategy, "refuse_seeded", lambda cfg, where: None)  # seeded, to compare
    strategy = flower_strategy.FedloraStrategy(FederationServer.from_config(cfg, out, progress=False),
                                               round_timeout=10, node_wait=0, secagg=secagg)
    strategy.start(grid or InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients))
    return strategy


@pytest.mark.parametrize("name", ["ffa", "fedsb"])
def test_the_unmasked_sum_is_the_nodes_integers_plus_their_noise_and_equals_the_simulator(
        sim_config, tmp_path, monkeypatch, name):
    """Every node's own record (its upload and start, as it sealed them) gives its clean integers and its noise
    share; their sum mod 2^bits is exactly what the server unmasked, every vector the server received was
    masked, and the global state is the simulator's bit for bit."""
    cfg = distributed(sim_config, name, noise_multiplier=1.0)
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    sealed, sums = [], []
    real_seal, real_close = ClientTrainer.seal, FederationServer.close_round

    def seal(self, client, r, update, start, plan):
        sealed.append((r, client, {k: v.clone() for k, v in update.payload.items()}, self.method.upload(client, start, r)))
        parts = real_seal(self, client, r, update, start, plan)
        sealed[-1] += (update.message.clone(),)
        return parts

    def close(self, r, clients, outcomes, *args, **kwargs):
        sums.append((r, kwargs.get("distributed_sum")))
        return real_close(self, r, clients, outcomes, *args, **kwargs)

    monkeypatch.setattr(ClientTrainer, "seal", seal)
    monkeypatch.setattr(FederationServer, "close_round", close)
    grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    by_client = capture_masked_vectors(grid)
    strategy = flower_run(cfg, tmp_path / "flower", monkeypatch, grid=grid)
    plan = strategy.server.client_dp.mechanism
    assert [r for r, _ in sums] == [1, 2] and len(sealed) == 8
    for r, total in sums:
        clean = torch.zeros(plan.padded_dimension, dtype=torch.int64)
        noise = torch.zeros_like(clean)
        for rr, c, upload, start, _ in sealed:
            if rr == r:
                g = dd.noise_generator(cfg, "distributed-noise", r, c)
                clean += dd.quantise(dd.flat_change(upload, start, plan.dimension), plan, dd.rotation_seed(cfg, r), g)
                noise += dd.skellam_noise(plan, g)
        assert torch.equal(total, torch.remainder(clean + noise, plan.modulus))
    messages = [m.numpy() for *_, m in sealed]
    received = [v for vectors in by_client.values() for v in vectors]
    assert len(received) == 8
    for vector in received:  # [0] is SecAgg+'s weight factor
        assert vector.shape == (plan.padded_dimension + 1,)
        assert all(np.mean(vector[1:] == m) < 0.01 for m in messages)
    for k, v in sim.method.global_state.items():
        assert torch.equal(strategy.server.method.global_state[k], v), k
    for a, b in zip(read_log(tmp_path / "sim")[1:], read_log(tmp_path / "flower")[1:], strict=True):
        assert a["clients"] == b["clients"] and a["epsilon"] == pytest.approx(b["epsilon"])
        assert b["secure_aggregation"] and b["bytes_up"] == a["bytes_up"]


def test_a_node_lost_below_the_minimum_withholds_the_round(sim_config, tmp_path, monkeypatch):
    """n_min = 4 of 4: a node failing at the collect stage leaves SecAgg+ without the threshold, no sum is
    unmasked, the round is withheld and charged nothing (as in the simulator)."""
    cfg = distributed(sim_config, noise_multiplier=1.0, min_survivors=0.75)  # n_min = 3
    real_seal = ClientTrainer.seal

    def seal(self, client, r, update, start, plan):
        if r == 1 and client in (1, 2):
            raise RuntimeError("lost")
        return real_seal(self, client, r, update, start, plan)

    monkeypatch.setattr(ClientTrainer, "seal", seal)
    strategy = flower_run(cfg, tmp_path, monkeypatch)
    log = read_log(tmp_path)
    assert "withheld" in log[1] and log[1]["epsilon"] == 0.0 and "withheld" not in log[2]
    assert log[2]["epsilon"] == pytest.approx(dd.epsilon(strategy.server.client_dp.mechanism, 1))


def test_a_node_refuses_a_round_whose_threshold_is_below_its_minimum(sim_config, tmp_path, monkeypatch):
    """A server that sets SecAgg+'s threshold below n_min could unmask a sum of fewer noise shares: every node
    refuses to train, and nothing is released."""
    from fedlora.flower import secure

    cfg = distributed(sim_config, noise_multiplier=1.0)  # n_min = 4
    real = secure.secure_integer_sum
    monkeypatch.setattr(secure, "secure_integer_sum", lambda grid, asked, r, count, *a: real(grid, asked, r, 2, *a))
    trained = []
    monkeypatch.setattr(ClientTrainer, "update", lambda self, *a, **k: trained.append(a))
    strategy = flower_run(cfg, tmp_path, monkeypatch)
    assert not trained
    assert all("withheld" in record for record in read_log(tmp_path)[1:])
    assert strategy.server.client_dp.rounds_released == 0


def test_flower_refuses_distributed_dp_without_secure_aggregation(sim_config):
    cfg = distributed(sim_config, noise_multiplier=1.0, randomness="secret")
    with pytest.raises(ConfigError, match="secagg-threshold"):
        flower_strategy.check_supported(cfg)
    flower_strategy.check_supported(cfg, server=False)  # a node does not know the threshold: the server checks


@pytest.mark.live
@pytest.mark.slow
def test_live_loopback_distributed_dp_sums_exactly_what_the_nodes_sealed(sim_config, tmp_path, monkeypatch):
    """Fed-SB and FFA-LoRA on a live loopback federation (a SuperLink and two SuperNode processes) with SecAgg+
    and distributed DP, secret randomness: from each node's own record (FEDLORA_FLOWER_RECORD) of its upload,
    its clean integers and its noise share, the sum of their messages mod 2^32 is exactly what the server
    unmasked, each clean vector is its clipped, rotated update rounded (within one unit of each value), and the
    round is logged as secure and released."""
    from fedlora.flower.project import write_app

    from flower_federation import LoopbackFederation
    from test_flower_deploy import SECURE_RUN, documented

    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("FEDLORA_FLOWER_RECORD", str(records))
    federation = LoopbackFederation(tmp_path / "federation", num_nodes=2, connection="fedlora-link")
    try:
        for name in ("fedsb", "ffa"):
            for old in records.iterdir():
                old.unlink()
            cfg = distributed(sim_config, name, cohort=2, clients=2, rounds=1, randomness="secret", noise_multiplier=1.0)
            out = tmp_path / f"flower-{name}"
            write_app(tmp_path / name / "my-app", cfg, out, round_timeout=120, node_wait=60)
            done = documented(SECURE_RUN, tmp_path / name, federation, timeout=400)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + federation.logs()
            record = read_log(out)[1]
            assert record["secure_aggregation"] and record["clients"] == [0, 1] and "withheld" not in record
            server = torch.load(records / "round1-sum.pt")
            nodes = [torch.load(records / f"round1-client{c}.pt") for c in (0, 1)]
            plan = dd.distributed_plan(cfg, sum(v.numel() for v in nodes[0]["upload"].values()))  # the nodes' plan
            assert torch.equal(server["sum"], torch.remainder(sum(n["clean"] + n["noise"] for n in nodes), plan.modulus))
            for n in nodes:
                assert torch.equal(n["message"], torch.remainder(n["clean"] + n["noise"], plan.modulus))
                x = torch.zeros(plan.padded_dimension, dtype=torch.float64)
                x[:plan.dimension] = dd.clip(dd.flat_change(n["upload"], n["start"], plan.dimension), plan.clip)
                scaled = dd.rotate(x, dd.rotation_seed(cfg, 1), plan.block) / plan.granularity
                assert (n["clean"].double() - scaled).abs().max() < 1
                assert n["noise"].double().var().item() == pytest.approx(plan.client_variance, rel=0.2)
    finally:
        federation.stop()


def test_a_node_seals_only_inside_secure_aggregation_and_each_round_once(sim_config, tmp_path, monkeypatch):
    """A server breaking the protocol gets nothing more: a train message carrying the integer round's settings
    outside SecAgg+'s masked-vector stage is refused (the node would send its integers unmasked), and after the
    run a round asked for again through SecAgg+ is refused by every node (a second noised copy of an update)."""
    from flwr.app import Message
    from flwr.app.message_type import MessageType
    import flwr.compat.common.recorddict_compat as compat

    from fedlora.flower import secure

    cfg = distributed(sim_config, noise_multiplier=1.0)
    grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    strategy = flower_run(cfg, tmp_path, monkeypatch, grid=grid)
    server, nodes = strategy.server, strategy.nodes
    downloads, _, _ = strategy._downloads([0, 1, 2, 3])
    settings = strategy._privacy(0) | {secure.INTEGER_BITS: 32}
    plain = Message(compat.fitins_to_recorddict(secure.fitins(downloads[0], 3, 1, 1, settings=settings), True),
                    dst_node_id=nodes.node_of[0], message_type=MessageType.TRAIN, group_id="3")
    reply = grid.send_and_receive([plain])[0]
    assert reply.has_error() and "outside SecAgg+'s integer sum" in reply.error.reason
    again, total = secure.distributed_round(grid, server, nodes, downloads, 1, 0.5, 10,
                                            {c: strategy._privacy(c) for c in downloads})
    assert total is None and all(o.reason for o in again)
