"""Faults injected into whole runs: failing, slow, silent and hostile clients, crashes during checkpoint
writes, robust aggregation. Each test checks that the run survived and that its result is right."""
import copy
import json
import random
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.aggregation import combine
from fedlora.checkpoint import load as load_checkpoint
from fedlora.errors import ConfigError, FedloraError, RoundFailed
from fedlora.simulator import Simulator
from fedlora.validation import update_problem

from conftest import Killed, read_log, run_until_killed, without_seconds


def inject(sim, faults: dict, monkeypatch):
    """faults: (round, client) -> "raise" | "none" | callable(payload) -> hostile payload | "slow"."""
    real = sim.trainer.update
    uploads = {}

    def client_update(c, r, start, deadline, privacy=None, clip=None):
        fault = faults.get((r, c))
        if fault == "raise":
            raise RuntimeError(f"disk full on client {c}")
        if fault == "none":
            return None
        if fault == "slow":
            real_losses = sim.trainer.losses

            def slow(batch):
                time.sleep(0.4)
                return real_losses(batch)
            monkeypatch.setattr(sim.trainer, "losses", slow)
            try:
                return real(c, r, start, deadline, privacy, clip)
            finally:
                monkeypatch.setattr(sim.trainer, "losses", real_losses)
        update = real(c, r, start, deadline, privacy, clip)
        if callable(fault):
            update.payload = fault(dict(update.payload))
        else:
            uploads[(r, c)] = {k: v.clone() for k, v in update.payload.items()}
        return update

    monkeypatch.setattr(sim.trainer, "update", client_update)
    return uploads


def expected_mean(sim, uploads, r, answered):
    sizes = [sim.client_sizes[c] for c in answered]
    weights = [n / sum(sizes) for n in sizes]
    keys = uploads[(r, answered[0])].keys()
    return {k: sum(w * uploads[(r, c)][k] for c, w in zip(answered, weights)) for k in keys}


def assert_global_is(sim, expected):
    state = sim.method.eval_state()
    for k, v in expected.items():
        assert torch.allclose(state[k], v, atol=1e-6), k


def test_failing_and_silent_clients_are_dropped_and_weights_renormalised(sim_config, tmp_path, monkeypatch):
    cfg = sim_config(method={"name": "ffa"}, federation={"num_clients": 4, "clients_per_round": 4, "rounds": 1,
                                                          "min_clients": 2})
    sim = Simulator(cfg, tmp_path, progress=False)
    uploads = inject(sim, {(1, 0): "raise", (1, 2): "none"}, monkeypatch)
    sim.run()
    record = read_log(tmp_path)[1]
    assert record["clients"] == [1, 3]
    assert record["dropped"] == [{"client": 0, "reason": "raised RuntimeError: disk full on client 0"},
                                 {"client": 2, "reason": "returned no update"}]
    assert_global_is(sim, expected_mean(sim, uploads, 1, [1, 3]))
    assert record["agg_error"] < 1e-5


def test_a_client_past_the_timeout_is_dropped(sim_config, tmp_path, monkeypatch):
    cfg = sim_config(method={"name": "fedsb"}, federation={"num_clients": 3, "clients_per_round": 3, "rounds": 1,
                                                            "client_timeout": 0.5})
    sim = Simulator(cfg, tmp_path, progress=False)
    uploads = inject(sim, {(1, 1): "slow"}, monkeypatch)
    sim.run()
    record = read_log(tmp_path)[1]
    assert record["clients"] == [0, 2]
    assert record["dropped"][0]["client"] == 1
    assert "federation.client_timeout" in record["dropped"][0]["reason"]
    assert_global_is(sim, expected_mean(sim, uploads, 1, [0, 2]))


def _nan(p):
    k = next(iter(p))
    p[k] = p[k].clone().fill_(float("nan"))
    return p


def _inf(p):
    k = next(iter(p))
    p[k] = p[k].clone()
    p[k].view(-1)[0] = float("inf")
    return p


def _shape(p):
    k = next(iter(p))
    p[k] = torch.zeros(p[k].shape[0] + 1, *p[k].shape[1:])
    return p


def _dtype(p):
    k = next(iter(p))
    p[k] = p[k].double()
    return p


def _extra(p):
    p["bert.embeddings.word_embeddings.weight"] = torch.zeros(3)
    return p


def _missing(p):
    p.pop(next(iter(p)))
    return p


def _huge(p):
    k = next(iter(p))
    p[k] = p[k] + 1e4
    return p


def _not_a_tensor(p):
    p[next(iter(p))] = [1.0, 2.0]
    return p


@pytest.mark.parametrize("hostile,reason", [
    (_nan, "NaN or infinite"), (_inf, "NaN or infinite"), (_shape, "has shape"), (_dtype, "has dtype"),
    (_extra, "unexpected tensors"), (_missing, "missing tensors"), (_huge, "exceeds server.max_update_norm"),
    (_not_a_tensor, "not a tensor"), (lambda p: [1, 2], "not a mapping of tensors")])
def test_hostile_update_is_rejected_and_never_reaches_the_global_state(sim_config, tmp_path, monkeypatch,
                                                                       hostile, reason):
    cfg = sim_config(method={"name": "fedit"}, federation={"num_clients": 3, "clients_per_round": 3, "rounds": 1},
                     server={"max_update_norm": 100.0})
    sim = Simulator(cfg, tmp_path, progress=False)
    uploads = inject(sim, {(1, 1): hostile}, monkeypatch)
    sim.run()
    record = read_log(tmp_path)[1]
    assert record["clients"] == [0, 2]
    assert record["dropped"][0]["client"] == 1 and reason in record["dropped"][0]["reason"]
    assert_global_is(sim, expected_mean(sim, uploads, 1, [0, 2]))


def test_too_few_clients_stops_keeping_finished_rounds_and_resume_matches(sim_config, tmp_path, monkeypatch):
    cfg = sim_config(method={"name": "fedsb"}, federation={"num_clients": 3, "clients_per_round": 3, "rounds": 3,
                                                            "min_clients": 3})
    whole = Simulator(cfg, tmp_path / "whole", progress=False)
    whole.run()
    cut = Simulator(cfg, tmp_path / "cut", progress=False)
    inject(cut, {(2, 1): "raise"}, monkeypatch)
    with pytest.raises(RoundFailed, match=r"round 2: 2 of 3 clients answered, fewer than federation.min_clients = 3 "
                                          r"\(dropped: client 1: raised RuntimeError.*stopped after round 1"):
        cut.run()
    log = read_log(tmp_path / "cut")
    assert [r["round"] for r in log] == [0, 1, 2] and log[-1]["failed"]
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")["round"] == 1
    resumed = Simulator(cfg, tmp_path / "cut", progress=False)  # the client is back
    resumed.run(resume=True)
    assert without_seconds(read_log(tmp_path / "cut")) == without_seconds(read_log(tmp_path / "whole"))
    final, expected = resumed.method.eval_state(), whole.method.eval_state()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.parametrize("name", ["fedsa", "fedex"])
def test_retry_after_a_transient_fault_gives_the_clean_result(sim_config, tmp_path, monkeypatch, name):
    cfg = sim_config(method={"name": name}, federation={"num_clients": 3, "clients_per_round": 3, "rounds": 2,
                                                         "min_clients": 3, "on_too_few_clients": "retry"})
    clean = Simulator(cfg, tmp_path / "clean", progress=False)
    clean.run()
    sim = Simulator(cfg, tmp_path / "faulty", progress=False)
    calls = {"n": 0}
    real = sim.trainer.update

    def flaky(c, r, start, deadline, privacy=None, clip=None):  # client 2 fails its first try in round 1
        if (r, c) == (1, 2):
            calls["n"] += 1
            if calls["n"] == 1:
                raise ConnectionError("link reset")
        return real(c, r, start, deadline, privacy, clip)
    monkeypatch.setattr(sim.trainer, "update", flaky)
    sim.run()
    record = read_log(tmp_path / "faulty")[1]
    assert record["retries"] == 1 and record["dropped"] == []
    final, expected = sim.method.eval_state(), clean.method.eval_state()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert all(torch.equal(a, b) for a, b in zip(sim.adapted.base_weights().values(),
                                                  clean.adapted.base_weights().values()))


def test_retries_run_out(sim_config, tmp_path, monkeypatch):
    cfg = sim_config(federation={"num_clients": 3, "clients_per_round": 3, "rounds": 1, "min_clients": 3,
                                 "on_too_few_clients": "retry", "round_retries": 2})
    sim = Simulator(cfg, tmp_path, progress=False)
    inject(sim, {(1, 0): "raise"}, monkeypatch)
    with pytest.raises(RoundFailed, match="round 1"):
        sim.run()
    assert len(read_log(tmp_path)[-1]["attempts"]) == 3


def test_a_failed_attempt_leaves_a_clients_kept_optimizer_state_as_it_was(sim_config, tmp_path):
    cfg = sim_config(method={"name": "ffa"}, train={"keep_optimizer_state": True, "optimizer": "adamw"})
    sim = Simulator(cfg, tmp_path, progress=False)
    params = sim.adapted.set_trainable(sim.method.trainable_keys(1))
    first = sim.trainer.optimizer(0, params)
    sum(p.sum() for p in params).backward()
    first.step()
    sim.trainer.optimizer_states[0] = first.state_dict()
    saved = copy.deepcopy(sim.trainer.optimizer_states[0])
    attempt = sim.trainer.optimizer(0, params)  # an attempt that steps, then fails before it reports back
    attempt.step()
    assert saved["state"] and all(torch.equal(saved["state"][i][k], v) for i, state in
                                  sim.trainer.optimizer_states[0]["state"].items() for k, v in state.items())


class _TornWrite(Exception):
    pass


@pytest.mark.parametrize("dp", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_kill_during_checkpoint_write_then_resume_gives_the_same_run(sim_config, tmp_path, monkeypatch, dp):
    extra = {"privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0, "randomness": "seeded"}} if dp else {}
    cfg = sim_config(method={"name": "fedsb"}, federation={"rounds": 3}, train={"keep_optimizer_state": True},
                     **extra)
    whole = Simulator(cfg, tmp_path / "whole", progress=False)
    summary_whole = whole.run()

    import fedlora.checkpoint as checkpoint_module
    real_write = checkpoint_module.atomic_write
    writes = {"n": 0}

    def torn_write(path, data):  # the third checkpoint (round 2) dies half written
        writes["n"] += 1
        if writes["n"] == 3:
            path.with_name(path.name + ".tmp").write_bytes(data[:len(data) // 2])
            raise _TornWrite
        real_write(path, data)
    monkeypatch.setattr(checkpoint_module, "atomic_write", torn_write)
    with pytest.raises(_TornWrite):
        Simulator(cfg, tmp_path / "cut", progress=False).run()
    monkeypatch.setattr(checkpoint_module, "atomic_write", real_write)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")["round"] == 1

    resumed = Simulator(cfg, tmp_path / "cut", progress=False)
    summary = resumed.run(resume=True)
    final, expected = resumed.method.eval_state(), whole.method.eval_state()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert without_seconds(read_log(tmp_path / "cut")) == without_seconds(read_log(tmp_path / "whole"))
    assert summary["privacy"] == summary_whole["privacy"]
    if dp:
        assert summary["privacy"]["epsilon_max"] > 0


def test_checkpoint_of_another_method_is_refused(sim_config, tmp_path):
    Simulator(sim_config(method={"name": "ffa"}, federation={"rounds": 1}), tmp_path, progress=False).run()
    with pytest.raises(FedloraError, match="key 'method.name' differs"):
        Simulator(sim_config(method={"name": "fedsb"}), tmp_path, progress=False).run(resume=True)


def test_rng_state_is_restored_on_resume(sim_config, tmp_path, monkeypatch):
    cfg = sim_config(federation={"rounds": 2})
    run_until_killed(Simulator(cfg, tmp_path, progress=False), monkeypatch, after_round=1)
    saved = load_checkpoint(tmp_path / "checkpoint.safetensors")["rng"]
    torch.manual_seed(12345)
    np.random.seed(6789)
    random.seed(3)
    Simulator(cfg, tmp_path, progress=False).server.load_checkpoint()
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    assert np.random.get_state()[1].tolist() == saved["numpy"]["key"].tolist()
    assert random.getstate() == (saved["python"]["version"], tuple(saved["python"]["state"]),
                                 saved["python"]["gauss_next"])


# -- resuming on other data ---------------------------------------------------------------------

def _sentiment_rows(n: int, seed: int) -> str:
    rnd = random.Random(seed)
    return "sentence\tlabel\n" + "".join(f"{rnd.choice(['good film', 'bad film', 'great', 'awful'])} {seed} {i}\t"
                                         f"{i % 2}\n" for i in range(n))


def _stopped_run(sim_config, tmp_path, monkeypatch, **sections):
    """A run on its own copy of a 120-row training file, killed after round 1; its config."""
    (tmp_path / "train.tsv").write_text(_sentiment_rows(120, 0))
    (tmp_path / "dev.tsv").write_text(_sentiment_rows(16, 1))
    data = {"path": str(tmp_path / "train.tsv"), "eval_path": str(tmp_path / "dev.tsv")} | sections.pop("data", {})
    cfg = sim_config(data=data, **sections)
    sim = Simulator(cfg, tmp_path / "run", progress=False)
    run_until_killed(sim, monkeypatch, after_round=1)
    return cfg, sim


def test_resume_on_a_replaced_training_file_is_refused_naming_the_change(sim_config, tmp_path, monkeypatch):
    cfg, sim = _stopped_run(sim_config, tmp_path, monkeypatch, data={"partition": "iid"},
                            federation={"num_clients": 2, "clients_per_round": 2, "rounds": 3})
    assert list(sim.client_sizes) == [60, 60]
    log_before = (tmp_path / "run" / "rounds.jsonl").read_bytes()
    (tmp_path / "train.tsv").write_text(_sentiment_rows(300, 7))
    resumed = Simulator(cfg, tmp_path / "run", progress=False)
    trained = []
    monkeypatch.setattr(resumed.trainer, "update", lambda *a, **k: trained.append(a))
    with pytest.raises(FedloraError) as err:
        resumed.run(resume=True)
    message = str(err.value)
    assert f"training data {tmp_path / 'train.tsv'} differs (300 rows, was 120)" in message
    assert "2 of 2 clients' training rows changed (client 0: 60 -> 150 rows; client 1: 60 -> 150 rows)" in message
    assert "evaluation" not in message
    assert trained == [] and (tmp_path / "run" / "rounds.jsonl").read_bytes() == log_before


def test_resume_names_only_the_client_whose_rows_changed(sim_config, tmp_path, monkeypatch):
    cfg, sim = _stopped_run(sim_config, tmp_path, monkeypatch)  # dirichlet: the clients' sizes differ
    lines = (tmp_path / "train.tsv").read_text().splitlines(keepends=True)
    row = 37  # its text changes, its label does not: the partition stays the same
    lines[1 + row] = lines[1 + row].replace("film", "movie").replace("great", "superb").replace("awful", "dire")
    (tmp_path / "train.tsv").write_text("".join(lines))
    owner = next(c for c, shard in enumerate(sim.shards) if row in shard)
    with pytest.raises(FedloraError, match=rf"differs \(120 rows as before, not the same ones\); 1 of 4 clients' "
                                           rf"training rows changed \(client {owner}: {len(sim.shards[owner])} "
                                           r"rows as before, not the same ones\)"):
        Simulator(cfg, tmp_path / "run", progress=False).run(resume=True)


def test_resume_on_a_changed_evaluation_file_is_refused(sim_config, tmp_path, monkeypatch):
    cfg, _ = _stopped_run(sim_config, tmp_path, monkeypatch)
    (tmp_path / "dev.tsv").write_text(_sentiment_rows(20, 1))
    with pytest.raises(FedloraError, match=rf"the evaluation data {tmp_path / 'dev.tsv'} differs \(20 rows, was "
                                           r"16\); resume with the data the run started with"):
        Simulator(cfg, tmp_path / "run", progress=False).run(resume=True)


def test_a_sampled_population_is_fingerprinted_without_a_list_per_client(sim_config, tmp_path, monkeypatch):
    cfg, sim = _stopped_run(sim_config, tmp_path, monkeypatch, data={"partition": "sampled",
                                                                     "client_examples": [5, 20]},
                            federation={"num_clients": 100_000, "clients_per_round": 3, "rounds": 2})
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["data"]
    assert saved["clients"] is None and saved["train"]["rows"] == 120
    (tmp_path / "train.tsv").write_text(_sentiment_rows(120, 9))
    with pytest.raises(FedloraError, match=r"training data .* differs \(120 rows as before, not the same ones\); "
                                           r"resume with"):
        Simulator(cfg, tmp_path / "run", progress=False).run(resume=True)


def test_resume_on_unchanged_data_matches_the_whole_run(sim_config, tmp_path, monkeypatch):
    cfg, _ = _stopped_run(sim_config, tmp_path, monkeypatch, federation={"rounds": 3})
    resumed = Simulator(cfg, tmp_path / "run", progress=False)
    resumed.run(resume=True)
    whole = Simulator(cfg, tmp_path / "whole", progress=False)
    whole.run()
    assert without_seconds(read_log(tmp_path / "run")) == without_seconds(read_log(tmp_path / "whole"))
    final, expected = resumed.method.eval_state(), whole.method.eval_state()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


# -- robust aggregation -------------------------------------------------------------------------

def test_robust_rules_against_hand_computation():
    xs = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, -5.0]), torch.tensor([100.0, 0.0])]
    even = [1 / 3] * 3
    assert torch.equal(combine(xs, even, "median"), torch.tensor([2.0, 0.0]))
    # 0.6 of the weight on the third client: its value is the weighted median of every coordinate
    assert torch.equal(combine(xs, [0.2, 0.2, 0.6], "median"), torch.tensor([100.0, 0.0]))
    # 0.5 reached exactly at the second smallest value
    assert torch.equal(combine(xs, [0.3, 0.2, 0.5], "median"), torch.tensor([2.0, 0.0]))
    # cutting 1/3 of the weight at each end leaves the middle value of each coordinate
    assert torch.allclose(combine(xs, even, "trimmed_mean", 1 / 3 - 1e-9), torch.tensor([2.0, 0.0]), atol=1e-6)
    # cutting 0.1 at each end of four equal clients: 0.15 of the lowest and highest value remain
    ys = [torch.tensor([v]) for v in (0.0, 1.0, 2.0, 10.0)]
    expected = (0.15 * 0 + 0.25 * 1 + 0.25 * 2 + 0.15 * 10) / 0.8
    assert torch.allclose(combine(ys, [0.25] * 4, "trimmed_mean", 0.1), torch.tensor([expected]))
    assert torch.allclose(combine(ys, [0.25] * 4, "trimmed_mean", 0.0), torch.tensor([3.25]))
    assert torch.allclose(combine(xs, [0.5, 0.25, 0.25]), 0.5 * xs[0] + 0.25 * xs[1] + 0.25 * xs[2])


def test_median_aggregation_resists_a_hostile_client(sim_config, tmp_path, monkeypatch):
    cfg = sim_config(method={"name": "ffa"}, federation={"num_clients": 3, "clients_per_round": 3, "rounds": 1},
                     server={"aggregation": "median"})
    sim = Simulator(cfg, tmp_path, progress=False)
    uploads = inject(sim, {(1, 2): lambda p: {k: v + 1e3 for k, v in p.items()}}, monkeypatch)
    sim.run()
    state = sim.method.eval_state()
    for k in uploads[(1, 0)]:
        low = torch.minimum(uploads[(1, 0)][k], uploads[(1, 1)][k])
        high = torch.maximum(uploads[(1, 0)][k], uploads[(1, 1)][k])
        assert ((state[k] >= low - 1e-7) & (state[k] <= high + 1e-7)).all(), k


def test_robust_rules_refused_for_methods_that_are_not_a_weighted_sum(sim_config, tmp_path):
    with pytest.raises(ConfigError, match="server.aggregation = 'median' needs a method"):
        Simulator(sim_config(method={"name": "flora"}, server={"aggregation": "median"}), tmp_path, progress=False)


# -- privacy hygiene ----------------------------------------------------------------------------

def test_only_the_payload_leaves_a_client_and_logs_hold_no_client_data(sim_config, toy_data, tmp_path):
    cfg = sim_config(method={"name": "ffa"}, privacy={"noise_multiplier": 1.0},
                     train={"keep_optimizer_state": True})
    sim = Simulator(cfg, tmp_path, progress=False)
    method = sim.method
    sent = []
    real_upload = method.upload

    def upload(c, trained, r):
        payload = real_upload(c, trained, r)
        sent.append(payload)
        return payload
    method.upload = upload
    sim.run()
    allowed = set(sim.adapted.keys_of(method.uploads))
    assert sent and all(set(p) == allowed and all(isinstance(v, torch.Tensor) for v in p.values()) for p in sent)
    assert all(k.endswith(".lora_B") or k.startswith("classifier.") for k in allowed)
    log = read_log(tmp_path)
    assert all(r["train_loss"] is None for r in log)  # computed on raw data, not released under DP
    sentences = [line.split("\t")[0].strip() for line in open(toy_data["path"]).read().splitlines()[1:]]
    stored = b"".join(p.read_bytes() for p in (tmp_path / "rounds.jsonl", tmp_path / "summary.json",
                                               tmp_path / "checkpoint.safetensors"))
    assert not any(s.encode() in stored for s in sentences if len(s) > 8)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert set(checkpoint) == {"round", "config", "method", "base_weights", "runtime", "totals",
                               "last_eval", "last_client_eval", "privacy", "rng", "record", "data"}


# -- load ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_thousand_clients_with_five_percent_failing(sim_config, tmp_path, monkeypatch):
    rnd = random.Random(1)
    rows = "".join(f"{rnd.choice(['good film', 'bad film', 'great', 'awful'])} {i}\t{i % 2}\n" for i in range(3000))
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)
    cfg = sim_config(method={"name": "ffa"}, data={"path": str(tmp_path / "train.tsv"), "partition": "iid"},
                     federation={"num_clients": 1000, "clients_per_round": 1000, "rounds": 3, "min_clients": 900},
                     train={"local_steps": 1, "batch_size": 2}, eval={"every": 0, "max_examples": 8})
    sim = Simulator(cfg, tmp_path / "run", progress=False)
    failing = {(r, c): "raise" for r in (1, 2, 3) for c in random.Random(r).sample(range(1000), 50)}
    uploads = inject(sim, failing, monkeypatch)
    captured = {}
    real_aggregate = sim.method.aggregate

    def aggregate(payloads, weights, clients, r):
        captured[r] = {k: v.clone() for k, v in sim.method.global_state.items()}
        return real_aggregate(payloads, weights, clients, r)
    sim.method.aggregate = aggregate
    sim.run()
    log = read_log(tmp_path / "run")
    assert [r["round"] for r in log] == [0, 1, 2, 3]
    for rec in log[1:]:
        r = rec["round"]
        failed = sorted(c for (rr, c) in failing if rr == r)
        assert [d["client"] for d in rec["dropped"]] == failed
        assert rec["clients"] == sorted(set(range(1000)) - set(failed))
    answered = log[3]["clients"]
    assert_global_is(sim, expected_mean(sim, uploads, 3, answered))


# -- random malformed updates -------------------------------------------------------------------

_MUTATIONS = st.lists(st.tuples(
    st.sampled_from(["drop", "add", "reshape", "dtype", "nan", "inf", "scale", "list", "int_tensor"]),
    st.sampled_from(["l0.lora_B", "l1.lora_B", "l2.lora_R"]),
    st.floats(-1e4, 1e4, allow_nan=False)), max_size=3)


def _mutate(payload: dict, mutations) -> dict:
    out = dict(payload)
    for kind, key, value in mutations:
        if key not in out:
            if kind == "add":
                out[key] = torch.zeros(2)
            continue
        t = out[key]
        if kind == "drop":
            out.pop(key)
        elif kind == "reshape" and isinstance(t, torch.Tensor):
            out[key] = t.reshape(-1)
        elif kind == "dtype" and isinstance(t, torch.Tensor):
            out[key] = t.to(torch.float64)
        elif kind in ("nan", "inf") and isinstance(t, torch.Tensor) and t.is_floating_point():
            out[key] = t.clone()
            out[key].view(-1)[0] = float(kind)
        elif kind == "scale" and isinstance(t, torch.Tensor):
            out[key] = t * value
        elif kind == "list" and isinstance(t, torch.Tensor):
            out[key] = t.tolist()
        elif kind == "int_tensor" and isinstance(t, torch.Tensor):
            out[key] = t.round().to(torch.int64)
    return out


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(_MUTATIONS, st.floats(1e-3, 1e3))
def test_random_malformed_updates_are_refused_or_aggregated_exactly(mutations, max_norm):
    g = torch.Generator().manual_seed(0)
    start = {"l0.lora_B": torch.randn(4, 3, generator=g), "l1.lora_B": torch.randn(2, 3, generator=g)}
    honest = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()} for _ in range(2)]
    payload = _mutate(honest[0], mutations)

    reason = update_problem(payload, start, max_norm)

    well_formed = (set(payload) == set(start) and all(
        isinstance(v, torch.Tensor) and v.shape == start[k].shape and v.dtype == start[k].dtype
        and bool(torch.isfinite(v).all()) for k, v in payload.items()))
    if not well_formed:
        assert reason is not None and "\n" not in reason
        return
    distance = sum(((payload[k].double() - start[k].double()) ** 2).sum().item() for k in start) ** 0.5
    assert (reason is None) == (distance <= max_norm), (reason, distance)
    if reason is None:
        accepted = [payload, honest[1]]
        for k in start:
            assert torch.allclose(combine([p[k] for p in accepted], [0.25, 0.75]),
                                  0.25 * payload[k] + 0.75 * honest[1][k])


def test_a_checkpoint_from_another_version_resumes_and_a_changed_key_is_refused(sim_config, tmp_path):
    from fedlora.checkpoint import save as save_checkpoint

    cfg = sim_config(method={"name": "ffa"}, federation={"rounds": 1})
    Simulator(cfg, tmp_path / "run", progress=False).run()
    path = tmp_path / "run" / "checkpoint.safetensors"
    state = load_checkpoint(path)
    for key in ("mechanism", "modulus_bits", "min_survivors"):  # as an earlier version wrote it
        del state["config"]["privacy"][key]
    state["config"]["data"]["added_later"] = None  # as a later version writes a key it adds, left unset
    save_checkpoint(state, path)
    longer = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 2})})
    with pytest.raises(FedloraError, match="key 'train.lr' differs"):
        changed = longer.model_copy(update={"train": longer.train.model_copy(update={"lr": longer.train.lr * 2})})
        Simulator(changed, tmp_path / "run", progress=False).run(resume=True)
    Simulator(longer, tmp_path / "run", progress=False).run(resume=True)
    assert [row["round"] for row in read_log(tmp_path / "run")] == [0, 1, 2]
