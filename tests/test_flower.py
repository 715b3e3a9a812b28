"""fedlora on Flower: the strategy and the ClientApp against the in-process simulator (same config and seed),
through an in-memory Grid for every method and through a live loopback federation for fedsb (and ffa in
test_flower_deploy.py: the deployment script, the SuperLink killed and restarted, SecAgg+)."""
from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from uuid import uuid4

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr", reason="flwr (the 'flower' extra of fedlora) is not installed")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from fedlora.errors import ConfigError, RoundFailed  # noqa: E402
from fedlora.flower.client_app import client_app  # noqa: E402
from fedlora.flower.project import from_run_config, to_run_config, write_app  # noqa: E402
from fedlora.flower.records import from_record, to_record  # noqa: E402
from fedlora.flower.strategy import FLOWER_BYTES, FedloraStrategy  # noqa: E402
from fedlora.methods import METHODS  # noqa: E402
from fedlora.simulator import Simulator  # noqa: E402
from fedlora.federation import FederationServer  # noqa: E402

from conftest import read_log  # noqa: E402
from flower_federation import LoopbackFederation  # noqa: E402


@pytest.fixture(autouse=True)
def server_identity():
    """What a ServerApp process knows about itself, which Flower stamps on every message it creates."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


class InMemoryGrid(Grid):
    """Flower's Grid delivering every message to a ClientApp in this process, one Context (and so one
    `context.state`) per node, as a SuperNode keeps it; a node whose app raises answers with an error."""

    def __init__(self, app, run_config: dict, num_nodes: int):
        self.app = app
        self.contexts = {1000 + i: Context(run_id=1, node_id=1000 + i, state=RecordDict(), run_config=run_config,
                                           node_config={"partition-id": i, "num-partitions": num_nodes})
                         for i in range(num_nodes)}

    def set_run(self, run_id):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def get_nodes(self):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids stamp what they push
            try:  # the node gets its own copy, as over the wire (SecAgg+'s mod edits what it receives)
                replies.append(self.app(copy.deepcopy(message), self.contexts[message.metadata.dst_node_id]))
            except Exception as err:
                replies.append(Message(Error(code=0, reason=str(err)), reply_to=message))
        return replies


def run_in_memory(cfg, out: Path) -> tuple[FedloraStrategy, InMemoryGrid]:
    run_config = to_run_config(cfg)
    strategy = FedloraStrategy(FederationServer.from_config(from_run_config(run_config), out, progress=False), round_timeout=5,
                               node_wait=0)
    grid = InMemoryGrid(client_app(), run_config, cfg.federation.num_clients)
    strategy.start(grid)
    return strategy, grid


def assert_flower_counts_the_logged_bytes(flower_run: Path, sim_run: Path) -> None:
    """Flower's own count of every round's ArrayRecord bytes (flower_bytes.json) equals the bytes the
    simulator's log records, up and down."""
    flower = json.loads((flower_run / FLOWER_BYTES).read_text())
    for rec in read_log(sim_run):
        counted = flower.get(str(rec["round"]), {"up": 0, "down": 0})
        assert (counted["up"], counted["down"]) == (rec["bytes_up"], rec["bytes_down"]), rec["round"]


def assert_same_tensors(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst < tol, worst


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_on_flower_matches_the_simulator_and_its_byte_counts(sim_config, tmp_path, name):
    cfg = sim_config(method={"name": name}, eval={"every": 0})  # 4 clients, 3 sampled per round, 2 rounds
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    strategy, grid = run_in_memory(cfg, tmp_path / "flower")
    # the same global state, and the same W0 after FedEx-LoRA's or FLoRA's merges, on the server and on every
    # client (the W0 a client keeps in its node's context.state)
    assert_same_tensors(strategy.server.method.global_state, sim.method.global_state)
    kept = {c.node_config["partition-id"]: c.state for c in grid.contexts.values()}
    if sim.method.changes_base:
        assert_same_tensors(strategy.server.adapted.base_weights(), sim.adapted.base_weights())
        for state in kept.values():
            assert_same_tensors(from_record(state["fedlora.base"]), sim.adapted.base_weights())
    if name == "fedsa":  # every client's own B, which never leaves it, as the simulator's
        for client, own in sim.trainer.own_states.items():
            assert_same_tensors(from_record(kept[client]["fedlora.own"]), own)
    sim_log, flower_log = read_log(tmp_path / "sim"), read_log(tmp_path / "flower")
    for ours, theirs in zip(sim_log, flower_log, strict=True):
        assert ours["clients"] == theirs["clients"] and ours["bytes_up"] == theirs["bytes_up"]
        assert ours["bytes_down"] == theirs["bytes_down"]
        if ours["eval"]:
            assert ours["eval"] == pytest.approx(theirs["eval"], abs=1e-5)
    assert_flower_counts_the_logged_bytes(tmp_path / "flower", tmp_path / "sim")
    assert sum(rec["bytes_up"] for rec in sim_log) > 0


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.heterogeneous_ranks])
def test_clients_of_different_ranks_on_flower_match_the_simulator(sim_config, tmp_path, name):
    cfg = sim_config(method={"name": name}, adapter={"rank": 4, "client_ranks": [2, 4, 3, 1]}, eval={"every": 0},
                     hetlora={"decay": 0.5}, federation={"num_clients": 4, "clients_per_round": 3, "rounds": 3})
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    strategy, _ = run_in_memory(cfg, tmp_path / "flower")
    assert_same_tensors(strategy.server.method.global_state, sim.method.global_state)
    assert strategy.server.method.ranks == sim.method.ranks  # HetLoRA's pruned ranks too
    assert name != "hetlora" or sim.method.ranks != [2, 4, 3, 1]  # a node learnt its pruned rank
    sim_log, flower_log = read_log(tmp_path / "sim"), read_log(tmp_path / "flower")
    flower = json.loads((tmp_path / "flower" / FLOWER_BYTES).read_text())
    for ours, theirs in zip(sim_log, flower_log, strict=True):
        assert (ours["bytes_up"], ours["bytes_down"]) == (theirs["bytes_up"], theirs["bytes_down"])
        counted = flower.get(str(ours["round"]), {"up": 0, "down": 0})
        assert (counted["up"], counted["down"]) == (ours["bytes_up"], ours["bytes_down"])


def test_a_client_that_raises_is_dropped_and_named(sim_config, tmp_path, monkeypatch):
    cfg = sim_config(method={"name": "ffa"}, federation={"min_clients": 2})
    monkeypatch.setenv("FEDLORA_FLOWER_FAULT", "raise@2")
    run_config = to_run_config(cfg)
    strategy = FedloraStrategy(FederationServer.from_config(cfg, tmp_path, progress=False), round_timeout=5, node_wait=0)
    grid = InMemoryGrid(client_app(), run_config, cfg.federation.num_clients)
    faulty = sorted(strategy.server.sample_clients(2))[0]
    real_send = grid.send_and_receive

    def only_one_faulty(messages, *, timeout=None):  # the fault is set for every node: keep it to one
        messages = list(messages)
        replies = []
        for m in messages:
            client = grid.contexts[m.metadata.dst_node_id].node_config["partition-id"]
            with monkeypatch.context() as mp:
                if client != faulty:
                    mp.delenv("FEDLORA_FLOWER_FAULT")
                replies += real_send([m], timeout=timeout)
        return replies

    grid.send_and_receive = only_one_faulty
    strategy.start(grid)
    log = read_log(tmp_path)
    assert [d["client"] for d in log[2]["dropped"]] == [faulty]
    assert "injected fault at round 2" in log[2]["dropped"][0]["reason"]
    assert faulty not in log[2]["clients"] and len(log[2]["clients"]) == cfg.federation.clients_per_round - 1


def test_too_few_answers_stop_the_run(sim_config, tmp_path, monkeypatch):
    cfg = sim_config(method={"name": "ffa"}, federation={"min_clients": 1})
    monkeypatch.setenv("FEDLORA_FLOWER_FAULT", "raise@1")  # every node fails round 1
    with pytest.raises(RoundFailed, match="round 1: 0 of 3 clients answered"):
        run_in_memory(cfg, tmp_path)
    assert read_log(tmp_path)[-1]["failed"] is True


# -- a live federation: flower-superlink, flower-supernode processes, flwr run -------------------------------

def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture
def loopback_config(sim_config):
    def make(name: str, **sections):
        sections.setdefault("federation", {})
        sections["federation"] = {"num_clients": 2, "clients_per_round": 2, "rounds": 2} | sections["federation"]
        return sim_config(method={"name": name}, eval={"every": 0}, **sections)
    return make


@pytest.mark.live
@pytest.mark.slow
def test_live_loopback_federation_matches_the_simulator(loopback_config, tmp_path):
    """Fed-SB, its set-up exchange included, on SuperNode processes: the simulator's adapter and byte counts
    (FFA-LoRA's live runs, with the same checks, are the deployment script's in test_flower_deploy.py)."""
    federation = LoopbackFederation(tmp_path / "federation", num_nodes=2)
    try:
        cfg = loopback_config("fedsb")
        app = write_app(tmp_path / "app", cfg, tmp_path / "flower", round_timeout=120, node_wait=60).parent
        done = federation.run(app, timeout=300)
        assert (tmp_path / "flower" / "summary.json").exists(), done.stdout + federation.logs()
        sim = Simulator(cfg, tmp_path / "sim", progress=False)
        sim.run()
        assert_same_tensors(adapter(tmp_path / "flower"), adapter(tmp_path / "sim"))
        assert_flower_counts_the_logged_bytes(tmp_path / "flower", tmp_path / "sim")
    finally:
        federation.stop()
    assert all(p.poll() is not None for p in federation.processes.values())


@pytest.mark.live
@pytest.mark.slow
def test_live_federation_survives_a_raising_and_a_killed_client(loopback_config, tmp_path):
    """Client 1 raises in round 1, then hangs in round 2 and its SuperNode is killed: both rounds aggregate
    client 0 alone (min_clients = 1) and the log names the dropped client."""
    cfg = loopback_config("ffa", federation={"min_clients": 1})
    out = tmp_path / "flower"
    # a round's timeout that a healthy client's fresh ClientApp process meets on a loaded 2-core machine
    app = write_app(tmp_path / "app", cfg, out, round_timeout=90, node_wait=60).parent
    federation = LoopbackFederation(tmp_path / "federation", num_nodes=2,
                                    node_env={1: {"FEDLORA_FLOWER_FAULT": "raise@1,hang@2"}})
    runner = threading.Thread(target=federation.run, args=(app, 300))
    try:
        runner.start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not ((out / "rounds.jsonl").exists() and len(read_log(out)) >= 2):
            time.sleep(0.5)
        time.sleep(3)  # round 2 is out: node 1 hangs in it
        federation.kill("node1")
        runner.join(300)
        assert (out / "summary.json").exists(), federation.logs()
    finally:
        federation.stop()
        runner.join(30)
    log = read_log(out)
    assert [d["client"] for d in log[1]["dropped"]] == [1] and "injected fault" in log[1]["dropped"][0]["reason"]
    assert [d["client"] for d in log[2]["dropped"]] == [1]
    assert log[1]["clients"] == log[2]["clients"] == [0]


def test_a_node_trains_on_its_own_copy_of_the_data(sim_config, toy_data, tmp_path):
    """node config data-path: node 0 reads a file of its own that holds the rows the simulator's partition
    gives client 0, and trains on all of them (the run matches the simulator); node 1 a missing file (the run
    stops before round 0, naming the node and the file)."""
    cfg = sim_config(method={"name": "ffa"}, eval={"every": 0},
                     federation={"num_clients": 2, "clients_per_round": 2, "rounds": 1})
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    header, *rows = Path(toy_data["path"]).read_text().splitlines()
    copy = tmp_path / "mine" / "train.tsv"
    copy.parent.mkdir()
    copy.write_text("\n".join([header] + [rows[i] for i in sim.shards[0]]) + "\n")
    sim.run()
    run_config = to_run_config(cfg)
    grid = InMemoryGrid(client_app(), run_config, 2)
    list(grid.contexts.values())[0].node_config["data-path"] = str(copy)
    strategy = FedloraStrategy(FederationServer.from_config(cfg, tmp_path / "one", progress=False), round_timeout=5, node_wait=0)
    strategy.start(grid)
    assert_same_tensors(strategy.server.method.global_state, sim.method.global_state)

    list(grid.contexts.values())[1].node_config["data-path"] = str(tmp_path / "nowhere.tsv")
    strategy = FedloraStrategy(FederationServer.from_config(cfg, tmp_path / "two", progress=False), round_timeout=5, node_wait=0)
    with pytest.raises(ConfigError, match=f"SuperNode {list(grid.contexts)[1]} cannot take part: .*nowhere.tsv"):
        strategy.start(grid)
    assert not (tmp_path / "two" / "rounds.jsonl").exists()


def test_flower_init_writes_an_app_whose_run_config_is_the_config(tmp_path, toy_data):
    import tomllib

    from fedlora.cli import main
    from fedlora.config import load_config

    config = tmp_path / "run.toml"
    config.write_text(f'[data]\nname = "none"\npath = "{toy_data["path"]}"\ntext_columns = ["sentence"]\n'
                      '[federation]\nnum_clients = 3\nclients_per_round = 2\n')
    assert main(["flower", "init", str(tmp_path / "app"), str(config), "--set", "method.name=ffa",
                 "--out", str(tmp_path / "out")]) == 0
    project = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedlora.flower.server_app:app",
                                 "clientapp": "fedlora.flower.client_app:app"}
    flat = {}

    def walk(table, prefix=""):
        for k, v in table.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.update({prefix + k: v})
    walk(app["config"])
    assert flat["out"] == str(tmp_path / "out") and flat["fedlora.data.text_columns"] == '["sentence"]'
    assert from_run_config(flat) == load_config(config, ["method.name=ffa"])


def test_flower_init_rejects_a_bad_config_in_one_line(tmp_path, capsys):
    from fedlora.cli import main

    config = tmp_path / "bad.toml"
    config.write_text("[federation]\nnum_clients = 0\n")
    assert main(["flower", "init", str(tmp_path / "app"), str(config)]) == 2
    err = capsys.readouterr().err
    assert "num_clients" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "app").exists()


def test_malformed_replies_are_checked_like_the_simulator_checks_updates(sim_config, tmp_path):
    """Of the 3 clients of round 1, one sends a tensor of the wrong shape and one bytes that are no tensor:
    the server's update check drops both, naming them, and aggregates the third."""
    from flwr.app import Array, ArrayRecord

    cfg = sim_config(method={"name": "ffa"}, federation={"min_clients": 1, "rounds": 1})
    strategy = FedloraStrategy(FederationServer.from_config(cfg, tmp_path, progress=False), round_timeout=5, node_wait=0)
    grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    wrong_shape, garbage, _ = strategy.server.sample_clients(1)
    real_send = grid.send_and_receive

    def tamper(messages, *, timeout=None):
        replies = real_send(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.message_type != "train":
                continue
            client = strategy.nodes.client_of[reply.metadata.src_node_id]
            if client in (wrong_shape, garbage):
                arrays = reply.content["arrays"]
                key = next(iter(arrays))
                if client == wrong_shape:
                    arrays[key] = to_record({key: torch.zeros(3, 3)})[key]
                else:
                    arrays[key] = Array(dtype="no_such_dtype", shape=(2,), stype="torch.raw", data=b"12345678")
        return replies

    grid.send_and_receive = tamper
    strategy.start(grid)
    dropped = {d["client"]: d["reason"] for d in read_log(tmp_path)[1]["dropped"]}
    assert set(dropped) == {wrong_shape, garbage}
    assert "has shape (3, 3)" in dropped[wrong_shape] and "no readable tensors" in dropped[garbage]
    assert read_log(tmp_path)[1]["clients"] == sorted(set(strategy.server.sample_clients(1)) - set(dropped))


def test_a_node_the_superlink_reports_gone_is_dropped(sim_config, tmp_path):
    """The SuperLink answers for a node that went away with an error reply of its own, which carries no
    source node: the client it was sent to is dropped with the SuperLink's reason."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    cfg = sim_config(method={"name": "ffa"}, federation={"min_clients": 1, "rounds": 1})
    strategy = FedloraStrategy(FederationServer.from_config(cfg, tmp_path, progress=False), round_timeout=5, node_wait=0)
    grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    gone = strategy.server.sample_clients(1)[0]
    real_send = grid.send_and_receive

    def superlink(messages, *, timeout=None):
        replies = real_send(messages, timeout=timeout)
        for i, (message, reply) in enumerate(zip(messages, replies)):
            if reply.metadata.message_type == "train" and strategy.nodes.client_of[message.metadata.dst_node_id] == gone:
                replies[i] = create_message_error_unavailable_res_message(message.metadata, "node_unavail")
        return replies

    grid.send_and_receive = superlink
    strategy.start(grid)
    record = read_log(tmp_path)[1]
    assert [d["client"] for d in record["dropped"]] == [gone]
    assert record["dropped"][0]["reason"].startswith("failed on its node:")
    assert gone not in record["clients"] and record["clients"]


def test_run_config_carries_a_section_left_at_its_defaults_and_names_clashing_keys():
    from fedlora.config import build_config
    from fedlora.errors import ConfigError

    cfg = build_config({"method": {"name": "fedsb"}, "fedsb": {"init_data": "public", "public_data": {"name": "sst2"}}})
    assert from_run_config(to_run_config(cfg)) == cfg
    with pytest.raises(ConfigError, match="'fedlora.train.lr' is a value, not a section"):
        from_run_config({"fedlora.train.lr": 0.1, "fedlora.train.lr.x": 1})


def test_a_huge_update_is_dropped_on_flower_with_the_default_checks(sim_config, tmp_path):
    """One of the round's 3 clients sends an update of 3e38 in every coordinate: the default size rule
    (server.max_update_norm = 'auto') drops it on Flower as in the simulator."""
    cfg = sim_config(method={"name": "ffa"}, federation={"min_clients": 1, "rounds": 1})
    strategy = FedloraStrategy(FederationServer.from_config(cfg, tmp_path, progress=False), round_timeout=5, node_wait=0)
    grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    hostile = strategy.server.sample_clients(1)[1]
    real_send = grid.send_and_receive

    def tamper(messages, *, timeout=None):
        replies = real_send(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.message_type == "train" and strategy.nodes.client_of[reply.metadata.src_node_id] == hostile:
                arrays = reply.content["arrays"]
                reply.content["arrays"] = to_record({k: torch.full_like(v, 3e38) for k, v in from_record(arrays).items()})
        return replies

    grid.send_and_receive = tamper
    strategy.start(grid)
    record = read_log(tmp_path)[1]
    assert [d["client"] for d in record["dropped"]] == [hostile]
    assert "server.max_update_norm = 'auto'" in record["dropped"][0]["reason"]
    assert hostile not in record["clients"] and len(record["clients"]) == 2


@pytest.mark.parametrize("variant", ["sign_sketch", "signs", "dense"])
def test_fedsb_set_up_variants_on_flower_match_the_simulator_and_flowers_byte_counts(sim_config, tmp_path, variant):
    """Each phase of the set-up is one QUERY round (the default sketch is covered with every method above)."""
    cfg = sim_config(method={"name": "fedsb"}, fedsb={"init": variant}, eval={"every": 0}, federation={"rounds": 1})
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    strategy, _ = run_in_memory(cfg, tmp_path / "flower")
    assert_same_tensors(strategy.server.method.global_state, sim.method.global_state)
    round0 = read_log(tmp_path / "sim")[0]
    counted = json.loads((tmp_path / "flower" / FLOWER_BYTES).read_text())["0"]
    assert (counted["up"], counted["down"]) == (round0["bytes_up"], round0["bytes_down"])
    assert round0["bytes_up"] > 0
