"""Fed-SB's set-up exchange (fedsb.init): each variant against a centralised computation on the pooled
gradient done here by hand, and the private sketches against torch.func per-example gradients."""
import copy
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save
from torch.func import functional_call, grad

from fedlora.adapters import AdaptedModel
from fedlora.config import build_config
from fedlora.init_sb import PrivateRelease, client_reply, private_gradient_sum, reply_from_gradients, sketch_matrix
from fedlora.methods import METHODS, InitContext

from conftest import tiny_bert, tiny_gpt2

ETA, RANK, EXAMPLES = 0.01, 4, 8


def fedsb(variant, model=None, targets=("query", "value", "dense"), oversampling=3, seed=1):
    model = model or tiny_bert()
    for m in model.modules():  # no dropout: every computation below must see the same forward
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    adapted = AdaptedModel(model, parameterisation="lorasb", rank=RANK, scaling=1.0, target_modules=list(targets),
                           head_modules=[])
    cfg = build_config({"seed": seed, "fedsb": {"init_lr": ETA, "init": variant, "oversampling": oversampling, "init_examples": EXAMPLES}})
    return adapted, METHODS["fedsb"](adapted, cfg, [10, 10, 10])


def run(method, ask):
    sent = []

    def recorded(request, clients):
        replies = ask(request, clients)
        sent.append((request, replies))
        return replies

    exchange = method.initialise(InitContext([0, 1, 2], torch.Generator().manual_seed(0), ask=recorded))
    return exchange, sent


def low_rank_gradients(adapted, rank, seed=0):
    """Three clients' 'gradient sums' per layer whose sum has rank `rank`."""
    g = torch.Generator().manual_seed(seed)
    out = {c: {} for c in range(3)}
    for name, layer in adapted.layers.items():
        U, V = torch.randn(layer.d_out, rank, generator=g), torch.randn(rank, layer.d_in, generator=g)
        for c in range(3):
            out[c][name] = U @ torch.diag(torch.rand(rank, generator=g) + 0.5) @ V
    return out


def product(state, layer):
    return state[f"{layer}.lora_B"] @ state[f"{layer}.lora_R"] @ state[f"{layer}.lora_A"]


def randomized_svd(M, omega, rank):
    """Halko, Martinsson and Tropp's two-pass randomized SVD in float64 numpy: (U_r, S_r, V_r^T)."""
    M, omega = M.double().numpy(), omega.double().numpy()
    Q, _ = np.linalg.qr(M @ omega)
    U, S, Vh = np.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ U[:, :rank], S[:rank], Vh[:rank]


@pytest.mark.parametrize("variant", ["sketch", "sign_sketch"])
def test_federated_randomized_svd_equals_the_centralised_one_with_the_same_test_matrix(variant):
    adapted, method = fedsb(variant)
    grads = low_rank_gradients(adapted, rank=12)  # more directions than k = 7: the sketch is not exact
    exchange, sent = run(method, lambda request, clients: {c: reply_from_gradients(adapted, grads[c], request)
                                                          for c in clients})
    assert [r.phase for r, _ in sent] == ["range", "project"]
    for i, (name, layer) in enumerate(adapted.layers.items()):
        if variant == "sketch":
            M = -ETA / EXAMPLES * sum(grads[c][name] for c in range(3))
        else:
            M = -ETA / 3 * sum(torch.sign(grads[c][name]) for c in range(3))
        omega = sketch_matrix(layer, RANK + 3, 1, i)
        assert omega.shape == (layer.d_in, min(RANK + 3, layer.d_in, layer.d_out))
        U, S, Vh = randomized_svd(M, omega, RANK)
        state = method.global_state
        assert np.allclose(torch.diag(state[f"{name}.lora_R"]).numpy(), S, rtol=1e-4), name
        assert np.allclose(product(state, name).numpy(), U @ np.diag(S) @ Vh, atol=1e-5 * np.abs(S).max()), name
        assert torch.allclose(state[f"{name}.lora_B"].T @ state[f"{name}.lora_B"], torch.eye(RANK), atol=1e-5)
    # the uploads are sums the server adds: G_i Omega then Q^T G_i, k columns / rows each
    (first, ranges), (second, projections) = sent
    assert all(k.endswith(".range") for k in first.expected) and set(second.arrays) == {
        f"{n}.basis" for n in adapted.layers}
    assert first.release == 0 and second.release == (0 if variant == "sign_sketch" else 1)
    assert {k.rpartition(".")[2] for k in exchange.broadcast} == {"lora_A", "lora_B"}
    assert exchange.clients == [0, 1, 2]


def test_a_sketch_wide_enough_for_the_gradient_gives_the_best_rank_r_approximation():
    adapted, method = fedsb("sketch", oversampling=6)
    grads = low_rank_gradients(adapted, rank=RANK)  # rank 4 <= k: the range is found exactly
    run(method, lambda request, clients: {c: reply_from_gradients(adapted, grads[c], request) for c in clients})
    for name in adapted.layers:
        M = -ETA / EXAMPLES * sum(grads[c][name] for c in range(3))
        U, S, Vh = torch.linalg.svd(M.double())
        best = U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK]
        assert torch.allclose(product(method.global_state, name).double(), best, atol=1e-5 * float(S[0])), name


def test_sign_votes_take_the_majority():
    adapted, method = fedsb("signs")
    grads = low_rank_gradients(adapted, rank=12)
    _, sent = run(method, lambda request, clients: {c: reply_from_gradients(adapted, grads[c], request)
                                                    for c in clients})
    (request, replies), = sent
    assert request.phase == "signs" and all(v.dtype == torch.int8 for r in replies.values() for v in r.values())
    for name in adapted.layers:
        majority = torch.sign(sum(torch.sign(grads[c][name]) for c in range(3)))
        U, S, Vh = torch.linalg.svd(-ETA * majority.double())
        R0 = torch.diag(method.global_state[f"{name}.lora_R"]).double()
        assert torch.allclose(R0, S[:RANK], rtol=1e-3), name
        best = U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK]
        assert torch.allclose(product(method.global_state, name).double(), best, atol=1e-3 * float(S[0])), name


def losses_of(model):
    def losses(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    return losses


def test_clients_sketch_their_own_gradient_and_the_server_gets_the_pooled_randomized_svd():
    adapted, method = fedsb("sketch", oversampling=2)
    model = adapted.model
    g = torch.Generator().manual_seed(3)
    data = {c: {"input_ids": torch.randint(5, 30000, (3, 6), generator=g),
                "labels": torch.randint(0, 2, (3,), generator=g)} for c in range(3)}
    run(method, lambda request, clients: {c: client_reply(adapted, request, [data[c]], losses_of(model))
                                          for c in clients})
    # the pooled gradient of W0 by plain autograd on a copy with the adapters off
    ref = copy.deepcopy(model)
    weights = {n: ref.get_submodule(n).base.weight.requires_grad_(True) for n in adapted.layers}
    loss = sum(losses_of(ref)(data[c]).sum() for c in range(3))
    grads = torch.autograd.grad(loss, list(weights.values()))
    for i, ((name, layer), G) in enumerate(zip(adapted.layers.items(), grads)):
        U, S, Vh = randomized_svd(-ETA / EXAMPLES * G, sketch_matrix(layer, RANK + 2, 1, i), RANK)
        assert np.allclose(product(method.global_state, name).numpy(), U @ np.diag(S) @ Vh,
                           atol=1e-4 * S.max()), name


def per_example_reference(adapted, batch):
    """torch.func.grad of each example's loss alone, for every adapted layer's W0, as d_out x d_in."""
    model = adapted.model
    names = {n: f"{n}.base.weight" for n in adapted.layers}
    out = {n: [] for n in names}
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i:i + 1] for k, v in batch.items()}

        def f(params):
            call = lambda **kw: functional_call(model, params, kwargs=kw)
            return losses_of(call)(one).sum()
        g = grad(f)({p: model.get_parameter(p).detach() for p in names.values()})
        for n, p in names.items():
            out[n].append(g[p].T if adapted.layers[n].transposed else g[p])
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("model_fn,targets", [(tiny_bert, ("query", "value")), (tiny_gpt2, ("c_attn", "c_fc"))])
@pytest.mark.parametrize("phase", ["range", "project"])
def test_private_sketch_clips_each_examples_whole_sketch(model_fn, targets, phase):
    """Per example: its sketch G_e Omega (or Q^T G_e) over all layers, clipped as a whole to clip_norm."""
    adapted, method = fedsb("sketch", model=model_fn(), targets=targets)
    vocab = adapted.model.config.vocab_size
    g = torch.Generator().manual_seed(4)
    batch = {"input_ids": torch.randint(2, vocab, (4, 5), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}
    per_example = per_example_reference(adapted, batch)
    bases = {f"{n}.basis": torch.linalg.qr(torch.randn(l.d_out, 5, generator=g)).Q for n, l in adapted.layers.items()}
    request = method._request(phase, bases if phase == "project" else None)
    sketches = {}
    for i, (name, layer) in enumerate(adapted.layers.items()):
        G = per_example[name]
        sketches[f"{name}.{'range' if phase == 'range' else 'projection'}"] = (
            G @ sketch_matrix(layer, request.sketch_size, 1, i) if phase == "range"
            else bases[f"{name}.basis"].T @ G)
    norms = torch.stack([s.flatten(1).pow(2).sum(1) for s in sketches.values()]).sum(0).sqrt().detach()
    clip = float(norms.median())  # some examples clipped, some not
    scale = (clip / norms).clamp(max=1.0)
    noise = 0.5
    reply = client_reply(adapted, request, [batch], losses_of(adapted.model),
                         PrivateRelease(clip, noise, torch.Generator().manual_seed(9), "materialise"))
    draws = torch.Generator().manual_seed(9)
    for key, s in sketches.items():
        expected = torch.einsum("b,b...->...", scale, s) + torch.randn(s.shape[1:], generator=draws) * noise * clip
        assert reply[key].shape == expected.shape
        assert torch.allclose(reply[key], expected, atol=1e-5), key


def test_private_sign_replies_are_the_signs_of_the_private_dense_sum():
    adapted, method = fedsb("signs")
    g = torch.Generator().manual_seed(4)
    batch = {"input_ids": torch.randint(5, 30000, (4, 5), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}
    release = lambda: PrivateRelease(0.5, 1.0, torch.Generator().manual_seed(2))
    dense = private_gradient_sum(adapted, [batch], losses_of(adapted.model), 0.5, 1.0, release().generator)
    reply = client_reply(adapted, method._request("signs"), [batch], losses_of(adapted.model), release())
    for name in adapted.layers:
        assert torch.equal(reply[f"{name}.signs"], torch.sign(dense[name]).to(torch.int8))


def test_traffic_of_each_variant():
    from fedlora.comm import communication_report

    d, r, layers = 384, 8, 12
    k = r + 8

    def init(variant):
        cfg = build_config({"fedsb": {"init": variant}})
        return communication_report("minilm-l6", "fedsb", r, target_modules=["query", "value"], settings=cfg)["init"]

    assert init("dense")["bytes_up"] == 4 * layers * d * d
    assert init("signs")["bytes_up"] == layers * d * d  # one int8 vote per entry
    for variant in ("sketch", "sign_sketch"):
        assert init(variant)["params_up"] == layers * 2 * k * d
        assert init(variant)["params_down"] == layers * (k * d + 2 * r * d)  # Q, then B and A
    assert init("dense")["params_down"] == layers * 2 * r * d
    mistral = communication_report("mistral-7b", "fedsb", 200)["init"]
    assert mistral["bytes_up"] <= 2 * 4 * 524_288_000  # at most twice B and A


# -- the set-up step ---------------------------------------------------------------------------------

@pytest.mark.parametrize("train, expected", [
    ({"lr": 0.01}, 0.01 / (3 * 5 * 4)),  # no warmup: lr / every client's steps over the run (3 x 5 rounds x 4)
    ({"lr": 0.01, "warmup_steps": 6, "lr_schedule": "linear"}, 0.01 / (3 * 6)),  # lr / every client's warmup
])
def test_the_default_set_up_step_is_the_references_rule(train, expected):
    from fedlora.methods.fedsb import set_up_step

    settings = {"federation": {"num_clients": 10, "clients_per_round": 3, "rounds": 5},
                "train": {"local_steps": 4} | train}
    assert set_up_step(build_config(settings)) == pytest.approx(expected, rel=1e-12)
    assert set_up_step(build_config(settings | {"fedsb": {"init_lr": 0.5}})) == 0.5  # an explicit eta wins
    # and the set-up factorises that step: the default's B R A equals the one with eta given by hand
    products = []
    for fedsb_settings in ({"init": "dense"}, {"init": "dense", "init_lr": expected}):
        adapted = AdaptedModel(tiny_bert(), parameterisation="lorasb", rank=RANK, scaling=1.0,
                               target_modules=["query"], head_modules=[])
        method = METHODS["fedsb"](adapted, build_config(settings | {"fedsb": fedsb_settings}), [10, 10, 10])
        gradients = low_rank_gradients(adapted, RANK)
        exchange, _ = run(method, lambda request, clients: {
            c: {f"{n}.grad_sum": gradients[c][n] for n in adapted.layers} for c in clients})
        products.append({n: product(method.global_state, n) for n in adapted.layers})
    for name in products[0]:
        torch.testing.assert_close(products[0][name], products[1][name])
        scale = torch.linalg.matrix_norm(products[0][name], ord=2) / torch.linalg.matrix_norm(
            adapted.layers[name].base_weight(), ord=2)
        assert exchange.delta_to_base[name] == pytest.approx(scale.item(), rel=1e-4)


def test_spectral_norms_of_a_low_rank_state_and_of_a_weight():
    from fedlora.adapters import low_rank_spectral_norm, spectral_norm

    g = torch.Generator().manual_seed(0)
    state = {"l.lora_B": torch.randn(40, 4, generator=g), "l.lora_R": torch.randn(4, 4, generator=g),
             "l.lora_A": torch.randn(4, 30, generator=g)}
    dense = state["l.lora_B"] @ state["l.lora_R"] @ state["l.lora_A"]
    assert low_rank_spectral_norm(state, "l", 0.5) == pytest.approx(
        0.5 * torch.linalg.matrix_norm(dense, ord=2).item(), rel=1e-6)
    without_r = {k: v for k, v in state.items() if k != "l.lora_R"}
    assert low_rank_spectral_norm(without_r, "l", 2.0) == pytest.approx(
        2.0 * torch.linalg.matrix_norm(state["l.lora_B"] @ state["l.lora_A"], ord=2).item(), rel=1e-6)
    weight = torch.randn(300, 200, generator=g)
    assert spectral_norm(weight) == pytest.approx(torch.linalg.matrix_norm(weight, ord=2).item(), rel=1e-6)
    # a large weight's randomized estimate, on a Gaussian matrix (its hardest case: the top values nearly coincide)
    weight = torch.randn(1500, 1100, generator=g)
    assert spectral_norm(weight, exact_up_to=256) == pytest.approx(
        torch.linalg.matrix_norm(weight, ord=2).item(), rel=1e-2)


# -- the exchange in a run: bytes, checks, privacy ---------------------------------------------------------

def recording_replies(monkeypatch, corrupt=None):
    """Record every set-up reply the simulator's clients send (after `corrupt(client, request, reply)`)."""
    from fedlora.client import ClientTrainer

    sent = []
    original = ClientTrainer.set_up_reply

    def set_up_reply(self, client, request, privacy=None):
        reply = original(self, client, request, privacy)
        if corrupt is not None:
            reply = corrupt(client, request, reply)
        sent.append((client, request, reply))
        return reply

    monkeypatch.setattr(ClientTrainer, "set_up_reply", set_up_reply)
    return sent


def tensor_bytes(payload):
    """Bytes of tensor data in a safetensors serialisation of the payload (header excluded); for meta
    tensors (a method's traffic template) their size."""
    if any(t.is_meta for t in payload.values()):
        return sum(t.numel() * t.element_size() for t in payload.values())
    blob = safetensors_save({k: v.contiguous() for k, v in payload.items()})
    return len(blob) - 8 - struct.unpack("<Q", blob[:8])[0]


@pytest.mark.parametrize("variant", ["sketch", "sign_sketch", "signs", "dense"])
def test_round_0_bytes_are_the_replies_and_broadcasts_sent(sim_config, tmp_path, monkeypatch, variant):
    from fedlora.comm import payload_bytes
    from fedlora.simulator import Simulator

    from conftest import read_log

    sent = recording_replies(monkeypatch)
    cfg = sim_config(method={"name": "fedsb"}, fedsb={"init": variant}, federation={"rounds": 1})
    sim = Simulator(cfg, tmp_path, progress=False)
    sim.run()
    round0 = read_log(tmp_path)[0]
    init_clients = sorted(sim.server.init_examples)
    phases = 2 if "sketch" in variant else 1
    assert len(sent) == phases * len(init_clients) and round0["clients"] == init_clients
    assert round0["bytes_up"] == sum(tensor_bytes(reply) for _, _, reply in sent)
    bases = sum(tensor_bytes(request.arrays) for _, request, _ in sent)  # Q, to each client of phase 2
    broadcast = {k: v for k, v in sim.method.global_state.items() if k.endswith(("lora_A", "lora_B"))}
    assert round0["bytes_down"] == bases + payload_bytes(broadcast) * cfg.federation.num_clients
    # what `fedlora comm` predicts for one set-up client
    up, down = sim.method.init_traffic()
    assert round0["bytes_up"] == len(init_clients) * tensor_bytes(up)
    one = sum(tensor_bytes(request.arrays) for c, request, _ in sent if c == init_clients[0])
    assert one + payload_bytes(broadcast) == tensor_bytes(down)
    assert (variant == "signs") == all(v.dtype == torch.int8 for _, _, reply in sent for v in reply.values())
    # the set-up's step against each adapted base weight is logged with round 0 (its value: the test above)
    assert set(round0["delta_to_base"]) == set(sim.method.adapted.layers)
    assert all(0 < ratio < 1 for ratio in round0["delta_to_base"].values())


@pytest.mark.parametrize("variant", ["sketch", "dense"])
def test_a_nan_infinite_or_misshapen_set_up_upload_is_dropped_and_the_rest_aggregate(sim_config, tmp_path,
                                                                                     monkeypatch, variant):
    from fedlora.simulator import Simulator

    from conftest import read_log

    def corrupt(client, request, reply):
        reply = dict(reply)
        key = sorted(reply)[0]
        if client == 0:
            reply[key] = reply[key].clone().fill_(float("nan"))
        elif client == 1:
            reply[key] = reply[key].clone().fill_(float("inf"))
        elif client == 2 and request.phase in ("gradient-sum", "project"):
            reply[key] = reply[key][:-1]
        return reply

    sent = recording_replies(monkeypatch, corrupt)
    cfg = sim_config(method={"name": "fedsb"}, fedsb={"init": variant},
                     federation={"num_clients": 5, "clients_per_round": 5, "rounds": 1})
    sim = Simulator(cfg, tmp_path, progress=False)
    sim.run()
    round0 = read_log(tmp_path)[0]
    assert round0["clients"] == [3, 4]
    reasons = {d["client"]: d["reason"] for d in round0["dropped"]}
    assert set(reasons) == {0, 1, 2}
    assert "NaN or infinite" in reasons[0] and "NaN or infinite" in reasons[1] and "has shape" in reasons[2]
    # the accepted replies alone give the set-up, as a server that never heard of the others would compute it
    accepted = {"range": (2, 3, 4), "project": (3, 4), "gradient-sum": (3, 4)}  # client 2 fails in phase 2
    good = {}
    for client, request, reply in sent:
        if client in accepted[request.phase]:
            good.setdefault(request.phase, {})[client] = reply
    _, reference = fedsb(variant)
    reference.adapted, reference.cfg = sim.adapted, cfg
    reference.initialise(InitContext([0, 1, 2, 3, 4], torch.Generator().manual_seed(0),
                                     ask=lambda request, clients: good[request.phase]))
    for key, value in reference.global_state.items():
        if "lora_" in key:
            assert torch.isfinite(sim.method.global_state[key]).all()
            if not key.endswith("lora_R"):  # R has trained for a round since
                assert torch.allclose(sim.method.global_state[key], value, atol=1e-5), key


@pytest.mark.parametrize("variant,releases", [("sketch", 2), ("sign_sketch", 1), ("signs", 1), ("dense", 1)])
def test_private_set_up_is_charged_as_planned(sim_config, tmp_path, monkeypatch, variant, releases):
    """Each client's epsilon after round 0 is Opacus' for its releases: the sketch's two phases are two
    Poisson-sampled Gaussian releases; a sign sketch sketches one release twice."""
    from opacus.accountants import RDPAccountant

    from fedlora.simulator import Simulator

    import fedlora.client

    sent, released = recording_replies(monkeypatch), []
    real_release = fedlora.client.private_gradient_sum
    monkeypatch.setattr(fedlora.client, "private_gradient_sum",
                        lambda *args, **kwargs: released.append(real_release(*args, **kwargs)) or released[-1])
    cfg = sim_config(method={"name": "fedsb"}, fedsb={"init": variant},
                     privacy={"noise_multiplier": 1.1, "clip_norm": 0.5, "accountant": "rdp"})
    sim = Simulator(cfg, tmp_path, progress=False)
    assert sim.server.begin(False) == 0
    record = sim.initialise()
    assert sim.server.plan.init_releases == releases
    for c in sorted(sim.server.init_examples):
        acc = RDPAccountant()
        for _ in range(releases):
            acc.step(noise_multiplier=1.1, sample_rate=sim.server.init_examples[c] / sim.client_sizes[c])
        assert sim.ledger.epsilon(c) == pytest.approx(acc.get_epsilon(sim.ledger.delta), rel=1e-6)
    assert record["epsilon"] == pytest.approx(max(sim.ledger.epsilon(c) for c in sim.server.init_examples))
    # the calibration plans the same releases
    plan = sim.server.plan.privacy_segments()
    c = sorted(sim.server.init_examples)[0]
    assert plan[c][0] == (sim.server.init_examples[c] / sim.client_sizes[c], releases, None)
    if variant == "sign_sketch":  # both phases sent from the one release the client kept (and then let go)
        assert len(released) == len(sim.server.init_examples) and sim.trainer.releases[(c, 0)] is None
        kept = released[sorted(sim.server.init_examples).index(c)]
        (_, first, ranges), (_, second, projections) = [s for s in sent if s[0] == c]
        for i, (name, layer) in enumerate(sim.adapted.layers.items()):
            S = torch.sign(kept[name])
            assert torch.allclose(ranges[f"{name}.range"], S @ sketch_matrix(layer, first.sketch_size, cfg.seed, i))
            assert torch.allclose(projections[f"{name}.projection"], second.arrays[f"{name}.basis"].T @ S)


README_COMM = """\
$ fedlora comm --model mistral-7b --method fedsb --rank 200
mistral-7b / fedsb r=200 (224 adapted layers, 1 clients, float32)
  per client per round: up 8,960,000 params (35,840,000 B), down 8,960,000 params (35,840,000 B)
  per client, once before round 1: up 545,259,520 params (2,181,038,080 B), down 810,549,248 params (3,242,196,992 B)
$ fedlora comm --model mistral-7b --method fedsb --rank 200 --set 'fedsb.init="signs"'
mistral-7b / fedsb r=200 (224 adapted layers, 1 clients, float32)
  per client per round: up 8,960,000 params (35,840,000 B), down 8,960,000 params (35,840,000 B)
  per client, once before round 1: up 6,979,321,856 params (6,979,321,856 B), down 524,288,000 params (2,097,152,000 B)
$ fedlora comm --model mistral-7b --method fedsb --rank 200 --set 'fedsb.init="dense"'
mistral-7b / fedsb r=200 (224 adapted layers, 1 clients, float32)
  per client per round: up 8,960,000 params (35,840,000 B), down 8,960,000 params (35,840,000 B)
  per client, once before round 1: up 6,979,321,856 params (27,917,287,424 B), down 524,288,000 params (2,097,152,000 B)
"""


@pytest.mark.docs
def test_the_documented_comm_commands_print_as_shown(capsys):
    """The `fedlora comm` commands of the README's set-up section, run exactly as written."""
    import shlex

    from fedlora.cli import main

    for block in README_COMM.split("$ ")[1:]:
        command, *expected = block.splitlines()
        argv = shlex.split(command)
        assert argv[0] == "fedlora" and main(argv[1:]) == 0
        assert capsys.readouterr().out.splitlines() == expected
