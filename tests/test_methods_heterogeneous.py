"""Clients of different ranks (adapter.client_ranks), FlexLoRA and HetLoRA: each server rule against the
paper's rule computed by hand on the same client states, the bytes each client's rank sends, DP and the
joint path on rank-cut factors, and the PEFT export of a heterogeneous run."""
import json
import math
import shlex
import tomllib
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedlora.adapters import AdaptedModel
from fedlora.api import make_config as build_config
from fedlora.cli import main
from fedlora.comm import communication_report
from fedlora.errors import ConfigError
from fedlora.federation import aggregation_error
from fedlora.methods import METHODS, InitContext
from fedlora.privacy.grad_sample import for_trainable
from fedlora.simulator import Simulator

from conftest import read_log, run_until_killed, tiny_bert, without_seconds
from test_grad_sample import ours, padded_batch, reference, rel_err
from test_parallel_clients import (TOLERANCE, assert_runs_match,  # noqa: F401 - the fixtures are used
                                   bert_without_dropout, cfg_parallel, joint_groups)

RANKS = [2, 4, 3]
WEIGHTS = [0.5, 0.3, 0.2]
S = 2.0  # the LoRA scaling: it must cancel out of every rule


def setup(name, ranks=RANKS, **sections):
    cls = METHODS[name]
    adapted = AdaptedModel(tiny_bert(), parameterisation=cls.parameterisation, rank=4, scaling=S,
                           target_modules=["query", "value"], head_modules=["classifier"])
    raw = {"seed": 7, "method": {"name": name}, "adapter": {"rank": 4, "client_ranks": ranks},
           "federation": {"num_clients": len(ranks), "clients_per_round": len(ranks)}} | sections
    method = cls(adapted, build_config(raw), [50, 30, 20])
    method.initialise(InitContext([0, 1, 2], torch.Generator().manual_seed(0)))
    return adapted, method


def trained_states(method, seed=0):
    """Every client's 'trained' state: its trained factors moved at random within its own rank."""
    g = torch.Generator().manual_seed(seed)
    trainable = set(method.trainable_keys(1))
    states = []
    for c in range(len(method.client_sizes)):
        start = method.client_state(c, 1)
        moved = {k: v + torch.randn(v.shape, generator=g) * 0.3 if k in trainable else v.clone()
                 for k, v in start.items()}
        states.append(method.at_rank(moved, c))
    return states


def factors(state, layer, r=None):
    B, A = state[f"{layer}.lora_B"], state[f"{layer}.lora_A"]
    return (B, A) if r is None else (B[:, :r], A[:r])


def truncation(M, k):
    U, s, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :k] * s[:k]) @ Vh[:k]


def hand_agg_error(adapted, states, weights, product):
    """sum_l ||sum_i w_i s B_i A_i - s product_l||_F / sum_l ||sum_i w_i s B_i A_i||_F."""
    num = den = 0.0
    for layer in adapted.layers:
        ideal = sum(w * S * (B @ A) for st, w in zip(states, weights) for B, A in [factors(st, layer)])
        num += torch.linalg.norm(ideal - S * product[layer]).item()
        den += torch.linalg.norm(ideal).item()
    return num / den


def test_client_ranks_are_refused_with_the_key_and_the_method_before_anything_loads():
    base = {"adapter": {"rank": 4, "client_ranks": [2, 4, 4]}, "federation": {"num_clients": 3, "clients_per_round": 3}}
    for name in ("fedsb", "fedex", "fedsa", "full"):
        with pytest.raises(ConfigError, match=rf"adapter.client_ranks: method '{name}' cannot"):
            build_config(base | {"method": {"name": name}})
    with pytest.raises(ConfigError, match="adapter.client_ranks has 3 ranks but federation.num_clients is 4"):
        build_config(base | {"method": {"name": "flexlora"}, "federation": {"num_clients": 4, "clients_per_round": 3}})
    with pytest.raises(ConfigError, match="rank 8 is above adapter.rank = 4"):
        build_config({"method": {"name": "hetlora"}, "adapter": {"rank": 4, "client_ranks": [8, 4, 4]},
                      "federation": {"num_clients": 3, "clients_per_round": 3}})
    with pytest.raises(ConfigError, match="adapter.client_ranks"):
        build_config(base | {"method": {"name": "flora"}, "adapter": {"rank": 4, "client_ranks": [0, 4, 4]}})


@pytest.mark.parametrize("name", ["fedit", "ffa", "flora", "flexlora", "hetlora"])
def test_a_client_trains_sends_and_receives_only_its_own_rank(name):
    adapted, method = setup(name, hetlora={"decay": 1.0})
    for c, r in enumerate(RANKS):
        start = method.client_state(c, 1)
        for layer in adapted.layers:
            B, A = factors(start, layer)
            assert B.shape[1] == A.shape[0] == 4  # one shared base model, the factors allocated at adapter.rank
            assert not B[:, r:].any()
            if "lora_A" in method.trains:
                assert not A[r:].any()
        sent = method.upload(c, trained_states(method)[c], 1)
        got = method.download(c)
        for layer in adapted.layers:
            for state in (sent, got):
                for key, dim in ((f"{layer}.lora_B", 1), (f"{layer}.lora_A", 0)):
                    if key in state:
                        assert state[key].shape[dim] == r, (c, key)


def test_flexlora_gives_each_client_the_svd_truncation_of_the_weighted_sum_at_its_rank():
    adapted, method = setup("flexlora")
    states = trained_states(method)
    payloads = [method.upload(c, st, 1) for c, st in enumerate(states)]
    agg = method.aggregate(payloads, WEIGHTS, [0, 1, 2], 1)
    dense = {layer: sum(w * (B.double() @ A.double()) for st, w in zip(states, WEIGHTS)
                        for B, A in [factors(st, layer)])
             for layer in adapted.layers}
    for layer in adapted.layers:
        assert torch.linalg.matrix_rank(dense[layer]) > 4  # the truncation loses something
        B, A = factors(method.global_state, layer)
        assert torch.allclose((B @ A).double(), truncation(dense[layer], 4), atol=1e-5)
        # all of S in B, A orthonormal rows
        assert torch.allclose(A @ A.T, torch.eye(4), atol=1e-5)
        _, s, _ = torch.linalg.svd(dense[layer])
        assert torch.allclose(B.T.double() @ B.double(), torch.diag(s[:4] ** 2), atol=1e-5)
        for c, r in enumerate(RANKS):
            B_c, A_c = factors(method.download(c), layer)
            assert B_c.shape == (B.shape[0], r)
            assert torch.allclose((B_c @ A_c).double(), truncation(dense[layer], r), atol=1e-5)
    head = sum(w * st["classifier.weight"] for st, w in zip(states, WEIGHTS))
    assert torch.allclose(method.global_state["classifier.weight"], head, atol=1e-6)
    product = {layer: truncation(dense[layer], 4).float() for layer in adapted.layers}
    reported = aggregation_error(adapted, states, WEIGHTS, method.eval_state(), agg.base_change)
    assert reported > 0.01
    assert reported == pytest.approx(hand_agg_error(adapted, states, WEIGHTS, product), rel=1e-4)


def padded(t, r, rows):
    out = torch.zeros(4, t.shape[1]) if rows else torch.zeros(t.shape[0], 4)
    if rows:
        out[:r] = t[:r]
    else:
        out[:, :r] = t[:, :r]
    return out


def hetlora_by_hand(adapted, states, ranks):
    """The zero-padded sparsity-weighted mean: p_i = ||B_i A_i||_F / sum_j ||B_j A_j||_F per layer."""
    out = {}
    for layer in adapted.layers:
        Bs = [padded(st[f"{layer}.lora_B"], r, rows=False) for st, r in zip(states, ranks)]
        As = [padded(st[f"{layer}.lora_A"], r, rows=True) for st, r in zip(states, ranks)]
        norms = [torch.linalg.norm(B @ A).item() for B, A in zip(Bs, As)]
        p = [n / sum(norms) for n in norms]
        out[layer] = (sum(q * B for q, B in zip(p, Bs)), sum(q * A for q, A in zip(p, As)))
    return out


def test_hetlora_is_the_zero_padded_sparsity_weighted_mean():
    adapted, method = setup("hetlora", hetlora={"decay": 1.0})
    states = trained_states(method)
    payloads = [method.upload(c, st, 1) for c, st in enumerate(states)]
    agg = method.aggregate(payloads, WEIGHTS, [0, 1, 2], 1)
    want = hetlora_by_hand(adapted, states, RANKS)
    for layer in adapted.layers:
        B, A = factors(method.global_state, layer)
        assert torch.allclose(B, want[layer][0], atol=1e-6) and torch.allclose(A, want[layer][1], atol=1e-6)
    product = {layer: B @ A for layer, (B, A) in want.items()}
    reported = aggregation_error(adapted, states, WEIGHTS, method.eval_state(), agg.base_change)
    assert reported > 0.01
    assert reported == pytest.approx(hand_agg_error(adapted, states, WEIGHTS, product), rel=1e-4)
    assert method.ranks == RANKS  # decay 1: nobody prunes


def test_hetlora_prunes_a_client_whose_last_components_shrank():
    adapted, method = setup("hetlora", hetlora={"decay": 0.5})
    g = torch.Generator().manual_seed(1)
    for key in adapted.keys_of(("lora_B",), head=False):  # a later round's global B: not zero
        method.global_state[key] = torch.randn(method.global_state[key].shape, generator=g)
    states = trained_states(method)
    starts = [method.client_state(c, 1) for c in range(3)]
    # client 1 (rank 4, k = 2) shrinks its last two components below where they started; client 2 (rank 3,
    # k = 1) grows them
    for layer in adapted.layers:
        for key in (f"{layer}.lora_B", f"{layer}.lora_A"):
            tail = (slice(None), slice(2, 4)) if key.endswith("B") else (slice(2, 4),)
            states[1][key][tail] = 0.01 * starts[1][key][tail]
            tail = (slice(None), slice(1, 3)) if key.endswith("B") else (slice(1, 3),)
            states[2][key][tail] = 3 * states[2][key][tail] + 1
    kept = {c: math.floor(0.5 * r) for c, r in enumerate(RANKS)}
    tails = [sum(torch.linalg.norm(st[f"{layer}.lora_B"][:, kept[c]:RANKS[c]]) *
                 torch.linalg.norm(st[f"{layer}.lora_A"][kept[c]:RANKS[c]]) for layer in adapted.layers)
             for c, st in enumerate(states)]
    before = [sum(torch.linalg.norm(st[f"{layer}.lora_B"][:, kept[c]:RANKS[c]]) *
                  torch.linalg.norm(st[f"{layer}.lora_A"][kept[c]:RANKS[c]]) for layer in adapted.layers)
              for c, st in enumerate(starts)]
    pruned = [c for c in range(3) if tails[c] < before[c]]
    assert 1 in pruned and 2 not in pruned
    payloads = [method.upload(c, st, 1) for c, st in enumerate(states)]
    method.aggregate(payloads, WEIGHTS, [0, 1, 2], 1)
    new_ranks = [kept[c] if c in pruned else r for c, r in enumerate(RANKS)]
    assert method.ranks == new_ranks
    want = hetlora_by_hand(adapted, states, new_ranks)  # a pruned client's tail is left out
    for layer in adapted.layers:
        B, A = factors(method.global_state, layer)
        assert torch.allclose(B, want[layer][0], atol=1e-6) and torch.allclose(A, want[layer][1], atol=1e-6)
    assert method.download(1)[f"{next(iter(adapted.layers))}.lora_A"].shape[0] == kept[1]


def test_hetlora_penalty_gradient_is_the_gradient_of_lambda_tail_norms():
    adapted, method = setup("hetlora", hetlora={"decay": 0.5, "penalty": 0.3})
    state = trained_states(method)[1]  # rank 4: k = 2, the tail is components 2 and 3
    params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    penalty = 0.3 * sum(torch.linalg.norm(params[f"{layer}.lora_B"][:, 2:4]) *
                        torch.linalg.norm(params[f"{layer}.lora_A"][2:4]) for layer in adapted.layers)
    want = torch.autograd.grad(penalty, [params[k] for k in params], allow_unused=True)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    method.gradient_step(1, params)()
    for (k, p), g in zip(params.items(), want):
        assert torch.allclose(p.grad, torch.zeros_like(p) if g is None else g, atol=1e-6), k


@pytest.mark.parametrize("name", ["flexlora", "hetlora"])
def test_per_example_gradients_of_a_rank_cut_client_match_torch_func(name):
    adapted, method = setup(name)
    adapted.load_state(trained_states(method)[0])  # rank 2 of 4
    keys = method.trainable_keys(1)
    ids, mask, labels = padded_batch(adapted.model.config.vocab_size)
    per_example, (sums, norms) = ours(adapted, for_trainable(adapted, keys, "materialise"), ids, mask, labels, keys)
    ref = reference(adapted, {k: adapted.parameters_by_key()[k] for k in keys}, ids, mask, labels)
    for k in keys:
        assert rel_err(per_example[k], ref[k]) < 1e-5, k
        if k.endswith(".lora_B"):
            assert not per_example[k][:, :, 2:].any()  # beyond the client's rank: no gradient, no norm
    ref_norms = torch.stack([ref[k].flatten(1).pow(2).sum(1) for k in keys]).sum(0).sqrt()
    assert rel_err(norms, ref_norms) < 1e-5


@pytest.mark.parametrize("name", ["fedit", "flexlora", "hetlora"])
def test_under_dp_a_client_never_trains_beyond_its_rank(sim_config, tmp_path, name):
    ranks = [2, 4, 3, 1]
    cfg = sim_config(method={"name": name}, adapter={"rank": 4, "client_ranks": ranks}, eval={"every": 0},
                     privacy={"noise_multiplier": 1.0, "randomness": "seeded"}, hetlora={"decay": 1.0})
    sim = Simulator(cfg, tmp_path, progress=False)
    seen = []
    upload = sim.method.upload

    def recording(client, trained, r):
        seen.append(client)
        for layer in sim.adapted.layers:
            B, A = factors(trained, layer)
            assert not B[:, ranks[client]:].any() and not A[ranks[client]:].any(), (client, layer)
        return upload(client, trained, r)
    sim.method.upload = recording
    sim.run()
    assert any(ranks[c] < 4 for c in seen)


@pytest.mark.parametrize("name", ["fedit", "ffa", "flora", "flexlora", "hetlora"])
def test_bytes_per_client_are_its_rank_cut_factors(sim_config, tmp_path, name):
    ranks = [2, 4, 3, 1]
    cfg = sim_config(method={"name": name}, adapter={"rank": 4, "client_ranks": ranks}, eval={"every": 0},
                     hetlora={"decay": 1.0})
    sim = Simulator(cfg, tmp_path, progress=False)
    sim.run()
    layers = sim.adapted.layers
    head = sum(p.numel() for p in sim.adapted.head_params.values()) * 4
    uploads = METHODS[name].uploads

    def factor_bytes(r, kinds):
        return 4 * r * sum((layer.d_out if "lora_B" in kinds else 0) + (layer.d_in if "lora_A" in kinds else 0)
                           for layer in layers.values())
    for rec in read_log(tmp_path)[1:]:
        assert rec["bytes_up"] == sum(factor_bytes(ranks[c], uploads) + head for c in rec["clients"])
        if name == "flora":  # the head, and the stacked factors of every client of the round to every client
            stacked = factor_bytes(sum(ranks[c] for c in rec["clients"]), ("lora_A", "lora_B"))
            assert rec["bytes_down"] == len(rec["clients"]) * head + len(ranks) * stacked
        else:
            assert rec["bytes_down"] == sum(factor_bytes(ranks[c], METHODS[name].downloads) + head
                                            for c in rec["clients"])


def test_fedlora_comm_reports_bytes_per_client_by_rank():
    settings = build_config({"method": {"name": "flexlora"}, "adapter": {"rank": 8, "client_ranks": [4, 8, 4]},
                             "federation": {"num_clients": 3, "clients_per_round": 3}})
    report = communication_report("minilm-l6", "flexlora", 8, 3, target_modules=["query", "value"],
                                   settings=settings)
    layers, d = report["layers"], 384
    head = report["head_params"]
    for r in (4, 8):
        assert report["by_rank"][str(r)]["params_up"] == layers * r * 2 * d + head
        assert report["by_rank"][str(r)]["bytes_down"] == 4 * (layers * r * 2 * d + head)


@pytest.mark.parametrize("name", ["flora", "flexlora"])
def test_peft_export_of_a_heterogeneous_run_reproduces_its_logits(sim_config, tmp_path, name):
    cfg = sim_config(method={"name": name}, adapter={"rank": 4, "client_ranks": [2, 4, 3, 1]}, eval={"every": 0})
    sim = Simulator(cfg, tmp_path, progress=False)
    sim.run()
    sim.adapted.load_state(sim.method.eval_state())
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    enc = tokenizer(["a joy to watch", "boring and slow", "superb story indeed"], padding=True,
                    return_tensors="pt")
    sim.model.eval()
    with torch.no_grad():
        ours_logits = sim.model(**enc).logits
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4
    reference = config["base_model_name_or_path"]  # FLoRA's changed base weights: "base_model" in the run folder
    base = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / reference if (tmp_path / reference).is_dir() else reference)
    peft = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        theirs = peft(**enc).logits
    assert (ours_logits - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["fedit", "flexlora", "hetlora"])
@pytest.mark.parametrize("mode", ["sgd", "dp"])
def test_rank_cut_clients_trained_together_equal_training_them_alone(cfg_parallel, tmp_path, joint_groups,
                                                                     name, mode):
    dp = mode == "dp"
    # FlexLoRA's second round starts from singular vectors of singular values near zero, which float rounding
    # (a joint batch rounds differently from a client's own) turns anywhere: one round compares its training
    sections = dict(method={"name": name}, adapter={"rank": 4, "client_ranks": [2, 4, 3, 1]},
                    train={"batch_size": 2 if dp else 16, "optimizer": "sgd", "momentum": 0.9},
                    federation={"num_clients": 4, "clients_per_round": 3, "rounds": 1 if name == "flexlora" else 2},
                    hetlora={"penalty": 0.1},
                    privacy={"noise_multiplier": 1.0, "clip_norm": 0.5, "randomness": "seeded"} if dp else {})
    assert_runs_match(cfg_parallel, tmp_path, TOLERANCE, **sections)
    assert joint_groups


METHODS_MD = (Path(__file__).parent.parent / "docs" / "methods.md").read_text()
HETEROGENEOUS_SECTION = METHODS_MD.split("## Clients of different ranks")[1].split("\n## ")[0]


@pytest.mark.docs
def test_the_documented_comm_command_prints_as_shown(capsys):
    block = HETEROGENEOUS_SECTION.split("    $ ")[1].split("\n\n")[0]
    command, *expected = [line.removeprefix("    ") for line in block.splitlines()]
    argv = shlex.split(command)
    assert argv[0] == "fedlora" and main(argv[1:]) == 0
    assert capsys.readouterr().out.splitlines() == expected


def test_the_documented_config_example_is_valid_and_refused_for_another_method():
    text = HETEROGENEOUS_SECTION.split("```toml\n")[1].split("```")[0]
    cfg = build_config(tomllib.loads(text))
    assert cfg.adapter.client_ranks == [4, 4, 4, 4, 8, 8, 8, 16, 16, 16]
    with pytest.raises(ConfigError, match="adapter.client_ranks: method 'fedsb'"):
        build_config(tomllib.loads(text.replace('"flexlora"', '"fedsb"')))


def test_a_resumed_hetlora_run_keeps_its_pruned_ranks(sim_config, tmp_path, monkeypatch):
    cfg = sim_config(method={"name": "hetlora"}, adapter={"rank": 4, "client_ranks": [2, 4, 3, 1]},
                     hetlora={"decay": 0.5}, federation={"rounds": 4}, eval={"every": 0})
    whole = Simulator(cfg, tmp_path / "whole", progress=False)
    whole.run()
    cut = Simulator(cfg, tmp_path / "cut", progress=False)
    run_until_killed(cut, monkeypatch, after_round=2)
    assert cut.method.ranks != [2, 4, 3, 1]  # pruned in round 2 (round 1 starts from B = 0): the checkpoint
    # must carry it
    resumed = Simulator(cfg, tmp_path / "cut", progress=False)
    resumed.run(resume=True)
    assert resumed.method.ranks == whole.method.ranks
    assert all(torch.equal(v, resumed.method.global_state[k]) for k, v in whole.method.global_state.items())
    assert without_seconds(read_log(tmp_path / "whole")) == without_seconds(read_log(tmp_path / "cut"))
