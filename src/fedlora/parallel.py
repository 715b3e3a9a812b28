"""Several clients of a round trained at once, in one forward and backward over their concatenated batches.

The clients share the frozen base model; only their trained tensors differ (FFA-LoRA, FedSVD: B, Fed-SB: R,
FedIT, FedEx-LoRA, FLoRA, FedSA-LoRA: A and B; RoLoRA: the round's factor; all: the task head). Each client
keeps its own copy of those as leaf tensors with its own optimizer; for a forward they are stacked along a
leading client dimension and every example goes through its own client's factors by batched matmuls
(x -> A_k x -> R_k -> B_k), the shared ones (FFA's A, Fed-SB's A and B, RoLoRA's frozen factor) by one plain
matmul. Each client's loss is the mean over its own examples
and the losses are summed, so one backward gives every client the gradient it would get alone. Clipping
(train.max_grad_norm), DP-SGD's per-example clipping and noise, optimizer steps and the accountant's charge
are all per client, with the client's own random streams, so every client ends where training it alone
leaves it (to float rounding). A client with fewer batches than the others stops stepping when they end;
a Poisson draw with no example is a step of noise alone, as in sequential training.

Not offered: full fine-tuning (each client trains its own copy of the base weights: nothing shared to
batch over), heads with parameters outside linear layers, and federation.client_timeout (a wall-clock
deadline belongs to one client, and a joint pass cannot say whose time it spent). With
parallel_clients = "auto" clients train together only where the result is the sequential one, so not
with dropout (the masks of a joint pass come from one random stream instead of one per client).
"""
from __future__ import annotations

import itertools
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .batching import default_part_cost, length_parts, physical_rows
from .client import ClientTrainer, ClientUpdate, take_step
from .lm_task import CausalLMTask
from .plan import PrivacySettings
from .seeding import derive_seed

STACKABLE_HEADS = (nn.Linear,)


class Slots:
    """Which rows of a batch are whose: owners[i] is the client (0 .. count - 1) of row i."""

    def __init__(self, owners: np.ndarray, count: int, device: torch.device):
        owners = np.asarray(owners, dtype=np.int64)
        counts = np.bincount(owners, minlength=count)
        self.count = count
        self.width = max(int(counts.max(initial=0)), 1)
        order = np.argsort(owners, kind="stable")
        rank = np.empty_like(owners)
        rank[order] = np.arange(len(owners)) - (np.cumsum(counts) - counts)[owners[order]]
        index = owners * self.width + rank
        self.even = len(owners) == count * self.width and bool((index == np.arange(len(owners))).all())
        self.owners = torch.from_numpy(owners).to(device)
        self.index = torch.from_numpy(index).to(device)

    def group(self, t: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (K, width, ...), zero rows where a client has fewer than `width`."""
        if not self.even:
            t = t.new_zeros(self.count * self.width, *t.shape[1:]).index_copy(0, self.index, t)
        return t.reshape(self.count, self.width, *t.shape[1:])

    def linear(self, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each row of t (N, ..., d_in) times its own client's weight^T; weights (K, d_out, d_in)."""
        if self.even:
            y = t.reshape(self.count, -1, t.shape[-1]) @ weights.transpose(1, 2)
        else:  # each row's own copy of its weight: no padding to the largest client, no scatter of activations
            rows = weights.index_select(0, self.owners).transpose(1, 2)
            y = torch.bmm(t.reshape(t.shape[0], -1, t.shape[-1]), rows)
        return y.reshape(*t.shape[:-1], weights.shape[1])


class ClientStack:
    """Every client's own trained tensors (leaves, in the model's key order), stacked for each forward;
    while active, the adapted layers and head modules apply each example's own client's tensors."""

    def __init__(self, adapted, keys: list[str], starts: list[dict[str, torch.Tensor]]):
        self.adapted = adapted
        self.keys = keys
        params = adapted.parameters_by_key()
        self.leaves = [{k: s[k].detach().to(params[k].device, params[k].dtype).clone().requires_grad_(True)
                        for k in keys} for s in starts]
        self.layer_names = {id(layer): name for name, layer in adapted.layers.items()}
        self.module_names = {id(adapted.model.get_submodule(k.rpartition(".")[0])): k.rpartition(".")[0]
                             for k in keys if k in adapted.head_params}
        self.slots: Slots | None = None
        self._stacked: dict[str, torch.Tensor] = {}
        self._hooks = []

    def begin_step(self, slots: Slots) -> None:
        self.slots = slots
        self._stacked = {k: torch.stack([leaves[k] for leaves in self.leaves]) for k in self.keys}

    def stacked(self, layer, factor: str) -> torch.Tensor | None:
        return self._stacked.get(f"{self.layer_names[id(layer)]}.{factor}")

    def linear(self, layer, t: torch.Tensor, factor: str) -> torch.Tensor:
        weights = self.stacked(layer, factor)
        if weights is None:
            return nn.functional.linear(t, getattr(layer, factor))
        return self.slots.linear(t, weights)

    def _head(self, module, inputs, output):
        name = self.module_names[id(module)]
        y = self.slots.linear(inputs[0], self._stacked[f"{name}.weight"])
        bias = self._stacked.get(f"{name}.bias")
        if bias is not None:
            y = y + bias[self.slots.owners].reshape(y.shape[0], *([1] * (y.dim() - 2)), -1)
        elif module.bias is not None:
            y = y + module.bias
        return y

    def __enter__(self):
        for layer in self.adapted.layers.values():
            layer.clients = self
        model = self.adapted.model
        self._hooks = [model.get_submodule(name).register_forward_hook(self._head)
                       for name in self.module_names.values()]
        return self

    def __exit__(self, *exc):
        for layer in self.adapted.layers.values():
            layer.clients = None
        for h in self._hooks:
            h.remove()
        self._hooks = []


def train_steps(model: nn.Module, task, stack: ClientStack, optimizers: list[torch.optim.Optimizer],
                draws: list[Iterator[np.ndarray]], max_grad_norm: float | None = None,
                dps: list | None = None, part_cost: int | None = None, max_rows: int | None = None,
                lr_at: Callable[[int], float] | None = None,
                before_steps: list[Callable[[], None] | None] | None = None) -> list[list[float]]:
    """Every client's local training in joint steps: a step takes every client's next batch (its example
    indices), runs them together (in parts of rows of similar length and at most `max_rows` rows, see
    batching.length_parts; gradients summed), and steps each client's own optimizer at the learning rate
    `lr_at(step)`; a client whose draws are over takes no more steps. With `dps` (one DPSGD per client) a
    client's gradient is its clipped per-example sum plus its own noise, an empty draw noise alone;
    `before_steps[k]()` runs on client k's gradients before each of its steps. Returns each client's batch mean
    losses."""
    count = len(optimizers)
    losses: list[list[float]] = [[] for _ in optimizers]
    cost = part_cost or default_part_cost(task.device)
    model.train()
    for step in itertools.count(1):
        chosen = [next(d, None) for d in draws]
        active = [k for k, c in enumerate(chosen) if c is not None]
        if not active:
            return losses
        sizes = np.array([0 if c is None else len(c) for c in chosen])
        owners = np.repeat(np.arange(count), sizes)
        sums: dict[str, torch.Tensor] = {}
        loss_sums = torch.zeros(count, device=task.device)

        def parts():
            for rows, part in length_parts(task.batch(np.concatenate([chosen[k] for k in active])), cost, max_rows):
                stack.begin_step(Slots(owners[rows], count, task.device))
                yield part

        def example_losses(part):
            example = task.example_losses(model, part)
            loss_sums.index_add_(0, stack.slots.owners, example.detach().float())
            return example

        if len(owners) and dps:
            sums, _ = dps[0].recorder.clipped_sums(parts(), example_losses, dps[0].clip_norm, lambda: stack.slots)
        elif len(owners):
            client_rows = torch.as_tensor(sizes, dtype=torch.float32, device=task.device)
            for part in parts():  # each client's mean loss
                (example_losses(part) / client_rows.index_select(0, stack.slots.owners)).sum().backward()
        means = (loss_sums / torch.as_tensor(sizes, device=task.device).clamp(min=1)).tolist()
        for k in range(count):
            if k in active:
                if dps:
                    dps[k].set_noised({key: s[k] for key, s in sums.items()} if sizes[k] else {})
                take_step(optimizers[k], step, lr_at, None if dps else max_grad_norm,
                          before_steps[k] if before_steps else None)
                if sizes[k]:
                    losses[k].append(means[k])
            else:
                optimizers[k].zero_grad(set_to_none=True)


# -- which clients train together ------------------------------------------------------------
def sequential_reason(trainer: ClientTrainer, auto: bool) -> str | None:
    """Why this run's clients cannot train together (None: they can)."""
    adapted = trainer.adapted
    if adapted.parameterisation == "full":
        return "full fine-tuning trains each client's own base weights"
    if trainer.cfg.federation.client_timeout is not None:
        return "federation.client_timeout is a per-client wall-clock deadline"
    for key in adapted.head_params:
        owner, _, param = key.rpartition(".")
        if not isinstance(adapted.model.get_submodule(owner), STACKABLE_HEADS) or param not in ("weight", "bias"):
            return f"the head parameter {key} is not a linear layer's"
    if auto and dropout_active(trainer.model):
        return "dropout draws its masks per client"
    return None


def dropout_active(model: nn.Module) -> bool:
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    settings = config.to_dict() if config is not None else {}
    return any("dropout" in k and isinstance(v, float) and v > 0 for k, v in settings.items())


def clients_that_fit(trainer: ClientTrainer) -> int:
    """How many clients' batches fit in half the free memory (see batching.row_bytes)."""
    cfg = trainer.cfg
    return physical_rows("auto", trainer.model.config, cfg.data.max_length, isinstance(trainer.task, CausalLMTask),
                         trainer.device) // cfg.train.batch_size


def client_groups(trainer: ClientTrainer, clients: list[int]) -> list[list[int]]:
    """The round's clients in consecutive groups trained together (groups of one: one after another)."""
    setting = trainer.cfg.federation.parallel_clients
    size = 1
    if setting != 1 and len(clients) > 1 and sequential_reason(trainer, setting == "auto") is None:
        size = setting if setting != "auto" else clients_that_fit(trainer)
    size = max(1, min(size, len(clients)))
    return [clients[i:i + size] for i in range(0, len(clients), size)]


def train_together(trainer: ClientTrainer, clients: list[int], r: int, starts: dict[int, dict],
                   privacy: dict[int, PrivacySettings] | None = None,
                   clip: float | None = None) -> dict[int, ClientUpdate] | None:
    """Every client's ClientUpdate from one joint training, exactly as ClientTrainer.update would give them
    (`privacy`: each client's DP settings, None without DP; `clip`: client-level DP's bound); None when the joint training failed (the caller
    trains them one by one, so that only a failing client is dropped) or the clients do not share their
    untrained state. A client whose update cannot be made (its upload raises) is left out, and so trained again
    alone."""
    cfg, adapted, task = trainer.cfg, trainer.adapted, trainer.task
    trainable = set(trainer.method.trainable_keys(r))
    keys = [k for k in adapted.parameters_by_key() if k in trainable]
    first = starts[clients[0]]
    shared = {k: v for k, v in first.items() if k not in trainable}
    if any(not torch.equal(starts[c][k], v) for c in clients[1:] for k, v in shared.items()):
        return None
    try:
        adapted.load_state(first)
        adapted.set_trainable([])
        with ClientStack(adapted, keys, [starts[c] for c in clients]) as stack:
            optimizers = [trainer.optimizer(c, list(leaves.values())) for c, leaves in zip(clients, stack.leaves)]
            dps = [trainer.dp(c, r, privacy[c], leaves) for c, leaves in zip(clients, stack.leaves)] if privacy else None
            draws = [trainer.batch_indices(c, r, dps is not None) for c in clients]
            torch.manual_seed(derive_seed(cfg.seed, "client", r, clients[0]))  # dropout, if any
            losses = train_steps(trainer.model, task, stack, optimizers, draws, cfg.train.max_grad_norm, dps,
                                 max_rows=trainer.max_rows, lr_at=trainer.lr_schedule(r),
                                 before_steps=[trainer.method.gradient_step(c, leaves)
                                               for c, leaves in zip(clients, stack.leaves)])
    except Exception as err:  # noqa: BLE001 - retried client by client, where the failure is attributed
        warnings.warn(f"round {r}: clients {clients} are trained again one by one, as training them together "
                      f"raised {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
        return None
    state = adapted.state(shared)
    results = {}
    for c, leaves, step_losses, optimizer in zip(clients, stack.leaves, losses, optimizers):
        try:
            results[c] = trainer.result(c, r, state | {k: v.detach().clone() for k, v in leaves.items()},
                                        step_losses, optimizer, starts[c], clip)
        except Exception:  # noqa: BLE001 - left out: trained again alone, where its failure drops it alone
            pass
    return results
