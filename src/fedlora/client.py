"""The client side of a federation: local training of one client (a plain loop over its batches, optionally
DP-SGD), and ClientTrainer, which trains any of the clients whose shards it holds on one shared model. The
in-process simulator holds every client's shard; a Flower ClientApp holds its own."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Callable, Iterable

import numpy as np
import torch

from .adapters import AdaptedModel
from .batching import physical_rows
from .config import Config, TrainConfig
from .errors import ClientTimeout, FedloraError
from .init_sb import PrivateRelease, client_reply, private_gradient_sum, reply_from_gradients
from .methods.base import Method, State
from .plan import FederationPlan, PrivacySettings
from .privacy.client_level import clip_update
from .privacy.distributed import client_parts
from .privacy.dpsgd import DPSGD
from .privacy.grad_sample import PerExampleGradients, for_trainable
from .privacy.randomness import noise_generator, sampling_rng
from .seeding import derive_seed, rng
from .tasks import Task


@dataclass
class ClientUpdate:
    payload: dict[str, torch.Tensor]  # what the client sends
    loss: float
    optimizer_state: dict | None = None  # kept on the client across rounds with train.keep_optimizer_state
    within_clip: bool | None = None  # under client-level DP: the change was within the bound before clipping
    message: torch.Tensor | None = None  # under distributed DP: what enters the secure sum, in place of the payload


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def scheduled_lr(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate of step `step` (1-based) of the run's `total` local steps: a linear warmup over
    train.warmup_steps, then train.lr_schedule (linear or cosine decay towards 0 after the last step)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps - 1) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (1 - progress if cfg.lr_schedule == "linear" else (1 + math.cos(math.pi * progress)) / 2)


def take_step(optimizer: torch.optim.Optimizer, step: int, lr_at: Callable[[int], float] | None = None,
              max_grad_norm: float | None = None, before_step: Callable[[], None] | None = None) -> None:
    """One optimizer step on the gradients in .grad: the learning rate of local step `step` (1-based), the
    gradient clipped to max_grad_norm (None: not clipped), `before_step()` (Method.gradient_step), the step."""
    if lr_at is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                       max_grad_norm)
    if before_step is not None:
        before_step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def local_train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[list[dict] | None],
                example_losses: Callable[[dict], torch.Tensor], max_grad_norm: float | None = None,
                dp: DPSGD | None = None, deadline: float | None = None,
                lr_at: Callable[[int], float] | None = None,
                before_step: Callable[[], None] | None = None) -> list[float]:
    """One optimizer step per batch, a batch given as its micro-batches (their gradients summed: the whole
    batch's mean-loss gradient); returns the mean loss of every non-empty batch. With `dp`, gradients are
    DP-SGD's (a None batch, an empty Poisson draw, is a step of noise alone). `lr_at(step)`: the learning rate
    of local step `step` (1-based); `before_step()` runs on the gradients before every step (Method.gradient_step).
    Past `deadline` (a time.monotonic() value, checked after every step) it raises ClientTimeout."""
    model.train()
    losses = []
    for step, parts in enumerate(batches, 1):
        if dp is not None:
            loss = dp.set_gradients(example_losses, parts)
        else:
            rows, loss = sum(len(part["attention_mask"]) for part in parts), 0.0
            for part in parts:
                part_losses = example_losses(part)
                (part_losses.sum() / rows).backward()
                loss += part_losses.detach().sum().item() / rows
        take_step(optimizer, step, lr_at, None if dp is not None else max_grad_norm, before_step)
        if loss is not None:
            losses.append(loss)
        if deadline is not None and time.monotonic() > deadline:
            raise ClientTimeout(f"still training after {step} steps at federation.client_timeout")
    return losses


class ClientTrainer:
    """Trains clients on one shared model: each client's update starts from the state the method gives it
    (with what the client keeps for itself, `own_states`), on its own shard, with its own optimizer (kept
    across rounds with train.keep_optimizer_state), DP-SGD noise and batch draws. `shards[c]`: client c's
    training examples. The privacy settings of a client's work come with each call (None: no DP)."""

    def __init__(self, cfg: Config, task: Task, adapted: AdaptedModel, method: Method, plan: FederationPlan,
                 shards: Sequence[np.ndarray]):
        self.cfg, self.task, self.adapted, self.method, self.plan = cfg, task, adapted, method, plan
        self.model = adapted.model
        self.device = task.device
        self.shards = shards
        self.max_rows = physical_rows(cfg.train.physical_batch_size, self.model.config, cfg.data.max_length,
                                      task.task_type == "CAUSAL_LM", self.device)
        self.optimizer_states: dict[int, dict] = {}
        self.own_states: dict[int, State] = {}  # what each client keeps and never sends (Method.own_part)
        self.releases: dict[tuple[int, int], dict | None] = {}  # (client, index): the set-up releases made
        self.recorders: dict[tuple[str, ...], PerExampleGradients] = {}  # per set of trained keys (RoLoRA alternates)

    def recorder(self, keys: list[str]) -> PerExampleGradients:
        """The per-example gradient recorder of these trained keys (made once per set of keys)."""
        if tuple(keys) not in self.recorders:
            self.recorders[tuple(keys)] = for_trainable(self.adapted, keys, self.cfg.privacy.grad_norm)
        return self.recorders[tuple(keys)]

    def losses(self, batch: dict) -> torch.Tensor:
        return self.task.example_losses(self.model, batch)

    def sample_rate(self, client: int) -> float:
        return self.plan.sample_rate(client)

    def start(self, client: int, r: int) -> State:
        """The state the client trains from in round r: the global state it holds and what it keeps itself."""
        return self.method.client_state(client, r, self.own_states.get(client, {}))

    def dp(self, client: int, r: int, privacy: PrivacySettings | None, params: dict | None = None) -> DPSGD | None:
        """The client's DP-SGD for round r over `params` (default: the model's trainable parameters)."""
        if privacy is None:
            return None
        params = params or self.adapted.parameters_by_key()
        noise = noise_generator(self.cfg, "noise", r, client, device=self.device)
        keys = self.method.trainable_keys(r)
        return DPSGD(self.recorder(keys), {k: params[k] for k in keys}, self.cfg.privacy.clip_norm,
                     privacy.noise_multiplier, self.sample_rate(client) * self.plan.client_sizes[client], noise)

    def draws(self, client: int, r: int, private: bool) -> np.random.Generator:
        """The generator of the client's batch draws in round r: under DP its Poisson draws
        (privacy.randomness), else shuffles from the seed."""
        if not private:
            return rng(self.cfg.seed, "client", r, client)
        return sampling_rng(self.cfg, "client", r, client)

    def batch_indices(self, client: int, r: int, private: bool):
        """The examples of each of the client's local steps in round r (Poisson draws under DP)."""
        t = self.cfg.train
        return self.task.client_batch_indices(self.shards[client], t.batch_size, t.local_steps,
                                              self.draws(client, r, private),
                                              sample_rate=self.sample_rate(client) if private else None)

    def lr_schedule(self, r: int) -> Callable[[int], float]:
        """The learning rate of each local step of round r: train.lr_schedule over the run's steps, counted
        across rounds (so a resumed run steps as an uninterrupted one)."""
        steps = self.cfg.train.local_steps
        return lambda t: scheduled_lr(self.cfg.train, (r - 1) * steps + t, self.cfg.federation.rounds * steps)

    def optimizer(self, client: int, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        optimizer = make_optimizer(params, self.cfg.train)
        if self.cfg.train.keep_optimizer_state and client in self.optimizer_states:
            # a copy: loading aliases the saved tensors, and an attempt that fails must leave them as they were
            optimizer.load_state_dict(copy.deepcopy(self.optimizer_states[client]))
        return optimizer

    def update(self, client: int, r: int, start: State, deadline: float | None = None,
               privacy: PrivacySettings | None = None, clip: float | None = None) -> ClientUpdate:
        """The client's local training of round r from `start`: what it sends back, and what it keeps. `clip`:
        under client-level DP, the bound on the L2 norm of the upload's change from `start`'s."""
        cfg, adapted = self.cfg, self.adapted
        adapted.load_state(start)
        optimizer = self.optimizer(client, adapted.set_trainable(self.method.trainable_keys(r)))
        torch.manual_seed(derive_seed(cfg.seed, "client", r, client))  # dropout
        dp = self.dp(client, r, privacy)
        batches = (self.task.micro_batches(chosen, self.max_rows) if len(chosen) else None
                   for chosen in self.batch_indices(client, r, dp is not None))
        before_step = self.method.gradient_step(client, adapted.parameters_by_key())
        step_losses = local_train(self.model, optimizer, batches, self.losses, cfg.train.max_grad_norm, dp, deadline,
                                  self.lr_schedule(r), before_step)
        return self.result(client, r, adapted.state(), step_losses, optimizer, start, clip)

    def result(self, client: int, r: int, trained: State, step_losses: list[float],
               optimizer: torch.optim.Optimizer, start: State | None = None, clip: float | None = None) -> ClientUpdate:
        """The update of a client's training, which keeps its own part (whatever the server does with the
        upload, which it cannot know); with `clip`, its change from `start` clipped to that L2 norm."""
        payload, within = self.method.upload(client, trained, r), None
        if clip is not None:
            payload, norm = clip_update(payload, self.method.upload(client, start, r), clip)
            within = norm <= clip
        update = ClientUpdate(payload=payload, loss=float(np.mean(step_losses)) if step_losses else float("nan"),
                              optimizer_state=optimizer.state_dict() if self.cfg.train.keep_optimizer_state else None,
                              within_clip=within)
        own = self.method.own_part(trained)
        if own:
            self.own_states[client] = own
        return update

    def seal(self, client: int, r: int, update: ClientUpdate, start: State, plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Under distributed DP (privacy.distributed): replace the update's payload with the client's message, its
        change from `start` clipped, rotated, rounded and noised with the client's secret randomness; returns
        the message's two parts, the clean integers and the noise share, which only the client knows."""
        clean, noise = client_parts(self.cfg, plan, update.payload, self.method.upload(client, start, r), r, client)
        update.message = torch.remainder(clean + noise, plan.modulus)
        update.payload = {}
        return clean, noise

    def keep(self, client: int, update: ClientUpdate) -> None:
        """What the client keeps of an update the server accepted."""
        if update.optimizer_state is not None:
            self.optimizer_states[client] = update.optimizer_state

    def set_up_reply(self, client: int, request, privacy: PrivacySettings | None = None) -> dict[str, torch.Tensor]:
        """The client's reply to one phase of the method's set-up exchange (a methods.Request), computed over
        its set-up examples. Under DP the examples are a Poisson draw at the same expected size and the reply
        is one private release (init_sb.client_reply); a phase that reuses a release it made before (Fed-SB's
        sign sketch) sends from the release it kept, never from a new draw."""
        cfg, shard = self.cfg, self.shards[client]
        torch.manual_seed(derive_seed(cfg.seed, "init", client))  # dropout
        if privacy is None:
            chosen = rng(cfg.seed, "init", client).permutation(shard)[:self.plan.init_examples[client]]
            return client_reply(self.adapted, request, self._batches(chosen), self.losses)
        release = (client, request.release)
        if request.phase != "project":  # a first phase: a set-up exchange starts
            self.releases = {k: v for k, v in self.releases.items() if k[0] != client}
        if request.signs and self.releases.get(release) is not None:  # the last use of the kept release
            kept, self.releases[release] = self.releases[release], None
            return reply_from_gradients(self.adapted, kept, request)
        if release in self.releases:
            raise FedloraError(f"client {client}: set-up release {request.release} was already made")
        if request.signs and request.phase == "project":  # must sketch the release of the first phase
            raise FedloraError(f"client {client}: kept no set-up release to sketch (its process restarted?)")
        parts = (0, client) + ((request.release,) if request.release else ())
        draw = sampling_rng(cfg, "init", *parts[1:])
        chosen = shard[draw.random(len(shard)) < self.plan.init_sample_rate(client, privacy.init_examples)]
        private = PrivateRelease(cfg.privacy.clip_norm, self.plan.init_noise_multiplier(privacy.noise_multiplier),
                                 noise_generator(cfg, "noise", *parts, device=self.device), cfg.privacy.grad_norm)
        if request.signs:  # the signs of one dense release, sketched in every phase
            self.releases[release] = private_gradient_sum(self.adapted, self._batches(chosen), self.losses,
                                                          private.clip_norm, private.noise_multiplier,
                                                          private.generator, private.path)
            return reply_from_gradients(self.adapted, self.releases[release], request)
        self.releases[release] = None
        return client_reply(self.adapted, request, self._batches(chosen), self.losses, private)

    def _batches(self, indices: np.ndarray):
        size = self.cfg.train.batch_size
        for i in range(0, len(indices), size):
            yield self.task.batch(indices[i:i + size])
