"""Each method's server rule against hand-computed products, and what each method trains and sends."""
import copy

import pytest
import torch

from fedlora.adapters import AdaptedModel
from fedlora.config import build_config
from fedlora.init_sb import client_reply
from fedlora.methods import METHODS, InitContext
from fedlora.federation import aggregation_error

from conftest import tiny_bert, tiny_gpt2

WEIGHTS = [0.5, 0.3, 0.2]


def setup(method_name, model=None, targets=("query", "value"), heads=("classifier",), scaling=2.0, rank=4):
    model = model or tiny_bert()
    cls = METHODS[method_name]
    adapted = AdaptedModel(model, parameterisation=cls.parameterisation, rank=rank, scaling=scaling,
                           target_modules=list(targets), head_modules=list(heads))
    method = cls(adapted, build_config({"seed": 7}), [50, 30, 20])
    vocab = model.config.vocab_size
    batch = {"input_ids": torch.randint(2, vocab, (4, 6), generator=torch.Generator().manual_seed(9)),
             "labels": torch.tensor([0, 1, 1, 0])}
    method.initialise(InitContext([0, 1], torch.Generator().manual_seed(0), ask=lambda request, clients: {
        c: client_reply(adapted, request, [batch], example_losses(model)) for c in clients}))
    return adapted, method


def example_losses(model):
    def losses(batch):
        logits = model(input_ids=batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    return losses


def local_updates(adapted, method, seed=0):
    """Three heterogeneous 'trained' client states: the trainable factors moved at random."""
    g = torch.Generator().manual_seed(seed)
    trainable = set(method.trainable_keys(1))
    states = []
    for c in range(3):
        start = method.client_state(c, 1)
        states.append({k: v + torch.randn(v.shape, generator=g) * 0.2 if k in trainable else v.clone()
                       for k, v in start.items()})
    return states


def effective_weights(adapted):
    """Every adapted layer's weight as the model sees it, read off its forward pass: W x = layer(x) - bias."""
    out = {}
    for name, layer in adapted.layers.items():
        eye = torch.eye(layer.d_in)
        with torch.no_grad():
            out[name] = (layer(eye) - layer(torch.zeros(1, layer.d_in))).T
    return out


@pytest.mark.parametrize("name", ["ffa", "fedsb", "fedex", "flora"])
def test_exact_methods_give_the_average_update(name):
    adapted, method = setup(name)
    w0 = {n: layer.base_weight().clone() for n, layer in adapted.layers.items()}
    states = local_updates(adapted, method)
    payloads = [method.upload(c, s, 1) for c, s in enumerate(states)]
    agg = method.aggregate(payloads, WEIGHTS, [0, 1, 2], 1)
    adapted.load_state(method.eval_state())
    seen = effective_weights(adapted)
    s = adapted.scaling
    for layer in adapted.layers:
        expected = w0[layer].clone()
        for st, w in zip(states, WEIGHTS):
            B, A = st[f"{layer}.lora_B"], st[f"{layer}.lora_A"]
            R = st.get(f"{layer}.lora_R")
            expected += w * s * (B @ R @ A if R is not None else B @ A)
        assert torch.allclose(seen[layer], expected, atol=1e-5), layer
    assert aggregation_error(adapted, states, WEIGHTS, method.eval_state(), agg.base_change) < 1e-5


@pytest.mark.parametrize("name,frozen", [("ffa", "lora_A"), ("fedsb", "lora_A"), ("fedsb", "lora_B")])
def test_frozen_factors_are_shared_and_never_change(name, frozen):
    adapted, method = setup(name)
    keys = adapted.keys_of((frozen,), head=False)
    before = {k: method.global_state[k].clone() for k in keys}
    assert not set(keys) & set(method.trainable_keys(1))
    states = local_updates(adapted, method)
    assert all(torch.equal(st[k], before[k]) for st in states for k in keys)  # identical on every client
    payloads = [method.upload(c, s, 1) for c, s in enumerate(states)]
    assert not set(keys) & {k for p in payloads for k in p}  # never uploaded
    for r in (1, 2):
        method.aggregate(payloads, WEIGHTS, [0, 1, 2], r)
        assert all(torch.equal(method.global_state[k], before[k]) for k in keys)


def test_fedit_is_inexact_and_agg_error_matches_hand_computation():
    adapted, method = setup("fedit")
    states = local_updates(adapted, method)
    payloads = [method.upload(c, s, 1) for c, s in enumerate(states)]
    agg = method.aggregate(payloads, WEIGHTS, [0, 1, 2], 1)
    num = den = 0.0
    s = adapted.scaling
    for layer in adapted.layers:
        ideal = sum(w * s * st[f"{layer}.lora_B"] @ st[f"{layer}.lora_A"] for st, w in zip(states, WEIGHTS))
        B = sum(w * st[f"{layer}.lora_B"] for st, w in zip(states, WEIGHTS))
        A = sum(w * st[f"{layer}.lora_A"] for st, w in zip(states, WEIGHTS))
        num += torch.linalg.norm(ideal - s * B @ A).item()
        den += torch.linalg.norm(ideal).item()
    reported = aggregation_error(adapted, states, WEIGHTS, method.eval_state(), agg.base_change)
    assert reported > 0.01
    assert reported == pytest.approx(num / den, rel=1e-5)


def test_ffa_freezes_one_shared_A_per_layer_and_sends_only_B():
    adapted, method = setup("ffa")
    A0 = {k: v.clone() for k, v in method.global_state.items() if k.endswith("lora_A")}
    assert len({tuple(v.flatten()[:5].tolist()) for v in A0.values()}) == len(A0)  # differs between layers
    assert set(method.trainable_keys(1)) == {k for k in adapted.state() if k.endswith("lora_B") or "classifier" in k}
    states = local_updates(adapted, method)
    for c in range(3):
        for k, v in A0.items():
            assert torch.equal(method.client_state(c, 1)[k], v)
    payloads = [method.upload(c, s, 1) for c, s in enumerate(states)]
    assert all(k.endswith("lora_B") or k.startswith("classifier") for p in payloads for k in p)
    assert not any(k.endswith("lora_A") for k in method.download(0))
    method.aggregate(payloads, WEIGHTS, [0, 1, 2], 1)
    assert all(torch.equal(method.global_state[k], v) for k, v in A0.items())
    # a second server from the same seed derives the same A: nothing needs to be sent
    _, twin = setup("ffa")
    assert all(torch.equal(twin.global_state[k], v) for k, v in A0.items())


def test_fedex_residual_uses_scaling_and_conv1d_layout():
    model = tiny_gpt2()
    adapted, method = setup("fedex", model=model, targets=("c_attn", "c_fc"), heads=("score",), scaling=3.0)
    assert all(layer.transposed for layer in adapted.layers.values())
    states = local_updates(adapted, method, seed=5)
    w_before = {n: layer.base.weight.clone() for n, layer in adapted.layers.items()}
    agg = method.aggregate([method.upload(c, s, 1) for c, s in enumerate(states)], WEIGHTS, [0, 1, 2], 1)
    for name, layer in adapted.layers.items():
        stored_change = layer.base.weight - w_before[name]
        assert stored_change.shape == (layer.d_in, layer.d_out)  # Conv1D layout
        assert torch.allclose(stored_change.T, agg.base_change[name], atol=1e-6)
        s = 3.0
        ideal = sum(w * s * st[f"{name}.lora_B"] @ st[f"{name}.lora_A"] for st, w in zip(states, WEIGHTS))
        B = method.global_state[f"{name}.lora_B"]
        A = method.global_state[f"{name}.lora_A"]
        assert torch.allclose(agg.base_change[name], ideal - s * B @ A, atol=1e-5)
    # and the model's output equals the exact average, through the Conv1D forward
    adapted.load_state(method.eval_state())
    x = torch.randn(3, next(iter(adapted.layers.values())).d_in)
    name, layer = next(iter(adapted.layers.items()))
    ideal = sum(w * 3.0 * st[f"{name}.lora_B"] @ st[f"{name}.lora_A"] for st, w in zip(states, WEIGHTS))
    expected = x @ (w_before[name] + ideal.T) + layer.base.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_flora_restarts_every_round_and_broadcasts_stacked_factors():
    adapted, method = setup("flora")
    s1, s2 = method.client_state(0, 1), method.client_state(1, 1)
    layer = next(iter(adapted.layers))
    assert not torch.equal(s1[f"{layer}.lora_A"], s2[f"{layer}.lora_A"])
    assert not s1[f"{layer}.lora_B"].any()
    states = local_updates(adapted, method)
    agg = method.aggregate([method.upload(c, s, 1) for c, s in enumerate(states)], WEIGHTS, [0, 1, 2], 1)
    r = adapted.rank
    assert agg.broadcast[f"{layer}.stacked_A"].shape == (3 * r, adapted.layers[layer].d_in)
    assert agg.broadcast[f"{layer}.stacked_B"].shape == (adapted.layers[layer].d_out, 3 * r)
    assert not method.download(0).keys() - set(adapted.head_params)
    assert not any(method.global_state[k].any() for k in method.global_state if k.endswith("lora_B"))


def test_fedsa_keeps_B_on_the_client_and_averages_A():
    adapted, method = setup("fedsa")
    states = local_updates(adapted, method)
    payloads = [method.upload(c, s, 1) for c, s in enumerate(states)]
    assert all(not k.endswith("lora_B") for p in payloads for k in p)
    method.aggregate(payloads, WEIGHTS, [0, 1, 2], 1)
    layer = next(iter(adapted.layers))
    for c in range(3):  # the client's own B, kept by its runtime, is what it trains from next
        own = method.own_part(states[c])
        assert torch.equal(method.client_state(c, 2, own)[f"{layer}.lora_B"], states[c][f"{layer}.lora_B"])
    assert torch.equal(method.eval_state()[f"{layer}.lora_B"], method.global_state[f"{layer}.lora_B"])
    A = sum(w * s[f"{layer}.lora_A"] for s, w in zip(states, WEIGHTS))
    assert torch.allclose(method.global_state[f"{layer}.lora_A"], A, atol=1e-6)


def test_full_fedavg_averages_the_weights():
    adapted, method = setup("full")
    states = local_updates(adapted, method)
    method.aggregate([method.upload(c, s, 1) for c, s in enumerate(states)], WEIGHTS, [0, 1, 2], 1)
    for k in method.global_state:
        expected = sum(w * s[k] for s, w in zip(states, WEIGHTS))
        assert torch.allclose(method.global_state[k], expected, atol=1e-6)


def test_fedsb_init_is_the_svd_of_the_sign_of_the_clients_gradient_sum():
    model = tiny_bert()
    cls = METHODS["fedsb"]
    adapted = AdaptedModel(model, parameterisation="lorasb", rank=4, scaling=1.0, target_modules=["query", "value"],
                           head_modules=["classifier"])
    cfg = build_config({"seed": 1, "fedsb": {"init": "dense", "init_lr": 0.01}})
    method = cls(adapted, cfg, [8, 8])
    g = torch.Generator().manual_seed(3)
    data = {c: {"input_ids": torch.randint(5, 30000, (4, 6), generator=g),
                "labels": torch.randint(0, 2, (4,), generator=g)} for c in (0, 1)}
    for m in model.modules():  # no dropout: the reference below must see the same forward
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    uploads = []

    def ask(request, clients):
        uploads.append({c: client_reply(adapted, request, [data[c]], example_losses(model)) for c in clients})
        return uploads[-1]
    exchange = method.initialise(InitContext([0, 1], torch.Generator().manual_seed(0), ask=ask))

    # reference: the pooled gradient with every adapter off, by plain autograd on a copy
    ref = copy.deepcopy(model)
    ref.load_state_dict(model.state_dict())
    for name, layer in adapted.layers.items():
        assert torch.equal(method.global_state[f"{name}.lora_R"], torch.diag(torch.diag(method.global_state[f"{name}.lora_R"])))
    weights = {n: ref.get_submodule(n).base.weight.requires_grad_(True) for n in adapted.layers}
    loss = sum(ref(**data[c]).loss * 4 for c in (0, 1))
    grads = torch.autograd.grad(loss, list(weights.values()))
    for (name, _), grad in zip(weights.items(), grads):
        G = -0.01 * torch.sign(grad)
        S = torch.linalg.svdvals(G)[:4]
        R0 = method.global_state[f"{name}.lora_R"]
        assert torch.allclose(torch.diag(R0), S, rtol=1e-3), name  # R0 = S_r
        B, A = method.global_state[f"{name}.lora_B"], method.global_state[f"{name}.lora_A"]
        assert torch.allclose(B.T @ B, torch.eye(4), atol=1e-4)
        U, Sfull, Vh = torch.linalg.svd(G)
        best = U[:, :4] @ torch.diag(Sfull[:4]) @ Vh[:4]
        assert torch.allclose(B @ R0 @ A, best, atol=1e-3)  # the best rank-r approximation of G
    # the exchange: each client's dense gradient sum up, B and A down to everyone, R never in the broadcast
    assert len(uploads) == 1 and list(uploads[0]) == [0, 1] and exchange.clients == [0, 1]
    assert all(not k.endswith("lora_R") for k in exchange.broadcast)
    assert {k.rpartition(".")[2] for k in exchange.broadcast} == {"lora_A", "lora_B"}
    assert all(k.endswith("lora_R") or k.startswith("classifier") for k in method.trainable_keys(1))


@pytest.mark.parametrize("name, factors", [("fedit", ("A", "B")), ("ffa", ("B",)), ("fedsb", ("R",)),
                                           ("full", ("weight",))])
def test_trained_numbers_count_the_adapter_and_the_head_apart(name, factors):
    model = tiny_bert()
    heads = ["classifier", "bert.pooler"]
    adapted = AdaptedModel(model, parameterisation=METHODS[name].parameterisation, rank=4, scaling=1.0,
                           target_modules=["query", "value"], head_modules=heads)
    method = METHODS[name](adapted, build_config({"method": {"name": name}}), [10, 10])
    # the adapted layers' base weights, d_out x d_in (wrapped by the low-rank methods, themselves for full)
    weights = [getattr(m, "base", m).weight for n, m in model.named_modules() if n.endswith(("query", "value"))]
    shapes = {"A": lambda w: 4 * w.shape[1], "B": lambda w: w.shape[0] * 4, "R": lambda w: 16,
              "weight": lambda w: w.numel()}
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(tuple(heads)) and "lora" not in n)
    assert method.trained_numbers() == {"adapter": sum(shapes[f](w) for w in weights for f in factors), "head": head}
