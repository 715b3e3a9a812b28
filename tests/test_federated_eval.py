"""Natural partitions and federated evaluation: one training file per client in the simulator
(data.client_paths), each client's own evaluation file (data.client_eval_paths, a Flower node's eval-path), and
the same per-client evaluation on Flower as in the simulator."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.api import make_config
from fedlora.errors import ConfigError, FedloraError
from fedlora.simulator import Simulator

from conftest import ROOT, SHARED_DATA, read_log

SIZES, EVAL_SIZES = (61, 24, 35), (14, 0, 9)  # client 1 has no evaluation file


def party_files(toy_data, folder: Path) -> tuple[list[str], list[str]]:
    """The toy training rows cut into three files of unequal sizes, and two evaluation files (client 1: none)."""
    header, *train = Path(toy_data["path"]).read_text().splitlines()
    _, *dev = Path(toy_data["eval_path"]).read_text().splitlines()
    paths, eval_paths, start, eval_start = [], [], 0, 0
    for i, (n, m) in enumerate(zip(SIZES, EVAL_SIZES)):
        paths.append(str(folder / f"org{i}-train.tsv"))
        Path(paths[-1]).write_text("\n".join([header] + train[start:start + n]) + "\n")
        eval_paths.append(str(folder / f"org{i}-eval.tsv") if m else "")
        if m:
            Path(eval_paths[-1]).write_text("\n".join([header] + dev[eval_start:eval_start + m]) + "\n")
        start, eval_start = start + n, eval_start + m
    return paths, eval_paths


def party_config(sim_config, paths, eval_paths, eval_path=None, **sections):
    data = {"path": None, "eval_path": eval_path, "partition": "iid", "client_paths": paths,
            "client_eval_paths": eval_paths}
    return sim_config(data=data, **{"federation": {"num_clients": 3, "clients_per_round": 2, "rounds": 2}} | sections)


def test_client_files_conflict_with_shared_file_settings(sim_config, toy_data, tmp_path):
    paths, eval_paths = party_files(toy_data, tmp_path)
    with pytest.raises(ConfigError, match=r"data.client_paths and data.path cannot be given together"):
        sim_config(data={"client_paths": paths}, federation={"num_clients": 3, "clients_per_round": 2})
    with pytest.raises(ConfigError, match=r"data.client_paths and data.partition cannot be given together"):
        sim_config(data={"path": None, "partition": "task", "client_paths": paths},
                   federation={"num_clients": 3, "clients_per_round": 2})
    with pytest.raises(ConfigError, match=r"data.client_paths has 3 files but federation.num_clients is 4"):
        party_config(sim_config, paths, None, federation={"num_clients": 4, "clients_per_round": 2})
    with pytest.raises(ConfigError, match=r"data.client_eval_paths has 2 files but data.client_paths has 3"):
        party_config(sim_config, paths, eval_paths[:2])
    with pytest.raises(ConfigError, match=r"data.client_eval_paths needs data.client_paths"):
        sim_config(data={"client_eval_paths": eval_paths})


def test_a_missing_client_file_is_named_before_the_model_loads(sim_config, toy_data, tmp_path, monkeypatch):
    from fedlora import experiment

    paths, eval_paths = party_files(toy_data, tmp_path)
    monkeypatch.setattr(experiment, "load_classifier", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(FedloraError, match=r"^config key 'data.client_eval_paths\[2\]': file not found: .*nowhere"):
        Simulator(party_config(sim_config, paths, eval_paths[:2] + [str(tmp_path / "nowhere.tsv")]), tmp_path / "r",
                  progress=False)
    with pytest.raises(FedloraError, match=r"^config key 'data.client_paths\[1\]': file not found"):
        Simulator(party_config(sim_config, [paths[0], str(tmp_path / "x.tsv"), paths[2]], None), tmp_path / "r",
                  progress=False)


def test_each_client_trains_on_all_of_its_file_and_evaluates_on_its_own(sim_config, toy_data, tmp_path):
    paths, eval_paths = party_files(toy_data, tmp_path)
    cfg = party_config(sim_config, paths, eval_paths, eval={"every": 1})
    sim = Simulator(cfg, tmp_path / "run", progress=False)
    assert list(sim.client_sizes) == list(SIZES)
    drawn: dict[int, set] = {}
    real = sim.trainer.batch_indices

    def spy(client, r, private):
        for chosen in real(client, r, private):
            drawn.setdefault(client, set()).update(int(i) for i in chosen)
            yield chosen
    sim.trainer.batch_indices = spy
    summary = sim.run()
    starts = [0, SIZES[0], SIZES[0] + SIZES[1]]
    for c, rows in drawn.items():  # only its own file's rows
        assert rows <= set(range(starts[c], starts[c] + SIZES[c]))
    log = read_log(tmp_path / "run")
    assert all(rec["eval"] is None for rec in log)  # no data.eval_path: the server evaluates nothing
    for rec in log:
        ev = rec["client_eval"]
        assert sorted(ev["clients"]) == ["0", "2"] and ev["failed"] == {}
        assert [ev["clients"][c]["examples"] for c in ("0", "2")] == [EVAL_SIZES[0], EVAL_SIZES[2]]
        mean = (ev["clients"]["0"]["accuracy"] * EVAL_SIZES[0] + ev["clients"]["2"]["accuracy"] * EVAL_SIZES[2]) \
            / (EVAL_SIZES[0] + EVAL_SIZES[2])
        assert ev["mean"]["accuracy"] == pytest.approx(mean) and ev["mean"]["examples"] == 23
    assert summary["final_client_eval"] == log[-1]["client_eval"] and summary["final_eval"] is None


def test_the_server_still_evaluates_on_its_own_file_beside_the_clients(sim_config, toy_data, tmp_path):
    paths, eval_paths = party_files(toy_data, tmp_path)
    cfg = party_config(sim_config, paths, eval_paths, eval_path=toy_data["eval_path"],
                       federation={"num_clients": 3, "clients_per_round": 2, "rounds": 1})
    summary = Simulator(cfg, tmp_path / "run", progress=False).run()
    last = read_log(tmp_path / "run")[-1]
    assert last["eval"] == summary["final_eval"] and set(last["eval"]) == {"accuracy", "loss"}
    assert last["client_eval"]["mean"]["examples"] == 23 and summary["baselines"] is not None


def test_a_trained_run_without_a_server_file_is_evaluated_on_a_file_given(sim_config, toy_data, tmp_path):
    from fedlora.errors import DataError
    from fedlora.inference import load_trained

    paths, eval_paths = party_files(toy_data, tmp_path)
    cfg = party_config(sim_config, paths, eval_paths, federation={"num_clients": 3, "clients_per_round": 2,
                                                                  "rounds": 1})
    Simulator(cfg, tmp_path / "run", progress=False).run()
    with pytest.raises(DataError, match="no evaluation file of its own .* --data FILE"):
        load_trained(tmp_path / "run").evaluate()
    assert load_trained(tmp_path / "run", data=eval_paths[0]).evaluate()["accuracy"] >= 0


def test_a_run_that_evaluates_nothing_says_so_at_its_start(sim_config, toy_data, tmp_path, capsys):
    paths, _ = party_files(toy_data, tmp_path)
    sim = Simulator(party_config(sim_config, paths, None, federation={"num_clients": 3, "clients_per_round": 2,
                                                                       "rounds": 1}), tmp_path / "run")
    assert any("nothing will be evaluated" in w for w in sim.server.warnings)
    sim.run()
    assert "warning: nothing will be evaluated" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} not found")
def test_the_example_parties_files_are_those_make_parties_writes(tmp_path):
    """examples/deploy/data: the committed files are what examples/deploy/make_parties.py writes from the data
    folder, and examples/deploy/three_parties.toml reads them (paths relative to its folder)."""
    import subprocess
    import sys

    from fedlora.config import load_config

    deploy = ROOT / "examples" / "deploy"
    subprocess.run([sys.executable, str(deploy / "make_parties.py"), str(SHARED_DATA), str(tmp_path)], check=True,
                   capture_output=True)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.csv"))
    assert written == sorted(p.relative_to(deploy / "data") for p in (deploy / "data").rglob("*.csv"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (deploy / "data" / name).read_bytes(), name
    assert sum((deploy / "data" / name).stat().st_size for name in written) < 200_000
    cfg = load_config(deploy / "three_parties.toml")
    assert [Path(p) for p in cfg.data.client_paths] == [deploy / "data" / f"org{i}" / "train.csv" for i in range(3)]


# -- on Flower -----------------------------------------------------------------------------------------------

flwr = pytest.importorskip("flwr", reason="flwr (the 'flower' extra of fedlora) is not installed")

from fedlora.federation import FederationServer, client_model, evaluate_model  # noqa: E402
from fedlora.flower.client_app import client_app  # noqa: E402
from fedlora.flower.project import to_run_config  # noqa: E402
from fedlora.flower.strategy import FedloraStrategy  # noqa: E402

from test_flower import InMemoryGrid, assert_same_tensors, server_identity  # noqa: E402,F401


def run_on_flower(cfg, out: Path, node_files=None, **options) -> tuple[FedloraStrategy, InMemoryGrid]:
    """The config through the Flower strategy and ClientApp in memory; `node_files`: {client: node config
    entries} (data-path, eval-path)."""
    grid = InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)
    for context in grid.contexts.values():
        context.node_config |= (node_files or {}).get(context.node_config["partition-id"], {})
    strategy = FedloraStrategy(FederationServer.from_config(cfg, out, progress=False), round_timeout=5, node_wait=0,
                               **options)
    strategy.start(grid)
    return strategy, grid


def assert_same_client_evaluations(ours: list[dict], theirs: list[dict]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert a["round"] == b["round"] and a["clients"] == b["clients"]
        assert a.get("client_eval") is not None and b.get("client_eval") is not None, a["round"]
        assert a["client_eval"]["clients"].keys() == b["client_eval"]["clients"].keys()
        for c, metrics in a["client_eval"]["clients"].items():
            assert metrics == pytest.approx(b["client_eval"]["clients"][c], abs=1e-5), (a["round"], c)
        assert a["client_eval"]["mean"] == pytest.approx(b["client_eval"]["mean"], abs=1e-5)


@pytest.mark.parametrize("name", ["ffa", "fedex", "fedsb"])
def test_flower_evaluates_every_client_as_the_simulator_does_on_the_same_files(sim_config, toy_data, tmp_path, name):
    """data.client_paths and data.client_eval_paths: the simulator's per-client evaluation, and on Flower every
    node (which reads its own files of those lists) evaluating the global model it is sent: the same metrics,
    the same global state and bytes (FedEx-LoRA's broadcast goes out with the evaluation; Fed-SB's set-up needs
    each node's set-up examples from the server's plan)."""
    paths, eval_paths = party_files(toy_data, tmp_path)
    cfg = party_config(sim_config, paths, eval_paths, method={"name": name}, eval={"every": 1})
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    strategy, _ = run_on_flower(cfg, tmp_path / "flower")
    assert strategy.server.client_sizes == list(SIZES)
    assert_same_tensors(strategy.server.method.global_state, sim.method.global_state)
    ours, theirs = read_log(tmp_path / "sim"), read_log(tmp_path / "flower")
    assert_same_client_evaluations(ours, theirs)
    assert [r["bytes_down"] for r in ours] == [r["bytes_down"] for r in theirs]
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["final_client_eval"]["mean"] == pytest.approx(ours[-1]["client_eval"]["mean"], abs=1e-5)


def test_fedsa_clients_evaluate_their_own_personalised_model(sim_config, toy_data, tmp_path):
    """FedSA-LoRA: each client evaluates the averaged A with its own B, on Flower (the node's own files given in
    its node config) as in the simulator; that model differs from the global one."""
    paths, eval_paths = party_files(toy_data, tmp_path)
    cfg = party_config(sim_config, paths, eval_paths, method={"name": "fedsa"}, eval={"every": 1},
                       federation={"num_clients": 3, "clients_per_round": 3, "rounds": 2})
    sim = Simulator(cfg, tmp_path / "sim", progress=False)
    sim.run()
    nodes = {i: {"data-path": paths[i]} | ({"eval-path": eval_paths[i]} if eval_paths[i] else {}) for i in range(3)}
    flower_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"client_eval_paths": None})})
    run_on_flower(flower_cfg, tmp_path / "flower", nodes)
    ours, theirs = read_log(tmp_path / "sim"), read_log(tmp_path / "flower")
    assert_same_client_evaluations(ours, theirs)
    for c in (0, 2):  # the personalised model, not the global one, was evaluated
        task = sim.eval_tasks[c]
        personal = evaluate_model(task, sim.adapted, client_model(sim.method, sim.trainer.own_states[c]), cfg.eval)
        global_ = evaluate_model(task, sim.adapted, sim.method.eval_state(), cfg.eval)
        assert theirs[-1]["client_eval"]["clients"][str(c)] == pytest.approx(personal, abs=1e-5)
        assert personal["loss"] != pytest.approx(global_["loss"], abs=1e-4)


def test_a_node_whose_evaluation_file_is_bad_is_named_and_the_others_evaluate(sim_config, toy_data, tmp_path,
                                                                             caplog):
    paths, eval_paths = party_files(toy_data, tmp_path)
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tgrade\nsome words\t1\n")  # not the data's columns
    cfg = party_config(sim_config, paths, None, eval={"every": 1})
    nodes = {0: {"eval-path": eval_paths[0]}, 1: {"eval-path": str(tmp_path / "missing.tsv")},
             2: {"eval-path": str(bad)}}
    strategy, _ = run_on_flower(cfg, tmp_path / "flower", nodes)
    log = read_log(tmp_path / "flower")
    for rec in log:
        ev = rec["client_eval"]
        assert list(ev["clients"]) == ["0"] and ev["mean"]["examples"] == EVAL_SIZES[0]
        assert sorted(ev["failed"]) == ["1", "2"]
        for c, path in (("1", "missing.tsv"), ("2", "bad.tsv")):
            why = ev["failed"][c]
            assert "\n" not in why and f"(client {c})" in why and path in why and "SuperNode" in why, why
    assert "file not found" in log[0]["client_eval"]["failed"]["1"]
    warned = [r.getMessage() for r in caplog.records if "takes no part in evaluation" in r.getMessage()]
    assert len(warned) == 2 and all("\n" not in w for w in warned)


def test_under_dp_the_run_says_what_evaluation_replies_reveal_and_can_turn_them_off(sim_config, toy_data,
                                                                                   tmp_path, caplog):
    paths, eval_paths = party_files(toy_data, tmp_path)
    cfg = party_config(sim_config, paths, eval_paths, method={"name": "ffa"}, privacy={"noise_multiplier": 1.0},
                       federation={"num_clients": 3, "clients_per_round": 2, "rounds": 1})
    strategy, _ = run_on_flower(cfg, tmp_path / "on")
    assert any("released outside the DP guarantee" in w and "federated-eval=false" in w
               for w in strategy.server.warnings)
    assert read_log(tmp_path / "on")[-1]["client_eval"]["clients"]
    strategy, _ = run_on_flower(cfg, tmp_path / "off", federated_eval=False)
    assert all("client_eval" not in rec for rec in read_log(tmp_path / "off"))
    assert any("nothing will be evaluated" in w for w in strategy.server.warnings)
