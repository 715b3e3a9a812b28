"""Whole federated runs on a tiny model: logs, byte counts, determinism, resume, exactness in the log."""
import json
import struct

import pytest
import torch
from safetensors.torch import save as safetensors_save

from fedlora.errors import FedloraError
from fedlora.methods import METHODS
from fedlora.simulator import Simulator

from conftest import read_log, run_until_killed, without_seconds


def serialised_tensor_bytes(payload):
    """Bytes of tensor data in a real safetensors serialisation of the payload (header excluded)."""
    blob = safetensors_save({k: v.contiguous() for k, v in payload.items()})
    header = struct.unpack("<Q", blob[:8])[0]
    return len(blob) - 8 - header


@pytest.mark.parametrize("name", list(METHODS))
def test_logged_bytes_are_the_serialised_payloads(sim_config, tmp_path, name):
    cfg = sim_config(method={"name": name})
    sim = Simulator(cfg, tmp_path, progress=False)
    sent = {"up": {}, "down": {}}
    method = sim.method
    real_upload, real_download, real_aggregate = method.upload, method.download, method.aggregate
    current = {"round": 0}

    def upload(client, trained, r):
        payload = real_upload(client, trained, r)
        sent["up"][current["round"]] = sent["up"].get(current["round"], 0) + serialised_tensor_bytes(payload)
        return payload

    def download(client):
        payload = real_download(client)
        sent["down"][current["round"]] = sent["down"].get(current["round"], 0) + serialised_tensor_bytes(payload)
        return payload

    def aggregate(payloads, weights, clients, r):
        agg = real_aggregate(payloads, weights, clients, r)
        if agg.broadcast:
            sent["down"][r] += serialised_tensor_bytes(agg.broadcast) * cfg.federation.num_clients
        return agg

    real_round = sim.round

    def round_(r):
        current["round"] = r
        return real_round(r)

    method.upload, method.download, method.aggregate, sim.round = upload, download, aggregate, round_
    sim.run()
    log = read_log(tmp_path)
    assert [r["round"] for r in log] == [0, 1, 2]
    for rec in log[1:]:
        assert rec["bytes_up"] == sent["up"][rec["round"]] > 0
        assert rec["bytes_down"] == sent["down"].get(rec["round"], 0)
    if name == "fedsb":  # the default sign sketch: S_i Omega and Q^T S_i up, Q to them, B and A to every client
        layers, k = sim.adapted.layers.values(), cfg.adapter.rank + cfg.fedsb.oversampling
        init = len(log[0]["clients"])
        sketches = sum(k * (layer.d_out + layer.d_in) for layer in layers) * 4 * init
        bases = sum(k * layer.d_out for layer in layers) * 4 * init
        ba = sum(layer.rank * (layer.d_out + layer.d_in) for layer in layers) * 4 * cfg.federation.num_clients
        assert (log[0]["bytes_up"], log[0]["bytes_down"]) == (sketches, bases + ba)
    else:
        assert log[0]["bytes_up"] == log[0]["bytes_down"] == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in log)
    assert summary["bytes_down_total"] == sum(r["bytes_down"] for r in log)


def test_run_log_fields_and_agg_error(sim_config, tmp_path):
    for name in ("fedit", "ffa"):
        out = tmp_path / name
        Simulator(sim_config(method={"name": name}), out, progress=False).run()
        log = read_log(out)
        for rec in log:
            assert set(rec) >= {"round", "clients", "train_loss", "eval", "bytes_up", "bytes_down", "agg_error",
                                "epsilon", "seconds"}
            assert rec["epsilon"] is None
            assert 0 <= rec["eval"]["accuracy"] <= 1
        assert len(log[1]["clients"]) == 3
        if name == "fedit":
            assert all(r["agg_error"] > 1e-3 for r in log[1:])
        else:
            assert all(r["agg_error"] < 1e-5 for r in log[1:])
        assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_same_seed_same_numbers_other_seed_differs(sim_config, tmp_path):
    a = Simulator(sim_config(method={"name": "fedsb"}), tmp_path / "a", progress=False).run()
    b = Simulator(sim_config(method={"name": "fedsb"}), tmp_path / "b", progress=False).run()
    c = Simulator(sim_config(method={"name": "fedsb"}, seed=4), tmp_path / "c", progress=False).run()
    assert without_seconds(read_log(tmp_path / "a")) == without_seconds(read_log(tmp_path / "b"))
    assert a["final_eval"] == b["final_eval"]
    assert without_seconds(read_log(tmp_path / "a")) != without_seconds(read_log(tmp_path / "c"))


# RoLoRA: killed after round 1 (B), resumed into round 2 (A); FedSVD: a re-factorised A and B resumed
@pytest.mark.parametrize("name,keep", [("fedex", False), ("fedsa", True), ("fedsb", True), ("rolora", False),
                                       ("fedsvd", False)])
def test_resume_after_kill_is_bit_identical(sim_config, tmp_path, monkeypatch, name, keep):
    cfg = sim_config(method={"name": name}, federation={"rounds": 3}, train={"keep_optimizer_state": keep})
    whole = Simulator(cfg, tmp_path / "whole", progress=False)
    whole.run()

    run_until_killed(Simulator(cfg, tmp_path / "cut", progress=False), monkeypatch, after_round=1)
    with (tmp_path / "cut" / "rounds.jsonl").open("a") as f:  # a round logged but never checkpointed
        f.write(json.dumps({"round": 2, "partial": True}) + "\n")

    resumed = Simulator(cfg, tmp_path / "cut", progress=False)
    resumed.run(resume=True)
    final_whole, final_resumed = whole.method.eval_state(), resumed.method.eval_state()
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)
    if whole.method.changes_base:
        assert all(torch.equal(a, b) for a, b in zip(whole.adapted.base_weights().values(),
                                                      resumed.adapted.base_weights().values()))
    assert without_seconds(read_log(tmp_path / "whole")) == without_seconds(read_log(tmp_path / "cut"))


def test_resume_refuses_other_config_and_fresh_run_refuses_existing_dir(sim_config, tmp_path):
    Simulator(sim_config(federation={"rounds": 1}), tmp_path, progress=False).run()
    with pytest.raises(FedloraError, match="already holds a run"):
        Simulator(sim_config(federation={"rounds": 1}), tmp_path, progress=False).run()
    with pytest.raises(FedloraError, match="key 'train.lr' differs"):
        Simulator(sim_config(train={"lr": 0.5}), tmp_path, progress=False).run(resume=True)
    (tmp_path / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(FedloraError, match="checkpoint.safetensors: not a fedlora checkpoint"):
        Simulator(sim_config(federation={"rounds": 1}), tmp_path, progress=False).run(resume=True)


def test_more_rounds_can_be_added_on_resume(sim_config, tmp_path):
    Simulator(sim_config(federation={"rounds": 1}), tmp_path, progress=False).run()
    Simulator(sim_config(federation={"rounds": 2}), tmp_path, progress=False).run(resume=True)
    assert [r["round"] for r in read_log(tmp_path)] == [0, 1, 2]


def test_memory_is_shared_between_clients(sim_config, tmp_path):
    """One base model for every client: no module of the model is copied per client."""
    sim = Simulator(sim_config(federation={"num_clients": 4, "clients_per_round": 4}), tmp_path, progress=False)
    ids_before = {id(p) for p in sim.model.parameters()}
    sim.run()
    assert {id(p) for p in sim.model.parameters()} == ids_before


def test_full_fedavg_exports_a_complete_model(sim_config, tmp_path):
    from transformers import AutoModelForSequenceClassification

    sim = Simulator(sim_config(method={"name": "full"}, federation={"rounds": 1}), tmp_path, progress=False)
    sim.run()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    sim.model.eval()
    batch = sim.task.batch(range(8), sim.task.data.eval)
    batch.pop("labels")
    with torch.no_grad():
        assert (loaded(**batch).logits - sim.model(**batch).logits).abs().max() < 1e-5
