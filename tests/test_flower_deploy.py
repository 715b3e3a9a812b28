"""A Flower deployment as docs/flower.md documents it: the deployment script and the documentation's
commands, who is who among the nodes and their sizes, resume after a crash (in memory and with the
SuperLink killed on loopback), the exit status and the per-round lines of `fedlora flower run`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="flwr (the 'flower' extra of fedlora) is not installed")

from fedlora.errors import ConfigError  # noqa: E402
from fedlora.federation import FederationServer  # noqa: E402
from fedlora.flower.client_app import client_app  # noqa: E402
from fedlora.flower.project import from_run_config, to_run_config, write_app  # noqa: E402
from fedlora.flower.strategy import FLOWER_BYTES, FedloraStrategy, check_supported  # noqa: E402
from fedlora.seeding import generator  # noqa: E402
from fedlora.simulator import Simulator  # noqa: E402

from conftest import read_log  # noqa: E402
from flower_federation import BIN, LoopbackFederation  # noqa: E402
from test_flower import (InMemoryGrid, adapter, assert_flower_counts_the_logged_bytes,  # noqa: E402,F401
                         assert_same_tensors, loopback_config, server_identity)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "deploy" / "loopback.sh"


def strategy_for(cfg, out: Path, resume: bool = False, node_wait: float = 0) -> FedloraStrategy:
    return FedloraStrategy(FederationServer.from_config(cfg, out, progress=False), round_timeout=5,
                           node_wait=node_wait, resume=resume)


# -- the documentation is the script ----------------------------------------------------------------------

def test_every_command_of_the_documented_deployment_is_in_the_script():
    docs = (ROOT / "docs" / "flower.md").read_text()
    block = re.search(r"<!-- deployment:.*?-->\n```bash\n(.*?)```", docs, re.S)
    assert block, "docs/flower.md has no deployment block"
    script = {line.strip() for line in SCRIPT.read_text().splitlines()}
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) >= 15
    assert [c for c in commands if c not in script] == []
    for needed in ("--database", "--enable-supernode-auth", "flwr supernode register", "--port $((9094 + i))",
                   'export PATH="$VENV/bin:$PATH"', 'root-certificates = "$PWD/certs/ca.crt"'):
        assert needed in block.group(1), needed
    # the connection is defined before the first flwr command that names it
    assert block.group(1).index("[superlink.fedlora-link]") < block.group(1).index("flwr supernode register")


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
def test_the_loopback_deployment_script_runs_and_stops_everything(sim_config, tmp_path):
    """examples/deploy/loopback.sh on loopback: TLS, node authentication, a SuperLink with a database, three
    SuperNodes, `fedlora flower run`; the run's adapter is the simulator's, the stream has a line per round,
    and no process of the deployment outlives the script."""
    import tomli_w

    cfg = sim_config(method={"name": "ffa"}, eval={"every": 0}, train={"local_steps": 2},
                     federation={"num_clients": 3, "clients_per_round": 3, "rounds": 2})
    config = tmp_path / "config.toml"
    raw = cfg.model_dump(exclude_defaults=True)
    raw["data"]["name"] = "none"  # TOML has no None
    config.write_bytes(tomli_w.dumps(raw).encode())
    work = tmp_path / "deploy"
    env = os.environ | {"VENV": str(BIN.parent), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run(["bash", str(SCRIPT), str(config), str(work)], env=env, capture_output=True, text=True,
                          timeout=900)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(work.glob("*.log")))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + logs
    assert re.search(r"fedlora round 1/2: 3 clients, [\d,]+ bytes up", done.stdout), done.stdout[-3000:]
    assert re.search(r"fedlora round 2/2: 3 clients, accuracy [\d.]+", done.stdout)
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    assert_same_tensors(adapter(work / "run"), adapter(tmp_path / "sim"))
    assert_flower_counts_the_logged_bytes(work / "run", tmp_path / "sim")
    left = [p for p in Path("/proc").glob("[0-9]*") if str(work) in _cmdline(p)]
    assert left == [], [_cmdline(p) for p in left]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# -- who is who, and the nodes' sizes ----------------------------------------------------------------------

class LateGrid(InMemoryGrid):
    """Nodes that connect one after another: the first `ready` at once, one more at every later look."""

    def __init__(self, *args, ready: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.ready = ready

    def get_node_ids(self):
        nodes = list(self.contexts)[:self.ready]
        self.ready += 1
        return nodes


def test_nodes_that_connect_late_are_asked_until_every_client_has_one(sim_config, tmp_path):
    cfg = sim_config(method={"name": "ffa"}, eval={"every": 0}, federation={"rounds": 1})
    grid = LateGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients, ready=1)
    strategy = strategy_for(cfg, tmp_path, node_wait=60)
    strategy.start(grid)
    assert sorted(strategy.nodes.node_of) == list(range(cfg.federation.num_clients))


def test_a_duplicate_client_id_is_refused_whenever_its_node_connects(sim_config, tmp_path):
    cfg = sim_config(method={"name": "ffa"}, federation={"num_clients": 2, "clients_per_round": 2})
    grid = LateGrid(client_app(), to_run_config(cfg), 3, ready=1)  # the third node connects last
    nodes = list(grid.contexts)
    grid.contexts[nodes[2]].node_config["partition-id"] = 0
    grid.contexts[nodes[1]].node_config["partition-id"] = 0
    for context in grid.contexts.values():
        context.node_config["num-partitions"] = 2
    with pytest.raises(ConfigError, match=f"SuperNodes {nodes[0]} and {nodes[1]} both have partition-id 0"):
        strategy_for(cfg, tmp_path, node_wait=60).start(grid)
    assert not (tmp_path / "rounds.jsonl").exists()


def test_a_client_without_a_node_stops_the_run_when_the_wait_is_over(sim_config, tmp_path):
    cfg = sim_config(method={"name": "ffa"})
    grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    del grid.contexts[max(grid.contexts)]
    with pytest.raises(ConfigError, match=r"no SuperNode for clients \[3\] within node-wait = 1 s \(3 of 4"):
        strategy_for(cfg, tmp_path, node_wait=1).start(grid)


def test_a_node_whose_config_is_wrong_stops_the_run_with_its_reason(sim_config, tmp_path):
    cfg = sim_config(method={"name": "ffa"})
    grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    node = max(grid.contexts)
    del grid.contexts[node].node_config["partition-id"]
    with pytest.raises(ConfigError, match=f"SuperNode {node} cannot take part: .*partition-id is missing"):
        strategy_for(cfg, tmp_path).start(grid)


def test_node_sizes_weight_the_updates_and_shared_data_sizes_are_checked(sim_config, toy_data, tmp_path):
    """Node 0 trains on its own file of 30 rows: the server takes its size from the node (and weights its
    update by it). A node on the shared file whose shard differs from the server's partition is refused."""
    cfg = sim_config(method={"name": "ffa"}, eval={"every": 0},
                     federation={"num_clients": 2, "clients_per_round": 2, "rounds": 1})
    rows = Path(toy_data["path"]).read_text().splitlines()
    own = tmp_path / "own.tsv"
    own.write_text("\n".join(rows[:31]) + "\n")  # header and 30 examples, all of them client 0's shard here
    grid = InMemoryGrid(client_app(), to_run_config(cfg), 2)
    first = min(grid.contexts)
    grid.contexts[first].node_config["data-path"] = str(own)
    strategy = strategy_for(cfg, tmp_path / "own")
    partition = list(strategy.server.client_sizes)
    from fedlora.flower.client_app import ClientRuntime

    reported = len(ClientRuntime(to_run_config(cfg), str(own)).trainer.shards[0])
    strategy.start(grid)
    assert strategy.server.client_sizes == [reported, partition[1]] and reported != partition[0]
    assert strategy.server.method.client_sizes is strategy.server.client_sizes
    assert strategy.server.plan.client_sizes == [reported, partition[1]]

    # the shared file, but a node whose config partitions it otherwise (another seed): refused
    other = cfg.model_copy(update={"seed": cfg.seed + 1})
    grid = InMemoryGrid(client_app(), to_run_config(other), 2)
    strategy = strategy_for(cfg, tmp_path / "shared")
    if [len(s) for s in _shards(other)] == strategy.server.client_sizes:
        pytest.skip("the other seed partitions alike")
    with pytest.raises(ConfigError, match="examples of the shared training data, the server's partition gives it"):
        strategy.start(grid)


@pytest.mark.slow
def test_under_dp_every_node_trains_with_the_noise_calibrated_from_the_nodes_sizes(sim_config, toy_data, tmp_path,
                                                                                  monkeypatch):
    """Node 0 trains on its own file of 30 rows under DP, fewer than the config's partition gives it: the
    server calibrates sigma from the nodes' sizes, and each node checks it against its own plan and trains with
    it, not with the sigma of the config's partition (which would spend more than epsilon on 30 rows)."""
    from fedlora.plan import FederationPlan
    from fedlora.flower.client_app import ClientRuntime

    cfg = sim_config(method={"name": "ffa"}, eval={"every": 0}, privacy={"epsilon": 3.0},
                     federation={"num_clients": 2, "clients_per_round": 2, "rounds": 1})
    rows = Path(toy_data["path"]).read_text().splitlines()
    own = tmp_path / "own.tsv"
    own.write_text("\n".join(rows[:31]) + "\n")
    trained_with = {}
    real_take = ClientRuntime.take_privacy

    def spy(runtime, client, settings):
        privacy = real_take(runtime, client, settings)
        trained_with.setdefault(client, set()).add(privacy.noise_multiplier)
        return privacy

    monkeypatch.setattr(ClientRuntime, "take_privacy", spy)
    grid = InMemoryGrid(client_app(), to_run_config(cfg), 2)
    grid.contexts[min(grid.contexts)].node_config["data-path"] = str(own)
    strategy = strategy_for(cfg, tmp_path / "own")
    partition = list(strategy.server.client_sizes)
    strategy.start(grid)
    sizes = strategy.server.client_sizes
    assert sizes[0] < partition[0]
    sigma = strategy.server.ledger.noise_multiplier
    assert trained_with == {0: {sigma}, 1: {sigma}}
    from_partition = FederationPlan(cfg, partition).noise_multiplier()
    assert sigma > from_partition * 1.01  # the small node needs more noise than the partition's sizes suggest
    assert strategy.server.ledger.max_epsilon() <= 3.0 * (1 + 1e-6)

    # a node refuses a noise multiplier, delta or set-up size its own plan cannot take
    runtime = ClientRuntime(to_run_config(cfg), str(own))
    settings = {"noise-multiplier": sigma, "delta": strategy.server.ledger.delta, "init-examples": 0}
    runtime.take_privacy(0, settings)
    spends_more = f"client 0's planned training on its {sizes[0]} examples would spend epsilon"
    with pytest.raises(ConfigError, match=spends_more):
        runtime.take_privacy(0, settings | {"noise-multiplier": from_partition * 0.9})
    with pytest.raises(ConfigError, match="for delta 0.01, more than"):
        runtime.take_privacy(0, settings | {"delta": 0.01})


def _shards(cfg):
    from fedlora.flower.client_app import ClientRuntime

    return ClientRuntime(to_run_config(cfg)).trainer.shards


# -- resume ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fedsb", "fedex"])
def test_a_run_that_stopped_resumes_on_new_nodes_to_the_uninterrupted_result(sim_config, tmp_path, name):
    """The run stops in round 2 (the grid fails); the resumed run starts on nodes that kept nothing (a new
    Flower run) and ends with the uninterrupted simulator's global state, W0 and byte counts."""
    cfg = sim_config(method={"name": name}, eval={"every": 0}, federation={"rounds": 3})
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    out = tmp_path / "flower"
    grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    real_send = grid.send_and_receive

    def crash_in_round_2(messages, *, timeout=None):
        if any(m.metadata.message_type == "train" and m.metadata.group_id == "2" for m in messages):
            raise ConnectionError("the SuperLink is gone")
        return real_send(messages, timeout=timeout)

    grid.send_and_receive = crash_in_round_2
    with pytest.raises(ConnectionError):
        strategy_for(cfg, out).start(grid)
    assert [r["round"] for r in read_log(out)] == [0, 1]
    with pytest.raises(Exception, match=r"already holds a run .*fedlora flower run APP CONNECTION --resume"):
        strategy_for(cfg, out).start(InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients))

    strategy = strategy_for(cfg, out, resume=True)
    strategy.start(InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients))
    assert_same_tensors(strategy.server.method.global_state, sim.method.global_state)
    if sim.method.changes_base:
        assert_same_tensors(strategy.server.adapted.base_weights(), sim.adapted.base_weights())
    assert [r["round"] for r in read_log(out)] == [0, 1, 2, 3]
    counted = json.loads((out / FLOWER_BYTES).read_text())
    for rec in read_log(tmp_path / "sim"):
        c = counted.get(str(rec["round"]), {"up": 0, "down": 0})
        assert (c["up"], c["down"]) == (rec["bytes_up"], rec["bytes_down"]), rec["round"]


def test_fedsa_resumes_on_nodes_that_keep_their_own_b_in_a_state_dir(sim_config, tmp_path):
    """FedSA-LoRA's clients keep their own B, which the server never sees: each node writes it to its
    `state-dir` after every round it trains in. The run stops in round 3; the resumed run starts on new
    nodes (empty node state) with the same state-dirs and ends with the uninterrupted simulator's global
    state and every client's own B. Nodes without a state-dir are refused for the resume, with the setting."""
    from fedlora.flower.records import from_record

    cfg = sim_config(method={"name": "fedsa"}, eval={"every": 0}, federation={"rounds": 4})
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    out = tmp_path / "flower"

    def grid_with_state_dirs():
        grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
        for context in grid.contexts.values():
            context.node_config["state-dir"] = str(tmp_path / f"node{context.node_config['partition-id']}")
        return grid

    grid = grid_with_state_dirs()
    real_send = grid.send_and_receive

    def crash_in_round_3(messages, *, timeout=None):
        if any(m.metadata.message_type == "train" and m.metadata.group_id == "3" for m in messages):
            real_send(messages, timeout=timeout)  # the clients trained round 3 (and wrote its B)
            raise ConnectionError("the SuperLink is gone")
        return real_send(messages, timeout=timeout)

    grid.send_and_receive = crash_in_round_3
    with pytest.raises(ConnectionError):
        strategy_for(cfg, out).start(grid)
    assert [r["round"] for r in read_log(out)] == [0, 1, 2]
    with pytest.raises(ConfigError, match="keeps no state of its own.*state-dir"):
        strategy_for(cfg, out, resume=True).start(
            InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients))

    strategy = strategy_for(cfg, out, resume=True)
    grid = grid_with_state_dirs()
    strategy.start(grid)
    assert [r["round"] for r in read_log(out)] == [0, 1, 2, 3, 4]
    assert_same_tensors(strategy.server.method.global_state, sim.method.global_state)
    kept = {c.node_config["partition-id"]: c.state for c in grid.contexts.values()}
    assert sorted(sim.trainer.own_states) == list(range(cfg.federation.num_clients))
    for client, own in sim.trainer.own_states.items():
        assert_same_tensors(from_record(kept[client]["fedlora.own"]), own)


# docs/flower.md's commands after the deployment block's exports (PATH, FLWR_HOME), in the folder of my-app
DEPLOYED_RUN = "fedlora flower run my-app fedlora-link"
RESUME = "fedlora flower run my-app fedlora-link --resume"
SECURE_RUN = "fedlora flower run my-app fedlora-link --run-config secagg-threshold=0.66"


def test_the_documented_run_commands_are_the_ones_run_here():
    docs = (ROOT / "docs" / "flower.md").read_text()
    assert f"\n{DEPLOYED_RUN}\n```" in docs
    for command in (RESUME, SECURE_RUN):
        assert f"\n    {command}\n" in docs, command


def documented(command: str, folder: Path, federation: LoopbackFederation, timeout: float = 600):
    return subprocess.run(["bash", "-c", command], cwd=folder, env=federation.env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
def test_the_superlink_killed_mid_run_and_restarted_resumes_to_the_uninterrupted_adapter(sim_config, tmp_path):
    """Live: kill the SuperLink (and the ServerApp it runs) after round 1's checkpoint, start it again on the
    same database; `fedlora flower run` without --resume is refused (exit 1, the reason and the command),
    with --resume the run ends with the simulator's adapter, its stream one line per round. The commands
    are docs/flower.md's, as written."""
    cfg = sim_config(method={"name": "ffa"}, eval={"every": 0}, train={"local_steps": 2},
                     federation={"num_clients": 2, "clients_per_round": 2, "rounds": 3})
    out = tmp_path / "flower"
    write_app(tmp_path / "my-app", cfg, out, round_timeout=120, node_wait=120)
    federation = LoopbackFederation(tmp_path / "federation", num_nodes=2, connection="fedlora-link")
    try:
        first = threading.Thread(target=documented, args=(DEPLOYED_RUN, tmp_path, federation))
        first.start()
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not any(r["round"] == 1 for r in _log(out)):
            time.sleep(0.5)
        assert any(r["round"] == 1 for r in _log(out)), federation.logs()
        time.sleep(1)  # the checkpoint follows the round's row
        federation.kill("superlink")
        first.join(120)
        assert not (out / "summary.json").exists()
        federation.restart_superlink()

        refused = documented(DEPLOYED_RUN, tmp_path, federation, timeout=300)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "already holds a run" in refused.stderr
        assert f"continue it: {RESUME}" in refused.stderr

        resumed = documented(RESUME, tmp_path, federation)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:] + federation.logs()
    finally:
        federation.stop()
    last = max(r["round"] for r in read_log(out) if r["round"] < 3)
    assert re.search(r"resumed after round \d", resumed.stdout)
    for r in range(last + 1, 4):
        assert f"fedlora round {r}/3: 2 clients" in resumed.stdout
    assert [r["round"] for r in read_log(out)] == [0, 1, 2, 3]
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    assert_same_tensors(adapter(out), adapter(tmp_path / "sim"))


def _log(out: Path) -> list[dict]:
    try:
        return read_log(out)
    except (FileNotFoundError, ValueError):
        return []


def test_flower_init_writes_absolute_paths_and_the_data_root(tmp_path, monkeypatch):
    from fedlora.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDLORA_DATA_DIR", "shared-data")
    (tmp_path / "run.toml").write_text('[data]\nname = "sst2"\n[model]\npath = "models/tiny"\n')
    assert main(["flower", "init", "app", "run.toml"]) == 0
    import tomllib

    config = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = from_run_config(config)
    assert cfg.data.root == str(tmp_path / "shared-data") and cfg.model.path == str(tmp_path / "models" / "tiny")
    assert config["resume"] is False and Path(config["out"]).is_absolute()



# -- secure aggregation: Flower's SecAgg+ ----------------------------------------------------------------------

QUANTUM = 2 * 8.0 / 2 ** 22  # SecAgg+'s quantisation step for the clipping range fedlora uses


def secagg_bound(clients: int) -> float:
    """How far SecAgg+'s weighted mean may be from the exact one: each client's value is rounded
    stochastically (less than a step), and its weight share to 1/2^22 (half a step on values within +-8);
    the shares sum to at least 1 (the heaviest client's is 1)."""
    return 1.5 * clients * QUANTUM


def run_secure(cfg, out: Path, secagg: float = 0.66, grid=None) -> tuple[FedloraStrategy, InMemoryGrid]:
    grid = grid or InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    strategy = FedloraStrategy(FederationServer.from_config(cfg, out, progress=False), round_timeout=5,
                               node_wait=0, secagg=secagg)
    strategy.start(grid)
    return strategy, grid


@pytest.mark.parametrize("name", ["ffa", "fedsb", "fedit", "rolora"])
def test_the_secure_aggregate_is_the_plain_one_within_secaggs_quantisation(sim_config, tmp_path, name):
    """Round 1 of 4 clients, 3 sampled: the secure mean is the exact one within SecAgg+'s quantisation.
    Fed-SB's set-up sums its votes through SecAgg+ too; votes are integers, so its B and A are the plain ones."""
    cfg = sim_config(method={"name": name}, eval={"every": 0}, federation={"rounds": 1}, fedsb={"init": "signs"})
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    strategy, _ = run_secure(cfg, tmp_path / "secure")
    assert_same_tensors(strategy.server.method.global_state, sim.method.global_state, tol=secagg_bound(3))
    changed = max((strategy.server.method.global_state[k] - v).abs().max().item()
                  for k, v in sim.method.seed_state(generator(cfg.seed, "init")).items()
                  if k in strategy.server.method.global_state)
    assert changed > 100 * QUANTUM  # the round did move the state: the comparison is not of two seeds
    rows = read_log(tmp_path / "secure")
    assert all(r["secure_aggregation"] for r in rows[1:])
    assert [r["clients"] for r in rows] == [r["clients"] for r in read_log(tmp_path / "sim")]


def test_fedsb_set_up_sums_reach_the_server_only_through_secagg(sim_config, tmp_path, monkeypatch):
    """The default set-up (sign_sketch) under SecAgg+: each phase's sum is the hand-computed one, from the
    clients' votes M = sum_i sign(G_i) (the plain 'signs' set-up's sum), within the quantisation of that
    phase's clipping range: sign(G) Omega for the range, Q^T sign(G) with the server's own Q for the
    projection; every client is charged and counted as in the plain run."""
    from fedlora.init_sb import reply_bound, sketch_matrix
    from fedlora.methods.fedsb import FedSB

    sums = []
    real_sum = FedSB._sum

    def record(ask_sum, request, clients):
        total, answered = real_sum(ask_sum, request, clients)
        sums.append((request, total, answered))
        return total, answered

    monkeypatch.setattr(FedSB, "_sum", staticmethod(record))
    base = dict(method={"name": "fedsb"}, eval={"every": 0}, federation={"rounds": 1})
    plain = Simulator(sim_config(**base, fedsb={"init": "signs"}), tmp_path / "votes", progress=False)
    plain.initialise()
    (_, votes, voters), = sums
    sums.clear()
    cfg = sim_config(**base)
    assert cfg.fedsb.init == "sign_sketch"
    strategy = FedloraStrategy(FederationServer.from_config(cfg, tmp_path / "secure", progress=False),
                               round_timeout=5, node_wait=0, secagg=0.66)
    grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    strategy.connect(grid)
    record0 = strategy.initialise(grid)
    (ranges, range_sum, range_clients), (project, projection_sum, project_clients) = sums
    assert range_clients == project_clients == sorted(voters) == record0["clients"]
    adapted = strategy.server.adapted
    for phase, request, total in (("range", ranges, range_sum), ("project", project, projection_sum)):
        bound = 1.5 * len(voters) * 2 * reply_bound(adapted, request) / 2 ** 22
        for i, (name, layer) in enumerate(adapted.layers.items()):
            M = votes[f"{name}.signs"].double()
            if phase == "range":
                omega = sketch_matrix(layer, request.sketch_size, request.sketch_seed, i).double()
                expected, got = M @ omega, total[f"{name}.range"]
            else:
                expected, got = request.arrays[f"{name}.basis"].double().T @ M, total[f"{name}.projection"]
            assert expected.abs().max() > 1000 * bound  # sums of votes, far above the quantisation
            assert (got.double() - expected).abs().max() < bound, (phase, name)
    float32_bytes = sum(4 * t.numel() for t in (range_sum | projection_sum).values())
    assert record0["bytes_up"] == float32_bytes * len(voters)
    assert strategy.flower_bytes.get(0, {}).get("up", 0) == 0  # no plain set-up reply reached the server


def test_fedsvd_refactorises_the_secure_mean_of_B(sim_config, tmp_path):
    """FedSVD's server needs only the mean of B: under SecAgg+ each layer's B A and the head are the plain
    round's within the quantisation (the factors themselves may differ by a rotation the SVD leaves free)."""
    cfg = sim_config(method={"name": "fedsvd"}, eval={"every": 0}, federation={"rounds": 1})
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    strategy, _ = run_secure(cfg, tmp_path / "secure")
    secure, plain = strategy.server.method.global_state, sim.method.global_state
    seed = sim.method.seed_state(generator(cfg.seed, "init"))
    for layer in sim.adapted.layers:
        B, A = secure[f"{layer}.lora_B"], secure[f"{layer}.lora_A"]
        assert torch.allclose(A @ A.T, torch.eye(A.shape[0]), atol=1e-5)
        product = plain[f"{layer}.lora_B"] @ plain[f"{layer}.lora_A"]
        assert product.abs().max() > 100 * QUANTUM  # the round moved B: the comparison is not of zeros
        # (B_secure - B_plain) A_0, each entry of the first within the bound
        bound = secagg_bound(3) * seed[f"{layer}.lora_A"].abs().sum(0).max() + 1e-6
        assert (B @ A - product).abs().max() < bound
    assert_same_tensors({k: secure[k] for k in sim.adapted.head_params},
                        {k: plain[k] for k in sim.adapted.head_params}, tol=secagg_bound(3))


def test_a_client_that_drops_out_of_a_secure_round_is_tolerated(sim_config, tmp_path, monkeypatch):
    """One of round 1's 3 clients fails while the masked vectors are collected (after the key exchange):
    SecAgg+ (threshold 2 of 3) reconstructs its masks and the round aggregates the other two, as a plain
    round without it does."""
    cfg = sim_config(method={"name": "ffa"}, eval={"every": 0}, federation={"min_clients": 2, "rounds": 1})
    plain_out, secure_out = tmp_path / "plain", tmp_path / "secure"
    faulty = Simulator(cfg, tmp_path / "sim", progress=False).server.sample_clients(1)[1]

    def fault_at(grid):
        real_send = grid.send_and_receive

        def send(messages, *, timeout=None):
            replies = []
            for m in messages:
                client = grid.contexts[m.metadata.dst_node_id].node_config["partition-id"]
                with monkeypatch.context() as mp:
                    if client == faulty:
                        mp.setenv("FEDLORA_FLOWER_FAULT", "raise@1")
                    replies += real_send([m], timeout=timeout)
            return replies
        grid.send_and_receive = send
        return grid

    plain = strategy_for(cfg, plain_out)
    plain.start(fault_at(InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)))
    secure, _ = run_secure(cfg, secure_out, grid=fault_at(InMemoryGrid(client_app(), to_run_config(cfg),
                                                                       cfg.federation.num_clients)))
    assert [d["client"] for d in read_log(secure_out)[1]["dropped"]] == [faulty]
    assert read_log(secure_out)[1]["clients"] == read_log(plain_out)[1]["clients"]
    assert_same_tensors(secure.server.method.global_state, plain.server.method.global_state, tol=secagg_bound(2))


def capture_masked_vectors(grid) -> dict:
    """Every masked vector the grid's nodes send the server through SecAgg+ (client -> [vector], in the order
    received, SecAgg+'s weight factor first), checking that no reply carries plain arrays."""
    import numpy as np
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    received, real_send = {}, grid.send_and_receive

    def capture(messages, *, timeout=None):
        replies = real_send(messages, timeout=timeout)
        for reply in replies:
            if not reply.has_error() and RECORD_KEY_CONFIGS in reply.content.config_records:
                record = reply.content.config_records[RECORD_KEY_CONFIGS]
                if Key.MASKED_PARAMETERS in record:
                    client = grid.contexts[reply.metadata.src_node_id].node_config["partition-id"]
                    vector = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
                    received.setdefault(client, []).append(np.concatenate([a.ravel() for a in vector]))
            assert "arrays" not in reply.content.array_records or not reply.content.array_records["arrays"]
        return replies

    grid.send_and_receive = capture
    return received


@pytest.mark.parametrize("name", ["ffa", "fedsb"])
def test_the_server_receives_only_masked_uploads(sim_config, tmp_path, monkeypatch, name):
    """Every upload a node hands to SecAgg+ (Fed-SB's set-up replies too) is compared with what reaches the
    server: the masked vectors the server receives, dequantised, are nowhere near the uploads (nor is any
    unmasked upload sent)."""
    import numpy as np
    from flwr.common.secure_aggregation.quantization import dequantize

    import fedlora.flower.secure as secure_module

    uploads = {}  # client -> [(upload, clipping range)], in the order sent
    real_fitres = secure_module.fitres_content

    def spy(payload, settings, client):
        vector = np.concatenate([payload[k].float().numpy().ravel() for k in sorted(payload)])
        uploads.setdefault(client, []).append((vector, float(settings["clip"])))
        return real_fitres(payload, settings, client)

    monkeypatch.setattr(secure_module, "fitres_content", spy)
    cfg = sim_config(method={"name": name}, eval={"every": 0}, federation={"rounds": 1})
    grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    received = capture_masked_vectors(grid)
    run_secure(cfg, tmp_path, grid=grid)
    assert sorted(received) == sorted(uploads)
    # a round's uploads, and for Fed-SB its two set-up phases before it
    phases = 3 if name == "fedsb" else 1
    assert sum(map(len, uploads.values())) == cfg.federation.clients_per_round + (phases - 1) * len(uploads)
    for client, sent in uploads.items():
        assert len(received[client]) == len(sent)
        for (upload, clip), vector in zip(sent, received[client]):
            masked = dequantize([vector[1:].astype(np.float64)], clip, 2 ** 22)[0]  # [0] is the weight factor
            assert masked.shape == upload.shape
            # plain would differ by a quantisation step
            assert np.abs(masked - upload).mean() > 100 * clip, (client, clip)


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_secure_aggregation_is_refused_for_methods_that_need_each_clients_factors(sim_config, name):
    with pytest.raises(ConfigError, match=f"method '{name}' cannot use secure aggregation"):
        check_supported(sim_config(method={"name": name}), secagg=0.66)
    with pytest.raises(ConfigError, match="server.aggregation = 'median'"):
        check_supported(sim_config(method={"name": "ffa"}, server={"aggregation": "median"}), secagg=0.66)


@pytest.mark.parametrize("variant", ["dense", "sketch"])
def test_fedsb_set_ups_that_send_gradient_sums_are_refused_under_secure_aggregation(sim_config, variant):
    with pytest.raises(ConfigError, match=f"fedsb.init = '{variant}' sends the clients' gradient sums"):
        check_supported(sim_config(method={"name": "fedsb"}, fedsb={"init": variant}), secagg=0.66)
    public = {"init": variant, "init_data": "public", "public_data": {"name": "sst2"}}
    check_supported(sim_config(method={"name": "fedsb"}, fedsb=public), secagg=0.66)  # nothing sent: nothing refused


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
def test_live_secure_aggregation_on_loopback_matches_the_simulator(loopback_config, tmp_path):
    """fedsb and ffa on a live loopback federation with SecAgg+, docs/flower.md's command as written (with 2
    clients a threshold of 0.66 needs both): the exported adapter is the simulator's within SecAgg+'s
    quantisation, every round is logged as secure."""
    federation = LoopbackFederation(tmp_path / "federation", num_nodes=2, connection="fedlora-link")
    try:
        for name in ("fedsb", "ffa"):
            # Fed-SB's set-up votes go through SecAgg+ too, as integers: the set-up is the plain one
            cfg = loopback_config(name, federation={"rounds": 1}, fedsb={"init": "signs"})
            out = tmp_path / f"flower-{name}"
            write_app(tmp_path / name / "my-app", cfg, out, round_timeout=120, node_wait=60)
            done = documented(SECURE_RUN, tmp_path / name, federation, timeout=400)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + federation.logs()
            assert "Secure aggregation completed" in done.stdout
            assert read_log(out)[1]["secure_aggregation"] is True and read_log(out)[1]["clients"] == [0, 1]
            sim = Simulator(cfg, tmp_path / f"sim-{name}", progress=False)
            sim.run()
            assert_same_tensors(adapter(out), adapter(tmp_path / f"sim-{name}"), tol=secagg_bound(2))
    finally:
        federation.stop()
