"""FedSVD and RoLoRA: each server rule against its hand computation on the same client states, the factor each
round trains and sends, their exactness (agg_error), DP per round, byte counts and the PEFT export."""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedlora.api import make_config as build_config
from fedlora.cli import main
from fedlora.errors import ConfigError
from fedlora.federation import aggregation_error
from fedlora.simulator import Simulator

from conftest import read_log
from test_methods import WEIGHTS, effective_weights, setup


def moved(method, round_, seed=0):
    """Three clients' trained states of round `round_`: what the round trains moved at random."""
    g = torch.Generator().manual_seed(seed)
    trainable = set(method.trainable_keys(round_))
    return [{k: v + torch.randn(v.shape, generator=g) * 0.2 if k in trainable else v.clone()
             for k, v in method.client_state(c, round_).items()} for c in range(3)]


def weighted(states, key):
    return sum(w * s[key].double() for s, w in zip(states, WEIGHTS))


def head_and(adapted, factor):
    return set(adapted.keys_of((factor,)))


def test_fedsvd_refactorises_the_averaged_B_times_A_into_an_orthonormal_A():
    adapted, method = setup("fedsvd")
    w0 = {n: layer.base_weight().clone() for n, layer in adapted.layers.items()}
    states = moved(method, 1)
    payloads = [method.upload(c, s, 1) for c, s in enumerate(states)]
    assert all(set(p) == head_and(adapted, "lora_B") for p in payloads)  # B and the head only
    assert set(method.download(0)) == set(adapted.keys_of(("lora_A", "lora_B")))
    agg = method.aggregate(payloads, WEIGHTS, [0, 1, 2], 1)
    assert agg.broadcast == {} and agg.base_change == {}
    new = method.eval_state()
    s, r = adapted.scaling, adapted.rank
    for layer in adapted.layers:
        product = weighted(states, f"{layer}.lora_B") @ states[0][f"{layer}.lora_A"].double()  # one A for all
        B, A = new[f"{layer}.lora_B"].double(), new[f"{layer}.lora_A"].double()
        assert torch.allclose(A @ A.T, torch.eye(r, dtype=A.dtype), atol=1e-5), layer  # orthonormal rows
        assert torch.allclose(B @ A, product, atol=1e-5 * product.abs().max()), layer  # B A unchanged
        # the SVD of the d_out x d_in product, taken here in full: B = U_r S_r, A = V_r^T up to signs
        U, S, Vh = torch.linalg.svd(product)
        assert torch.allclose(B.norm(dim=0), S[:r], rtol=1e-5), layer
        assert torch.allclose(B.T @ B, torch.diag(S[:r] ** 2), atol=1e-5 * S[0] ** 2), layer
        assert torch.allclose(A.T @ A, Vh[:r].T @ Vh[:r], atol=1e-5), layer  # the same row space
    for key in adapted.head_params:
        assert torch.allclose(new[key].double(), weighted(states, key), atol=1e-6), key
    adapted.load_state(new)
    seen = effective_weights(adapted)
    for layer in adapted.layers:
        B = weighted(states, f"{layer}.lora_B")
        expected = w0[layer].double() + s * B @ states[0][f"{layer}.lora_A"].double()
        assert torch.allclose(seen[layer].double(), expected, atol=1e-5), layer
    assert aggregation_error(adapted, states, WEIGHTS, new, agg.base_change) < 1e-6
    # the next round trains B on the new A, which every client downloads
    assert all(torch.equal(method.client_state(c, 2)[f"{layer}.lora_A"], new[f"{layer}.lora_A"])
               for c in range(3) for layer in adapted.layers)


def test_rolora_averages_B_in_odd_rounds_and_A_in_even_rounds():
    adapted, method = setup("rolora")
    s = adapted.scaling
    factors = adapted.keys_of(("lora_A", "lora_B"), head=False)
    for round_, trained, frozen in ((1, "lora_B", "lora_A"), (2, "lora_A", "lora_B"), (3, "lora_B", "lora_A")):
        before = {k: v.clone() for k, v in method.global_state.items()}
        w0 = {n: layer.base_weight().clone() for n, layer in adapted.layers.items()}
        assert set(method.trainable_keys(round_)) == head_and(adapted, trained)
        states = moved(method, round_, seed=round_)
        payloads = [method.upload(c, st, round_) for c, st in enumerate(states)]
        assert all(set(p) == head_and(adapted, trained) for p in payloads)
        assert method.download(0).keys() == set(adapted.keys_of(("lora_A", "lora_B")))  # both, every round
        agg = method.aggregate(payloads, WEIGHTS, [0, 1, 2], round_)
        new = method.eval_state()
        for key in factors:
            if key.endswith(frozen):  # untouched, bit for bit
                assert torch.equal(new[key], before[key]), (round_, key)
            else:
                assert torch.allclose(new[key].double(), weighted(states, key), atol=1e-6), (round_, key)
        adapted.load_state(new)
        seen = effective_weights(adapted)
        for layer in adapted.layers:
            B, A = (weighted(states, f"{layer}.lora_B"), before[f"{layer}.lora_A"].double()) if trained == "lora_B" \
                else (before[f"{layer}.lora_B"].double(), weighted(states, f"{layer}.lora_A"))
            assert torch.allclose(seen[layer].double(), w0[layer].double() + s * B @ A, atol=1e-5), (round_, layer)
        assert aggregation_error(adapted, states, WEIGHTS, new, agg.base_change) < 1e-6
    # FedIT's rule on a round that moves both factors is not exact: agg_error sees the difference
    both = [{k: v + 0.3 * torch.randn(v.shape) if k in factors else v for k, v in st.items()} for st in states]
    averaged = {k: weighted(both, k).float() for k in factors}
    assert aggregation_error(adapted, both, WEIGHTS, method.global_state | averaged, {}) > 1e-3


@pytest.mark.parametrize("name", ["fedsvd", "rolora"])
def test_a_run_sends_each_rounds_factor_and_logs_zero_agg_error(sim_config, tmp_path, name):
    cfg = sim_config(method={"name": name}, federation={"rounds": 3})
    sim = Simulator(cfg, tmp_path, progress=False)
    sent, real_upload = {}, sim.method.upload

    def upload(client, trained, r):
        payload = real_upload(client, trained, r)
        sent.setdefault(r, set()).update(k.rpartition(".")[2] for k in payload if "lora" in k)
        return payload

    sim.method.upload = upload
    sim.run()
    expected = {1: {"lora_B"}, 2: {"lora_A"}, 3: {"lora_B"}} if name == "rolora" else {r: {"lora_B"} for r in (1, 2, 3)}
    assert sent == expected
    log = read_log(tmp_path)
    assert all(0 <= row["agg_error"] < 1e-6 for row in log[1:]) and all(row["bytes_up"] > 0 for row in log[1:])


def test_rolora_trains_and_records_per_example_gradients_of_the_rounds_factor(sim_config, tmp_path):
    sim = Simulator(sim_config(method={"name": "rolora"}, privacy={"noise_multiplier": 1.0}), tmp_path,
                    progress=False)
    sim.server.setup_privacy()
    for r, factor in ((1, "lora_B"), (2, "lora_A"), (3, "lora_B")):
        dp = sim.trainer.dp(0, r, sim.server.privacy_for(0))
        keys = set(sim.adapted.keys_of((factor,)))
        assert set(dp.params) == keys
        assert set(dp.recorder.factors) | set(dp.recorder.linears) == keys
        assert {f for _, f in dp.recorder.factors.values()} == {factor}


def test_the_methods_that_change_what_a_client_trains_refuse_a_kept_optimizer_state():
    for name in ("rolora", "fedsvd"):
        with pytest.raises(ConfigError, match="train.keep_optimizer_state"):
            build_config({"method": {"name": name}, "train": {"keep_optimizer_state": True}})
    build_config({"method": {"name": "ffa"}, "train": {"keep_optimizer_state": True}})


def comm(capsys, method, *more):
    code = main(["comm", "--model", "minilm-l6", "--method", method, "--rank", "8", "--target-modules",
                 "intermediate.dense", *more])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_comm_counts_rolora_alternating_and_fedsvd_both_factors_down(capsys):
    layers, r, d_in, d_out, head = 6, 8, 384, 1536, 384 * 2 + 2  # intermediate.dense: 384 -> 1536
    both = layers * r * (d_in + d_out) + head
    report = json.loads(comm(capsys, "rolora", "--json"))
    assert report["round"]["params_up"] == layers * r * d_out + head  # odd rounds: B
    assert report["even_rounds"]["params_up"] == layers * r * d_in + head  # even rounds: A
    assert report["round"]["params_down"] == report["even_rounds"]["params_down"] == both
    assert report["even_rounds"]["bytes_up"] == 4 * report["even_rounds"]["params_up"]
    text = comm(capsys, "rolora")
    assert "per client in odd rounds: up 74,498 params" in text and "per client in even rounds: up 19,202" in text
    report = json.loads(comm(capsys, "fedsvd", "--json"))
    assert report["round"] == {"params_up": layers * r * d_out + head, "params_down": both,
                               "bytes_up": 4 * (layers * r * d_out + head), "bytes_down": 4 * both}
    assert "even_rounds" not in report


@pytest.mark.parametrize("name", ["fedsvd", "rolora"])
def test_the_peft_export_reproduces_the_global_models_logits(sim_config, tmp_path, name):
    sim = Simulator(sim_config(method={"name": name}), tmp_path, progress=False)
    sim.run()
    adapter = tmp_path / "adapter"
    labels = json.loads((adapter / "labels.json").read_text())
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_path, **labels),
                                     adapter).eval()
    sim.adapted.load_state(sim.method.eval_state())
    model = sim.model.eval()
    enc = sim.task.tokenizer(["a fine film", "dull and slow, nothing works"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = model(**enc).logits, peft(**enc).logits
    assert (ours - theirs).abs().max() < 1e-5
    assert ours.abs().max() > 0
