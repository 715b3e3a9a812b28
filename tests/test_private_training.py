"""Private training: DP randomness a server holding the run config cannot regenerate, logical batches in
micro-batches (the same step as the whole batch, with and without DP, alone and in the joint pass), and
learning-rate schedules over the run's steps that a resumed run follows exactly."""
import math

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from fedlora import parallel
from fedlora.batching import length_parts, optimal_parts
from fedlora.client import local_train, make_optimizer, scheduled_lr
from fedlora.config import TrainConfig
from fedlora.errors import ConfigError
from fedlora.flower.client_app import ClientRuntime
from fedlora.flower.project import to_run_config
from fedlora.flower.strategy import check_supported
from fedlora.privacy.dpsgd import DPSGD
from fedlora.privacy.grad_sample import for_trainable
from fedlora.seeding import derive_seed, rng
from fedlora.simulator import Simulator
from fedlora.tasks import Task

from conftest import read_log, run_until_killed
from test_grad_sample import build, padded_batch
from test_parallel_clients import bert_without_dropout, tiny_setup  # noqa: F401 - fixtures

RELATIVE = 1e-6


def relative_difference(got: dict, want: dict) -> float:
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)


# -- secret randomness ------------------------------------------------------------------------------

def spy_on(trainer, monkeypatch) -> dict:
    """What a ClientTrainer really uses: the Gaussian draws of its first DP step (replayed from a copy of its
    noise generator as handed to DP-SGD) and its Poisson draws of example indices."""
    seen = {"noise": [], "draws": []}
    real_dp, real_indices = trainer.dp, trainer.task.client_batch_indices

    def dp(client, r, privacy, params=None):
        made = real_dp(client, r, privacy, params)
        replay = torch.Generator(made.generator.device)
        replay.set_state(made.generator.get_state())
        seen["noise"].append([torch.randn(p.shape, generator=replay) for p in made.params.values()])
        return made

    def indices(*args, **kwargs):
        chosen = list(real_indices(*args, **kwargs))
        seen["draws"].append(chosen)
        return iter(chosen)
    monkeypatch.setattr(trainer, "dp", dp)
    monkeypatch.setattr(trainer.task, "client_batch_indices", indices)
    return seen


def attack(cfg, trainer, client: int, r: int) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """A server holding the whole run config regenerates the client's noise and Poisson draws of round r the
    way config-seeded randomness makes them."""
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "noise", r, client))
    params = trainer.adapted.parameters_by_key()
    noise = [torch.randn(params[k].shape, generator=generator) for k in trainer.method.trainable_keys(r)]
    draws = Task.client_batch_indices(trainer.shards[client], cfg.train.batch_size, cfg.train.local_steps,
                                      rng(cfg.seed, "client", r, client), trainer.sample_rate(client))
    return noise, list(draws)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and bool((x == y).all()) for x, y in zip(a, b))


@pytest.mark.parametrize("randomness", ["secret", "seeded"])
def test_a_server_holding_the_run_config_cannot_regenerate_a_deployed_clients_noise_or_sample(
        sim_config, tmp_path, monkeypatch, randomness):
    cfg = sim_config(method={"name": "ffa"}, train={"batch_size": 4},
                     privacy={"noise_multiplier": 1.0, "randomness": randomness})
    client, r = 1, 1
    if randomness == "secret":  # the deployment: the Flower ClientApp's own client object
        runtime = ClientRuntime(to_run_config(cfg))
        trainer, privacy = runtime.trainer, runtime.take_privacy(client, {})
    else:  # only the in-process simulator may seed DP randomness from the config
        with pytest.raises(ConfigError, match=r"privacy.randomness = 'seeded' is refused on Flower"):
            ClientRuntime(to_run_config(cfg))
        with pytest.raises(ConfigError, match=r"privacy.randomness = 'seeded' is refused on Flower"):
            check_supported(cfg)  # what the ServerApp checks before it loads anything
        sim = Simulator(cfg, tmp_path, progress=False)
        sim.server.setup_privacy()
        trainer, privacy = sim.trainer, sim.server.privacy_for(client)
    seen = spy_on(trainer, monkeypatch)
    trainer.update(client, r, trainer.method.client_state(client, r), privacy=privacy)
    noise, draws = attack(cfg, trainer, client, r)
    assert len(seen["noise"]) == 1 and len(seen["draws"]) == 1
    assert sum(len(d) for d in draws) > 0
    if randomness == "secret":
        assert not any(torch.equal(x, y) for x, y in zip(noise, seen["noise"][0]))
        assert not same(draws, seen["draws"][0])
    else:
        assert same(noise, seen["noise"][0]) and same(draws, seen["draws"][0])


def test_seeded_dp_runs_are_bit_identical_and_secret_ones_differ(sim_config, tmp_path):
    def final(randomness, out):
        cfg = sim_config(method={"name": "ffa"}, federation={"rounds": 1},
                         privacy={"noise_multiplier": 1.0, "randomness": randomness})
        sim = Simulator(cfg, tmp_path / out, progress=False)
        sim.run()
        return sim.method.eval_state()

    seeded = [final("seeded", "a"), final("seeded", "b")]
    secret = [final("secret", "c"), final("secret", "d")]
    assert all(torch.equal(seeded[0][k], seeded[1][k]) for k in seeded[0])
    assert any(not torch.equal(secret[0][k], secret[1][k]) for k in secret[0])


# -- micro-batches ----------------------------------------------------------------------------------

@pytest.mark.parametrize("max_rows", [1, 2, 3, 5])
def test_parts_hold_every_row_once_in_order_of_length_and_at_most_max_rows(max_rows):
    lengths = np.array([7, 3, 3, 9, 1, 3, 12, 7, 7, 2, 2])
    ends = optimal_parts(np.sort(lengths), part_cost=4, max_rows=max_rows)
    sizes = np.diff([0, *ends])
    assert ends[-1] == len(lengths) and (sizes >= 1).all() and (sizes <= max_rows).all()
    assert len(ends) >= math.ceil(len(lengths) / max_rows)
    mask = torch.tensor([[1] * n + [0] * (12 - n) for n in lengths])
    parts = length_parts({"attention_mask": mask, "labels": torch.arange(len(lengths))}, 4, max_rows)
    assert sorted(np.concatenate([rows for rows, _ in parts]).tolist()) == list(range(len(lengths)))
    for rows, part in parts:
        assert len(rows) <= max_rows and part["attention_mask"].shape[1] == lengths[rows].max()
        assert part["labels"].tolist() == rows.tolist()


def one_step(adapted, keys, parts, dp_seed: int | None):
    """The trainable tensors after one SGD step (lr 1) on a batch given as `parts`, under DP when dp_seed is set."""
    start = adapted.state(keys)
    params = adapted.set_trainable(keys)
    dp = None
    if dp_seed is not None:
        dp = DPSGD(for_trainable(adapted, keys), dict(zip(keys, params)), clip_norm=0.05, noise_multiplier=1.0,
                   expected_batch_size=6.0, generator=torch.Generator().manual_seed(dp_seed))
    losses = local_train(adapted.model, make_optimizer(params, TrainConfig(lr=1.0, optimizer="sgd")), [parts],
                         lambda b: torch.nn.functional.cross_entropy(
                             adapted.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                             b["labels"], reduction="none"), dp=dp)
    after = adapted.state(keys)
    adapted.load_state(start)
    return after, losses


def bert_without_dropout_in_memory():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=128, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
@pytest.mark.parametrize("method", ["ffa", "fedsb", "fedit"])
def test_a_step_in_micro_batches_equals_the_whole_batchs_step(method, dp):
    adapted, keys = build(method, model_fn=bert_without_dropout_in_memory)
    if not dp:  # in float64, so that only a wrong sum (not float32 rounding of differently padded rows) shows
        adapted.model.double()
    ids, mask, labels = padded_batch(adapted.model.config.vocab_size, lengths=(7, 4, 6, 2, 9, 3, 3, 5))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    whole, whole_loss = one_step(adapted, keys, [batch], 0 if dp else None)
    split, split_loss = one_step(adapted, keys, [p for _, p in length_parts(batch, 1, max_rows=3)],
                                 0 if dp else None)
    start = adapted.state(keys)
    moved = {k: whole[k] - start[k] for k in keys}
    assert relative_difference({k: split[k] - start[k] for k in keys}, moved) < RELATIVE
    assert split_loss == pytest.approx(whole_loss, rel=RELATIVE)
    if dp:  # the clip binds (else clipping would not be tested) and a different noise draw is told apart
        other, _ = one_step(adapted, keys, [batch], 1)
        assert relative_difference({k: other[k] - start[k] for k in keys}, moved) > 1e-2


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_the_joint_pass_in_micro_batches_equals_it_whole(tiny_setup, dp):  # noqa: F811
    adapted, task, starts = tiny_setup
    draws = [[np.arange(0, 9), np.arange(9, 20)], [np.arange(20, 28), np.arange(28, 31)],
             [np.arange(30, 37), np.arange(0) if dp else np.arange(40, 44)]]
    keys = adapted.keys_of(("lora_A", "lora_B"))
    cfg = TrainConfig(lr=0.5, optimizer="sgd")
    recorder = for_trainable(adapted, keys)
    if not dp:  # float64: see test_a_step_in_micro_batches_equals_the_whole_batchs_step
        adapted.model.double()

    def joint(max_rows):
        adapted.load_state(starts[0])
        adapted.set_trainable([])
        with parallel.ClientStack(adapted, keys, starts) as stack:
            optimizers = [make_optimizer(list(leaves.values()), cfg) for leaves in stack.leaves]
            dps = [DPSGD(recorder, leaves, 0.3, 1.0, 4.0, torch.Generator().manual_seed(k))
                   for k, leaves in enumerate(stack.leaves)] if dp else None
            losses = parallel.train_steps(adapted.model, task, stack, optimizers, [iter(d) for d in draws],
                                          None, dps, part_cost=1, max_rows=max_rows)
        return [{k: v.detach() for k, v in leaves.items()} for leaves in stack.leaves], losses

    whole, whole_losses = joint(None)
    split, split_losses = joint(2)
    for k, start in enumerate(starts):
        moved = {key: whole[k][key] - start[key] for key in keys}
        assert relative_difference({key: split[k][key] - start[key] for key in keys}, moved) < RELATIVE
        assert np.allclose(split_losses[k], whole_losses[k], rtol=RELATIVE)


def test_physical_batch_size_leaves_a_run_unchanged(sim_config, bert_without_dropout, tmp_path):  # noqa: F811
    def final(physical, out):
        cfg = sim_config(method={"name": "ffa"}, model={"path": bert_without_dropout},
                         federation={"rounds": 1, "parallel_clients": 1},
                         train={"optimizer": "sgd", "lr": 0.5, "batch_size": 12, "physical_batch_size": physical},
                         privacy={"noise_multiplier": 0.5, "randomness": "seeded"})
        sim = Simulator(cfg, tmp_path / out, progress=False)
        sim.run()
        assert sim.trainer.max_rows == physical
        return sim.method.eval_state()

    whole, split = final(1000, "whole"), final(2, "split")
    trained = [k for k in whole if k.endswith("lora_B")]  # FFA-LoRA's B starts at zero: its value is its update
    assert trained and all(whole[k].abs().max() > 0 for k in trained)
    assert relative_difference({k: split[k] for k in trained}, {k: whole[k] for k in trained}) < 1e-5


# -- learning-rate schedules ------------------------------------------------------------------------

def test_schedules_by_hand():
    cfg = TrainConfig(lr=0.1, warmup_steps=4, lr_schedule="linear")
    assert [scheduled_lr(cfg, t, 12) for t in (1, 4, 5, 12)] == pytest.approx([0.025, 0.1, 0.1, 0.1 * 1 / 8])
    cfg = TrainConfig(lr=0.1, warmup_steps=0, lr_schedule="cosine")
    assert [scheduled_lr(cfg, t, 10) for t in (1, 6, 10)] == pytest.approx(
        [0.1, 0.05 * (1 + math.cos(math.pi / 2)), 0.05 * (1 + math.cos(math.pi * 0.9))])
    assert scheduled_lr(TrainConfig(lr=0.1), 7, 10) == 0.1


def test_a_resumed_run_steps_at_the_uninterrupted_runs_learning_rates(sim_config, tmp_path, monkeypatch):
    import fedlora.client

    cfg = sim_config(method={"name": "ffa"}, federation={"rounds": 3},
                     train={"lr_schedule": "cosine", "warmup_steps": 4, "local_steps": 3})
    steps: list[float] = []
    real = fedlora.client.make_optimizer

    def recording(params, train_cfg):
        optimizer = real(params, train_cfg)
        step = optimizer.step

        def recorded_step(*args, **kwargs):
            steps.append(optimizer.param_groups[0]["lr"])
            return step(*args, **kwargs)
        optimizer.step = recorded_step
        return optimizer
    monkeypatch.setattr(fedlora.client, "make_optimizer", recording)

    Simulator(cfg, tmp_path / "whole", progress=False).run()
    whole, steps[:] = list(steps), []
    run_until_killed(Simulator(cfg, tmp_path / "cut", progress=False), monkeypatch, after_round=1)
    Simulator(cfg, tmp_path / "cut", progress=False).run(resume=True)
    clients = [len(record["clients"]) for record in read_log(tmp_path / "whole")[1:]]
    want = [scheduled_lr(cfg.train, (r - 1) * 3 + t, 9) for r, k in enumerate(clients, 1) for _ in range(k)
            for t in (1, 2, 3)]
    assert whole == pytest.approx(want, rel=1e-12) and steps == whole
    assert whole[0] == pytest.approx(cfg.train.lr / 4) and max(whole) == pytest.approx(cfg.train.lr)
