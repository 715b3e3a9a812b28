"""A Flower node's own data is all its data: a node started with `data-path` trains on every row of its file
(the config's partition applies only to the shared file), reports that size, and its DP sampler and batch
loader draw from all of it."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="flwr (the 'flower' extra of fedlora) is not installed")

from fedlora.errors import ConfigError, FedloraError  # noqa: E402
from fedlora.federation import FederationServer  # noqa: E402
from fedlora.flower.client_app import ClientRuntime, client_app  # noqa: E402
from fedlora.flower.project import to_run_config  # noqa: E402
from fedlora.flower.strategy import FedloraStrategy  # noqa: E402
from fedlora.plan import client_shards  # noqa: E402
from fedlora.tasks import Task  # noqa: E402

from test_flower import InMemoryGrid, server_identity  # noqa: E402,F401

OWN_ROWS = 45


def own_file(toy_data, folder: Path, rows: int = OWN_ROWS) -> Path:
    header, *train = Path(toy_data["path"]).read_text().splitlines()
    path = folder / "own.tsv"
    path.write_text("\n".join([header] + train[-rows:]) + "\n")
    return path


@pytest.mark.parametrize("privacy", [{}, {"noise_multiplier": 1.0}], ids=["loader", "dp-sampler"])
def test_a_node_with_its_own_file_trains_on_every_row_of_it(sim_config, toy_data, tmp_path, monkeypatch, privacy):
    """Three clients, the node of client 1 with a file of 45 rows (the config's iid partition would give it a
    third): it reports 45, the server weights and plans with 45, and every batch draw of its training (DP-SGD's
    Poisson draws, or the loader's shuffles) is taken from those 45 rows, all of which it reaches."""
    cfg = sim_config(method={"name": "ffa"}, eval={"every": 0}, data={"partition": "iid"}, privacy=privacy,
                     train={"local_steps": 12, "batch_size": 8},
                     federation={"num_clients": 3, "clients_per_round": 3, "rounds": 2})
    path = own_file(toy_data, tmp_path)
    runtime = ClientRuntime(to_run_config(cfg), str(path), client=1)
    partition = [len(s) for s in client_shards(cfg, runtime.trainer.task)]
    assert partition[1] < OWN_ROWS  # a partition of the file would cut it
    drawn_from, drawn = [], set()
    real = Task.client_batch_indices

    def spy(shard, batch_size, steps, rng, sample_rate=None):
        drawn_from.append(len(shard))
        for chosen in real(shard, batch_size, steps, rng, sample_rate):
            if len(shard) == OWN_ROWS:
                drawn.update(int(i) for i in chosen)
            yield chosen
    monkeypatch.setattr(Task, "client_batch_indices", staticmethod(spy))
    grid = InMemoryGrid(client_app(), to_run_config(cfg), 3)
    for context in grid.contexts.values():
        if context.node_config["partition-id"] == 1:
            context.node_config["data-path"] = str(path)
    strategy = FedloraStrategy(FederationServer.from_config(cfg, tmp_path / "run", progress=False), round_timeout=5,
                               node_wait=0)
    shared = list(strategy.server.client_sizes)
    strategy.start(grid)
    assert strategy.server.client_sizes == [shared[0], OWN_ROWS, shared[2]]
    assert strategy.server.plan.sample_rate(1) == pytest.approx(8 / OWN_ROWS)
    assert drawn_from.count(OWN_ROWS) == 2  # its two rounds, each drawing from all its rows
    assert drawn <= set(range(OWN_ROWS))
    if privacy:  # 24 Poisson draws at rate 8/45 miss a given row with probability 0.009: more rows than a third
        assert len(drawn) > partition[1]
    else:  # 24 steps of 8 from reshuffles of the 45 rows reach every row
        assert drawn == set(range(OWN_ROWS))


def test_num_partitions_only_checks_the_client_id_range(sim_config, toy_data, tmp_path):
    cfg = sim_config(method={"name": "ffa"}, eval={"every": 0}, federation={"num_clients": 2, "clients_per_round": 2})
    path = own_file(toy_data, tmp_path, 20)
    grid = InMemoryGrid(client_app(), to_run_config(cfg), 2)
    node = min(grid.contexts)
    grid.contexts[node].node_config |= {"data-path": str(path), "partition-id": 2}
    strategy = FedloraStrategy(FederationServer.from_config(cfg, tmp_path / "run", progress=False), round_timeout=5,
                               node_wait=0)
    with pytest.raises(ConfigError, match=f"SuperNode {node} cannot take part: .*partition-id 2 of num-partitions 2 "
                                          "does not fit federation.num_clients = 2"):
        strategy.start(grid)


def test_a_missing_own_training_file_is_named(sim_config, tmp_path):
    cfg = sim_config(method={"name": "ffa"})
    with pytest.raises(FedloraError, match=r"^node config data-path: file not found: .*nowhere.tsv$"):
        ClientRuntime(to_run_config(cfg), str(tmp_path / "nowhere.tsv"))
