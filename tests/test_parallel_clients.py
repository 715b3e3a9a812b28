"""Clients trained together in one pass over the shared base model against the same clients trained one
after another: every client's upload, optimizer state and privacy charge must be the sequential one."""
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from fedlora import parallel
from fedlora.adapters import AdaptedModel
from fedlora.batching import optimal_parts
from fedlora.client import local_train, make_optimizer
from fedlora.config import DataConfig, TrainConfig
from fedlora.data import load_classification
from fedlora.errors import ConfigError
from fedlora.privacy.dpsgd import DPSGD
from fedlora.privacy.grad_sample import for_trainable
from fedlora.simulator import Simulator
from fedlora.tasks import ClassificationTask

from conftest import config_with, minilm_path, read_log

TOLERANCE = 1e-5
# AdamW divides every gradient element by its running RMS, so an element whose gradient is at float-rounding
# level takes a step of O(lr) in the direction of that rounding; a joint batch rounds differently from a
# client's own batch (the frozen base model runs on more rows), which moves such elements by up to ~1e-4
# of the payload's largest entry. Every other difference (a wrong mask, noise, clip) is of order 1e-2 or more.
ADAMW_TOLERANCE = 3e-4


@pytest.fixture(scope="session")
def bert_without_dropout(tmp_path_factory) -> str:
    """The tiny BERT of the other tests with dropout off, so that the sequential result is reproducible."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=128, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    BertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return str(path)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def assert_states_match(got: dict, want: dict, what: str, tolerance: float = TOLERANCE) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        diff = relative_difference(got[k].float(), want[k].float())
        assert diff < tolerance, f"{what} {k}: relative difference {diff:.2e}"


def recorded_run(cfg, out, prepare=lambda sim: None) -> tuple[Simulator, list[dict]]:
    """Run a simulation; every round's {client: upload} as the server received them."""
    sim = Simulator(cfg, out, progress=False)
    prepare(sim)
    uploads = []
    aggregate = sim.method.aggregate

    def recording(payloads, weights, clients, r):
        uploads.append({c: {k: v.clone() for k, v in p.items()} for c, p in zip(clients, payloads)})
        return aggregate(payloads, weights, clients, r)
    sim.method.aggregate = recording
    sim.run()
    return sim, uploads


@pytest.fixture
def joint_groups(monkeypatch) -> list[list[int]]:
    """The groups of clients that were trained together (and not handed back to sequential training)."""
    trained = []
    real = parallel.train_together

    def recording(sim, clients, r, starts, privacy=None, clip=None):
        updates = real(sim, clients, r, starts, privacy, clip)
        if updates is not None:
            trained.append(sorted(updates))
        return updates
    monkeypatch.setattr(parallel, "train_together", recording)
    return trained


def assert_runs_match(make_cfg, tmp_path, tolerance=TOLERANCE, **sections) -> tuple[Simulator, Simulator]:
    alone, alone_uploads = recorded_run(make_cfg(1, **sections), tmp_path / "one-by-one")
    joint, joint_uploads = recorded_run(make_cfg(3, **sections), tmp_path / "together")
    assert [sorted(u) for u in joint_uploads] == [sorted(u) for u in alone_uploads]
    for r, (got, want) in enumerate(zip(joint_uploads, alone_uploads), 1):
        for c in want:
            assert_states_match(got[c], want[c], f"round {r}, client {c}:", tolerance)
    return alone, joint


@pytest.fixture
def cfg_parallel(sim_config, bert_without_dropout):
    def make(parallel_clients, **sections):
        cfg = sim_config(**sections)
        raw = cfg.to_dict()
        raw["model"]["path"] = bert_without_dropout
        raw["federation"]["parallel_clients"] = parallel_clients
        return config_with(raw, {})
    return make


TOGETHER = ["fedsb", "ffa", "fedit", "fedex", "flora", "fedsa", "fedsvd", "rolora", "flexlora", "hetlora"]
QUICK_DP = ("ffa", "fedit")  # under DP in the fast tier; the other methods under DP are marked slow


@pytest.mark.parametrize("method,mode", [
    pytest.param(method, mode, marks=pytest.mark.slow if mode == "dp" and method not in QUICK_DP else ())
    for mode in ("sgd", "adamw", "dp") for method in TOGETHER])
def test_every_clients_upload_equals_training_it_alone(cfg_parallel, tmp_path, joint_groups, method, mode):
    # dirichlet shards of 120 examples over 4 clients at batch 16: some clients have fewer examples than a batch
    dp = mode == "dp"
    train = {"batch_size": 16} | ({"optimizer": "sgd", "momentum": 0.9} if mode == "sgd" else {"optimizer": "adamw"})
    if dp:  # batch 2: the Poisson draws differ in size and some are empty
        train["batch_size"] = 2
    # FedSVD and FlexLoRA: one round. Round 1's SVD turns float rounding of the average into a rotation of the factors
    # (as large as rounding over the gap between two singular values), so round 2 would start from other,
    # equivalent factors in the two runs; every FedSVD round trains B on a shared A, as round 1 does
    rounds = 1 if method in ("fedsvd", "flexlora") else 2
    sections = dict(method={"name": method}, train=train,
                    federation={"num_clients": 4, "clients_per_round": 3, "rounds": rounds},
                    privacy={"noise_multiplier": 1.0, "clip_norm": 0.5, "randomness": "seeded"} if dp else {})
    alone, joint = assert_runs_match(cfg_parallel, tmp_path, ADAMW_TOLERANCE if mode == "adamw" else TOLERANCE,
                                     **sections)
    assert joint_groups == [record["clients"] for record in read_log(tmp_path / "together")[1:]]
    if dp:
        assert joint.ledger.history == alone.ledger.history and alone.ledger.history


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimizer_state_clipping_and_uneven_shards(cfg_parallel, tmp_path, joint_groups, optimizer):
    train = {"optimizer": optimizer, "weight_decay": 0.01, "max_grad_norm": 0.05, "keep_optimizer_state": True,
             "batch_size": 16} | ({"momentum": 0.9} if optimizer == "sgd" else {})
    tolerance = ADAMW_TOLERANCE if optimizer == "adamw" else TOLERANCE
    alone, joint = assert_runs_match(cfg_parallel, tmp_path, tolerance, method={"name": "fedit"}, train=train,
                                     federation={"num_clients": 4, "clients_per_round": 3, "rounds": 3})
    assert joint_groups == [record["clients"] for record in read_log(tmp_path / "together")[1:]]
    assert min(alone.client_sizes) < 16 and sorted(alone.trainer.optimizer_states) == sorted(joint.trainer.optimizer_states)
    for c, state in alone.trainer.optimizer_states.items():  # clients sampled a different number of times
        for i, s in state["state"].items():
            for name, value in s.items():
                assert relative_difference(joint.trainer.optimizer_states[c]["state"][i][name].float(),
                                           value.float()) < tolerance, (c, i, name)


@pytest.fixture
def tiny_setup(bert_without_dropout, toy_data):
    model = BertForSequenceClassification.from_pretrained(bert_without_dropout)
    tokenizer = AutoTokenizer.from_pretrained(bert_without_dropout)
    data = load_classification(DataConfig(name=None, path=toy_data["path"], eval_path=toy_data["eval_path"],
                           text_columns=["sentence"], label_column="label"))
    adapted = AdaptedModel(model, parameterisation="lora", rank=4, scaling=2.0, target_modules=["query", "value"],
                           head_modules=["classifier"])
    task = ClassificationTask(data, tokenizer, 16, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    starts = [{k: torch.randn(v.shape, generator=g) * 0.1 for k, v in adapted.state().items()} for _ in range(3)]
    return adapted, task, starts


@pytest.mark.parametrize("part_cost", [10**9, 1], ids=["one-part", "parts-by-length"])
@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_clients_with_fewer_steps_empty_draws_and_uneven_batches(tiny_setup, dp, part_cost):
    """Client 1 stops after one step, client 2 has a step with no example (DP: noise alone); the joint
    batch runs whole or in parts of similar length."""
    adapted, task, starts = tiny_setup
    draws = [[np.arange(0, 5), np.arange(5, 12), np.arange(12, 15)],
             [np.arange(20, 28)],
             [np.arange(30, 33), np.arange(0) if dp else np.arange(33, 34), np.arange(34, 40)]]
    keys = adapted.keys_of(("lora_A", "lora_B"))
    cfg = TrainConfig(lr=0.002, optimizer="adamw", max_grad_norm=None if dp else 0.1)
    recorder = for_trainable(adapted, keys)

    def dp_of(params, k):
        return DPSGD(recorder, params, 0.3, 1.0, 4.0, torch.Generator().manual_seed(k)) if dp else None

    alone = []
    for k, start in enumerate(starts):
        adapted.load_state(start)
        params = adapted.set_trainable(keys)
        batches = [[task.batch(d)] if len(d) else None for d in draws[k]]
        losses = local_train(adapted.model, make_optimizer(params, cfg), batches,
                             lambda b: task.example_losses(adapted.model, b), cfg.max_grad_norm,
                             dp_of(dict(zip(keys, params)), k))
        alone.append((adapted.state(keys), losses))

    adapted.load_state(starts[0])
    adapted.set_trainable([])
    with parallel.ClientStack(adapted, keys, starts) as stack:
        optimizers = [make_optimizer(list(leaves.values()), cfg) for leaves in stack.leaves]
        dps = [dp_of(leaves, k) for k, leaves in enumerate(stack.leaves)] if dp else None
        losses = parallel.train_steps(adapted.model, task, stack, optimizers, [iter(d) for d in draws],
                                      cfg.max_grad_norm, dps, part_cost)
    for k, (state, want_losses) in enumerate(alone):
        assert_states_match({key: v.detach() for key, v in stack.leaves[k].items()}, state, f"client {k}")
        assert np.allclose(losses[k], want_losses, rtol=1e-5) and len(losses[k]) == len(want_losses)
    assert len(losses[1]) == 1 and len(losses[2]) == (2 if dp else 3)


def test_a_failing_client_inside_a_group_is_dropped_alone(cfg_parallel, tmp_path):
    cfg = cfg_parallel(3, method={"name": "ffa"}, federation={"rounds": 1},
                       train={"optimizer": "sgd", "momentum": 0.9})  # SGD: see ADAMW_TOLERANCE
    _, clean_uploads = recorded_run(cfg, tmp_path / "clean")
    clients = sorted(clean_uploads[0])

    def poison(sim):  # every batch holding one of the middle client's examples fails
        poisoned, real_batch = set(sim.shards[clients[1]].tolist()), sim.task.batch

        def batch(indices, split=None):
            if split is None and poisoned & set(np.asarray(indices).tolist()):
                raise RuntimeError("corrupt example")
            return real_batch(indices, split)
        sim.task.batch = batch
    with pytest.warns(RuntimeWarning, match=r"clients \[.*\] are trained again one by one"):
        faulty, faulty_uploads = recorded_run(cfg, tmp_path / "faulty", poison)
    record = read_log(tmp_path / "faulty")[1]
    assert record["clients"] == [clients[0], clients[2]]
    assert record["dropped"] == [{"client": clients[1], "reason": "raised RuntimeError: corrupt example"}]
    for c in (clients[0], clients[2]):  # the others trained exactly as in the clean run
        assert_states_match(faulty_uploads[0][c], clean_uploads[0][c], f"client {c}")


def test_a_client_whose_upload_fails_after_joint_training_is_dropped_alone(cfg_parallel, tmp_path):
    cfg = cfg_parallel(3, method={"name": "ffa"}, federation={"rounds": 1},
                       train={"optimizer": "sgd", "momentum": 0.9})
    _, clean_uploads = recorded_run(cfg, tmp_path / "clean")
    clients = sorted(clean_uploads[0])

    def break_upload(sim):
        real_upload = sim.method.upload

        def upload(c, trained, r):
            if c == clients[1]:
                raise ValueError("cannot send")
            return real_upload(c, trained, r)
        sim.method.upload = upload
    _, uploads = recorded_run(cfg, tmp_path / "faulty", break_upload)
    record = read_log(tmp_path / "faulty")[1]
    assert record["clients"] == [clients[0], clients[2]]
    assert record["dropped"] == [{"client": clients[1], "reason": "raised ValueError: cannot send"}]
    for c in (clients[0], clients[2]):
        assert_states_match(uploads[0][c], clean_uploads[0][c], f"client {c}")


def test_which_runs_train_clients_together(cfg_parallel, sim_config, tmp_path):
    sim = Simulator(cfg_parallel("auto", method={"name": "ffa"}), tmp_path / "a", progress=False)
    assert parallel.client_groups(sim, [0, 1, 2]) == [[0, 1, 2]]
    sim.cfg.federation.parallel_clients = 2
    assert parallel.client_groups(sim, [0, 1, 2]) == [[0, 1], [2]]
    sim.cfg.federation.client_timeout = 5.0
    assert parallel.client_groups(sim, [0, 1, 2]) == [[0], [1], [2]]
    with_dropout = Simulator(sim_config(method={"name": "ffa"}), tmp_path / "b", progress=False)
    assert parallel.sequential_reason(with_dropout, auto=True) == "dropout draws its masks per client"
    assert parallel.client_groups(with_dropout, [0, 1, 2]) == [[0], [1], [2]]
    full = Simulator(cfg_parallel(3, method={"name": "full"}), tmp_path / "c", progress=False)
    assert parallel.client_groups(full, [0, 1, 2]) == [[0], [1], [2]]


def test_parallel_clients_must_be_positive_or_auto(sim_config):
    with pytest.raises(ConfigError, match="federation.parallel_clients"):
        sim_config(federation={"parallel_clients": 0})


@pytest.mark.parametrize("owners", [[0, 0, 1, 1, 2, 2], [2, 0, 0, 1, 2, 2], [1, 1, 1]], ids=["even", "mixed", "one-client"])
def test_each_row_goes_through_its_own_clients_weight(owners):
    torch.manual_seed(0)
    t, weights = torch.randn(len(owners), 5, 4), torch.randn(3, 7, 4)
    slots = parallel.Slots(np.array(owners), 3, torch.device("cpu"))
    want = torch.stack([t[i] @ weights[k].T for i, k in enumerate(owners)])
    assert torch.allclose(slots.linear(t, weights), want, atol=1e-6)
    assert torch.allclose(slots.linear(t[:, 0], weights), want[:, 0], atol=1e-6)  # rows without a token axis


@pytest.mark.parametrize("seed", range(5))
def test_length_parts_are_the_cheapest_cut(seed):
    """Against every way of cutting the ascending lengths into consecutive parts."""
    lengths = np.sort(np.random.default_rng(seed).integers(1, 40, size=8))
    part_cost = [0, 8, 30, 200, 5][seed]

    def cost(ends):
        starts = [0] + ends[:-1]
        return sum((e - s) * lengths[e - 1] + part_cost for s, e in zip(starts, ends))
    every = [[*(i + 1 for i in range(7) if cuts >> i & 1), 8] for cuts in range(2 ** 7)]
    assert cost(optimal_parts(lengths, part_cost)) == min(cost(ends) for ends in every)
