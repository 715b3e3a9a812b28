"""Example-level DP-SGD clips every example's gradient to privacy.clip_norm, on both training paths.

The clipping routine (PerExampleGradients.clipped_sums) has tests of its own; these pin the bound that training
hands it. With no noise and a clip that binds, one local step of plain SGD must move each client's parameters
by exactly -lr / E * sum_e g_e min(1, C / ||g_e||) (E the expected batch size, g_e each drawn example's
gradient computed alone with torch.func), whether the client trains alone (ClientTrainer.update: local_train
with ClientTrainer.dp's DPSGD) or with others in one joint pass (parallel.train_together); and one example with
a gradient 10^4 times the others' moves the step (.grad, noise included) by exactly C / E. A bound of 2 C
(or C / 2) set in DPSGD's constructor or ClientTrainer.dp fails all three tests; passed to the clipping only
in DPSGD.set_gradients, the two sequential ones; only in parallel.train_steps, the joint one.
"""
import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

from fedlora import parallel
from fedlora.plan import PrivacySettings
from fedlora.simulator import Simulator

from test_parallel_clients import bert_without_dropout  # noqa: F401 - fixture

CLIP, LR, BATCH = 0.05, 0.5, 4


@pytest.fixture
def sim(sim_config, bert_without_dropout, tmp_path):  # noqa: F811
    """Plain SGD (no momentum), one local step, a binding clip; no dropout, so a step is reproducible by hand."""
    cfg = sim_config(method={"name": "fedit"}, model={"path": bert_without_dropout},
                     federation={"num_clients": 4, "rounds": 1},
                     train={"optimizer": "sgd", "momentum": 0.0, "lr": LR, "batch_size": BATCH, "local_steps": 1,
                            "physical_batch_size": 2},  # micro-batches: the clipped sums of several parts
                     privacy={"clip_norm": CLIP, "noise_multiplier": 1.0, "randomness": "seeded"})
    sim = Simulator(cfg, tmp_path, progress=False)
    sim.model.double()  # a step is ~1e-7 of a parameter: in float32 `trained - start` would be mostly rounding
    return sim


def random_start(sim, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)  # B != 0, so that every factor has a gradient
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.1 for k, v in sim.adapted.state().items()}


def per_example_gradients(sim, start: dict, keys: list[str], indices, scale=None) -> list[dict]:
    """torch.func.grad of each example's loss (times scale[i]), the example alone in its batch."""
    sim.adapted.load_state(start)
    model = sim.model.train()
    params = sim.adapted.parameters_by_key()
    names = {id(p): n for n, p in model.named_parameters()}
    keyed = {k: names[id(params[k])] for k in keys}
    out = []
    for i, index in enumerate(indices):
        batch = sim.task.batch([index])
        factor = 1.0 if scale is None else scale[i]

        def loss(p):
            return sim.task.example_losses(lambda **kw: functional_call(model, p, kwargs=kw), batch).sum() * factor
        g = grad(loss)({keyed[k]: params[k].detach() for k in keys})
        out.append({k: g[keyed[k]] for k in keys})
    return out


def norm(g: dict) -> float:
    return torch.sqrt(sum(v.double().pow(2).sum() for v in g.values())).item()


def clipped_sum(grads: list[dict]) -> dict:
    return {k: sum(g[k] * min(1.0, CLIP / norm(g)) for g in grads) for k in grads[0]}


def expected_update(sim, client: int, r: int, start: dict) -> tuple[dict, int]:
    """-lr / E * the hand-clipped sum over the client's Poisson draw of its one step; the draw's size."""
    (drawn,) = list(sim.trainer.batch_indices(client, r, True))  # seeded: the draw training makes
    keys = sim.method.trainable_keys(r)
    grads = per_example_gradients(sim, start, keys, drawn)
    assert all(norm(g) > 4 * CLIP for g in grads)  # the clip binds, by far, for every example
    expected = sim.trainer.sample_rate(client) * sim.trainer.plan.client_sizes[client]
    return {k: -LR / expected * v for k, v in clipped_sum(grads).items()}, len(drawn)


def assert_moved_by(trained: dict, start: dict, want: dict, what: str) -> None:
    assert set(want) <= set(trained), what
    for k, step in want.items():
        moved = trained[k] - start[k]
        diff = ((moved - step).abs().max() / step.abs().max()).item()
        assert diff < 1e-4, f"{what} {k}: relative difference {diff:.2e}"


def test_sequential_dp_step_is_the_hand_clipped_sum(sim):
    r, client = 1, 0
    start = random_start(sim, 1)
    want, drawn = expected_update(sim, client, r, start)
    assert drawn >= 2
    update = sim.trainer.update(client, r, start, privacy=PrivacySettings(noise_multiplier=0.0, delta=1e-5))
    assert_moved_by(update.payload, start, want, f"client {client}")


def test_joint_dp_step_of_every_client_is_its_hand_clipped_sum(sim):
    r, clients = 1, [0, 1, 2]
    shared = random_start(sim, 0)
    trainable = set(sim.method.trainable_keys(r))
    starts = {c: shared | {k: v for k, v in random_start(sim, 10 + c).items() if k in trainable} for c in clients}
    wants = {c: expected_update(sim, c, r, starts[c]) for c in clients}
    assert sum(drawn for _, drawn in wants.values()) >= 4
    privacy = {c: PrivacySettings(noise_multiplier=0.0, delta=1e-5) for c in clients}
    updates = parallel.train_together(sim.trainer, clients, r, starts, privacy)
    assert updates is not None and sorted(updates) == clients  # trained together, not handed back one by one
    for c in clients:
        assert_moved_by(updates[c].payload, starts[c], wants[c][0], f"client {c}")


def test_one_huge_gradient_moves_the_step_by_at_most_clip_over_expected_batch(sim):
    r, client = 1, 0
    adapted, task = sim.adapted, sim.task
    start = random_start(sim, 2)
    keys = sim.method.trainable_keys(r)
    shard = sim.trainer.shards[client]
    others, outlier = shard[:4], shard[4]
    grads = per_example_gradients(sim, start, keys, [*others, outlier], scale=[1, 1, 1, 1, 1e4])
    assert norm(grads[-1]) > 1e3 * max(norm(g) for g in grads[:-1]) > 1e3 * CLIP

    def step(indices, scale) -> dict:
        """The .grad that DP-SGD leaves, with noise: the same noise draws for both batches."""
        adapted.load_state(start)
        params = adapted.parameters_by_key()
        adapted.set_trainable(keys)
        dp = sim.trainer.dp(client, r, PrivacySettings(noise_multiplier=1.0, delta=1e-5))
        batch = task.batch(indices) | {"scale": torch.tensor(scale)}

        def losses(b):
            return task.example_losses(sim.model, {k: v for k, v in b.items() if k != "scale"}) * b["scale"]
        dp.set_gradients(losses, [batch])
        return {k: params[k].grad.clone() for k in keys}

    without = step(others, [1.0] * 4)
    with_outlier = step(np.append(others, outlier), [1.0] * 4 + [1e4])
    expected = sim.trainer.sample_rate(client) * sim.trainer.plan.client_sizes[client]
    moved = norm({k: with_outlier[k] - without[k] for k in keys})
    assert moved <= CLIP / expected * (1 + 1e-4)
    assert moved >= CLIP / expected * (1 - 1e-3)  # clipped to C, not dropped or shrunk further
