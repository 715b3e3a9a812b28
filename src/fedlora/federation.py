"""The server side of a federation, whatever runs the clients: the plan every party derives from the config
(client sampling, the set-up's clients, sample rates, the DP noise), and the server core (the method's set-up and
aggregation of what the clients sent, payload checks, privacy accounting, the log, checkpoints, evaluation,
export). It never trains a client: a runtime (the in-process simulator, or Flower) hands it the clients' uploads."""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import checkpoint, run_folder
from .run_folder import ROUNDS_LOG, SUMMARY
from .adapters import AdaptedModel, label_config, write_labels
from .comm import payload_bytes
from .config import Config, differing_keys
from .data import partition
from .data.presets import relabel
from .data.sources import describe_labels
from .errors import ConfigError, FedloraError, RoundFailed
from .experiment import build_task, load_task_data, task_kind
from .init_sb import client_reply
from .methods import METHODS, InitContext
from .models import base_model_reference, pick_device
from .privacy.accounting import PrivacyLedger, calibrate_noise, planned_epsilon
from .seeding import derive_seed, generator, rng
from .tasks import ClassificationTask, Task
from .validation import check_set_up_replies, check_updates

if TYPE_CHECKING:
    from .client import ClientUpdate

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # older versions' pickle: never loaded (unpickling can run code)
CHECKPOINT_KEYS = ("round", "config", "method", "base_weights", "runtime", "totals", "last_eval", "privacy", "rng",
                   "record")

Segment = tuple[float, int, float | None]  # DP-SGD steps: (sample rate, steps, own noise multiplier or None)


def client_shards(cfg: Config, task: Task) -> list[np.ndarray]:
    """Every client's training examples (indices into the task's training split), from the config's partition."""
    d = cfg.data
    return partition(task.train_labels, cfg.federation.num_clients, d.partition,
                     seed=derive_seed(cfg.seed, "partition"), dirichlet_alpha=d.dirichlet_alpha,
                     label_proportions=d.label_proportions, min_client_examples=d.min_client_examples,
                     num_labels=task.num_groups)


class FederationPlan:
    """What the server and every client derive alike from the config and the clients' sizes: which clients
    each round samples, who takes part in the set-up and with how many examples, the DP sample rates, the
    planned DP-SGD steps and so the noise multiplier."""

    def __init__(self, cfg: Config, client_sizes: list[int]):
        self.cfg = cfg
        self.client_sizes = client_sizes
        init_clients = self.sample_clients(0)
        share = cfg.fedsb.init_examples / sum(client_sizes[c] for c in init_clients)
        self.init_examples = {c: max(1, min(client_sizes[c], round(share * client_sizes[c]))) for c in init_clients}

    def sample_clients(self, r: int) -> list[int]:
        fed = self.cfg.federation
        return sorted(int(c) for c in rng(self.cfg.seed, "sample", r).choice(
            fed.num_clients, fed.clients_per_round, replace=False))

    def sample_rate(self, client: int) -> float:
        return min(1.0, self.cfg.train.batch_size / self.client_sizes[client])

    def init_sample_rate(self, client: int) -> float:
        return self.init_examples[client] / self.client_sizes[client]

    def privacy_segments(self, init_releases: int) -> list[list[Segment]]:
        """Every client's planned DP-SGD steps as (sample rate, steps, fixed noise or None) segments;
        `init_releases`: the private releases of each set-up client (Method.init_releases)."""
        plans: list[list[Segment]] = [[] for _ in self.client_sizes]
        if init_releases:
            for c in self.init_examples:
                plans[c].append((self.init_sample_rate(c), int(init_releases), self.cfg.fedsb.init_noise_multiplier))
        rounds = np.zeros(len(self.client_sizes), dtype=int)
        for r in range(1, self.cfg.federation.rounds + 1):
            rounds[self.sample_clients(r)] += 1
        for c, k in enumerate(rounds):
            if k:
                plans[c].append((self.sample_rate(c), int(k) * self.cfg.train.local_steps, None))
        return plans

    def delta(self) -> float:
        return self.cfg.privacy.delta or min(1e-5, 1 / (10 * max(self.client_sizes)))

    def noise_multiplier(self, init_releases: int) -> float:
        """sigma: given, or calibrated so that no client's planned training exceeds privacy.epsilon; a plan
        that a given sigma cannot fit into the target is refused before any training."""
        p = self.cfg.privacy
        plans = self.privacy_segments(init_releases)
        delta = self.delta()
        sigma = p.noise_multiplier if p.noise_multiplier is not None else calibrate_noise(
            p.accountant, p.epsilon, delta, plans)
        if p.epsilon is not None:
            planned = planned_epsilon(p.accountant, sigma, plans, delta)
            if planned > p.epsilon * (1 + 1e-6):
                worst = max(range(len(plans)), key=lambda c: sum(n for _, n, _ in plans[c]))
                steps = ", ".join(f"{n} steps at sample rate {q:.4g}" for q, n, _ in plans[worst])
                raise ConfigError(
                    f"privacy: the planned training spends epsilon {planned:.3f} > privacy.epsilon {p.epsilon} "
                    f"(noise_multiplier {sigma:.3f}, delta {delta:g}; e.g. client {worst}: {steps}); lower "
                    "federation.rounds or train.local_steps, or raise privacy.noise_multiplier")
        return sigma

    def init_noise_multiplier(self, sigma: float) -> float:
        return self.cfg.fedsb.init_noise_multiplier or sigma

    def check_client_privacy(self, client: int, sigma: float, delta: float, init_releases: int) -> None:
        """A client's own check of the noise multiplier and delta a server asks it to train with (on Flower, the
        server calibrates them from every node's size, which no node knows): refused unless this client's own
        planned releases, at its own size, stay within privacy.epsilon at a delta of at most 1 / (10 n)."""
        p, n = self.cfg.privacy, self.client_sizes[client]
        most = p.delta or min(1e-5, 1 / (10 * n))
        if delta > most * (1 + 1e-9):
            raise ConfigError(f"privacy: the server asks client {client} for delta {delta:g}, more than the "
                              f"{most:g} its {n} examples allow")
        if p.epsilon is None:
            if sigma < p.noise_multiplier * (1 - 1e-9):
                raise ConfigError(f"privacy: the server asks client {client} for noise multiplier {sigma:.4g}, "
                                  f"below privacy.noise_multiplier = {p.noise_multiplier:g}")
            return
        spent = planned_epsilon(p.accountant, sigma, [self.privacy_segments(init_releases)[client]], delta)
        if spent > p.epsilon * (1 + 1e-6):
            raise ConfigError(f"privacy: at the server's noise multiplier {sigma:.4g} client {client}'s planned "
                              f"training on its {n} examples would spend epsilon {spent:.3f} > privacy.epsilon "
                              f"{p.epsilon:g}")


def aggregation_error(adapted: AdaptedModel, client_states: list[dict], weights: list[float],
                      global_state: dict, base_change: dict) -> float:
    """sum_l ||sum_i w_i delta_i,l - global delta_l||_F / sum_l ||sum_i w_i delta_i,l||_F, where the global
    delta is the new global adapter's update plus whatever aggregation wrote into W0 this round."""
    err, norm = 0.0, 0.0
    for layer in adapted.layer_names:
        ideal = sum(w * adapted.layer_delta(s, layer) for s, w in zip(client_states, weights))
        actual = adapted.layer_delta(global_state, layer)
        if layer in base_change:
            actual = actual + base_change[layer]
        err += (ideal - actual).norm().item()
        norm += ideal.norm().item()
    return err / norm if norm > 0 else err


class FederationServer:
    """The server core. It holds the method object (the global state and the aggregation rule) and the
    adapted model, which it uses only to evaluate and export the global model (and, for a public-data set-up,
    to take the public gradient)."""

    def __init__(self, cfg: Config, out_dir: str | Path, task: Task, adapted: AdaptedModel, model_source: str,
                 client_sizes: list[int], progress: bool = True):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.task, self.adapted, self.model_source = task, adapted, model_source
        self.model = adapted.model
        self.device = task.device
        self.progress = progress
        self.client_sizes = client_sizes
        self.plan = FederationPlan(cfg, client_sizes)
        self.method = METHODS[cfg.method.name](adapted, cfg, client_sizes)
        self.totals = {"bytes_up": 0, "bytes_down": 0}
        self.last_eval: dict | None = None
        # what the last exchange sent to every client, kept only for a runtime that sends it itself (Flower):
        # FedEx-LoRA's is as large as the adapted weights
        self.keep_broadcast = False
        self.last_broadcast: dict[str, torch.Tensor] = {}
        self.ledger: PrivacyLedger | None = None  # set by setup_privacy when privacy is enabled
        self.logged: dict | None = None  # the last row written to the log (kept in the checkpoint)

    @classmethod
    def from_config(cls, cfg: Config, out_dir: str | Path, progress: bool = True) -> "FederationServer":
        """A server with its own copy of the model (for evaluation and export) and of the data's partition
        (for the clients' sizes)."""
        device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        task, adapted, source = build_task(cfg, device, progress)
        return cls(cfg, out_dir, task, adapted, source, [len(s) for s in client_shards(cfg, task)], progress)

    @property
    def init_examples(self) -> dict[int, int]:
        return self.plan.init_examples

    def sample_clients(self, r: int) -> list[int]:
        return self.plan.sample_clients(r)

    # -- privacy ------------------------------------------------------------------------------
    def setup_privacy(self, saved: dict | None = None) -> None:
        if not self.cfg.privacy.enabled:
            return
        if saved is not None:
            self.ledger = PrivacyLedger.from_state_dict(saved)
        else:
            sigma = self.plan.noise_multiplier(self.method.init_releases())
            self.ledger = PrivacyLedger(self.cfg.privacy.accountant, self.plan.delta(), sigma)

    def charge_init(self, client: int) -> None:
        """Charge one private release of a client in the set-up exchange to its budget."""
        self.ledger.charge(client, self.plan.init_sample_rate(client), 1,
                           self.plan.init_noise_multiplier(self.ledger.noise_multiplier))

    def charge_training(self, client: int) -> None:
        self.ledger.charge(client, self.plan.sample_rate(client), self.cfg.train.local_steps)

    # -- the run folder -----------------------------------------------------------------------
    @contextmanager
    def open_run(self, resume: bool):
        """Hold the run folder (its lock) for the block, which gets the first round still to run."""
        with run_folder.locked(self.out):
            yield self.begin(resume)

    def begin(self, resume: bool) -> int:
        """Prepare the run folder; the first round still to run (0: the set-up exchange). Resuming a run
        that died before its first checkpoint starts it again."""
        run_folder.prepare(self.out)
        if resume and (self.out / CHECKPOINT).exists():
            return self.load_checkpoint() + 1
        legacy = self.out / LEGACY_CHECKPOINT
        if resume and legacy.exists():
            raise FedloraError(f"{legacy}: a checkpoint of an older fedlora, stored as a pickle, which is never "
                               "loaded (loading it could run code); start the run again in another folder")
        if resume:  # killed before its first checkpoint: round 0 runs again
            logged = max((row["round"] for row in run_folder.read_log(self.out / ROUNDS_LOG)), default=0)
            if logged > 0:
                raise FedloraError(f"{self.out / ROUNDS_LOG} logs rounds up to {logged}, but there is no "
                                   f"{CHECKPOINT} to resume from: choose another output folder")
            run_folder.atomic_write(self.out / ROUNDS_LOG, "")
        else:
            self.refuse_existing_run()
        if self.progress and self.label_names is not None:
            print(describe_labels(self.task.data), file=sys.stderr)
        self.setup_privacy(None)
        return 0

    def refuse_existing_run(self, resume_hint: str = "`fedlora run --resume` continues a run of the in-process "
                                                     "simulator") -> None:
        held = [name for name in (ROUNDS_LOG, CHECKPOINT, LEGACY_CHECKPOINT) if (self.out / name).exists()]
        if held:
            raise FedloraError(f"{self.out} already holds a run ({held[0]}): choose another output folder "
                               f"({resume_hint})")

    # -- the set-up exchange ------------------------------------------------------------------
    def initialise(self, send, clients: list[int] | None = None, secure_sum=None) -> dict:
        """Round 0: the method's set-up exchange and the initial evaluation; the round's log record.
        `send(request, clients)` is the runtime's: the clients compute their replies to a methods.Request and
        it returns {client: reply}, or an error message (str) for a client that sent none. Every reply is
        checked like a round's update (validation.check_set_up_replies) and dropped, logged, when it fails;
        the bytes of every request and reply are counted; each new private release is charged.
        `secure_sum(request, clients)`, when the runtime has secure aggregation, serves the method's sums
        instead: it returns the sum of the replies, the clients in it and {client: why} for those left out;
        no reply is seen, so none is checked (the protocol's clipping range bounds each)."""
        t0 = time.time()
        cfg = self.cfg
        traffic = {"up": 0, "down": 0}
        dropped: list[dict] = []
        charged: set[tuple[int, int]] = set()
        private = self.ledger is not None

        def ask(request, asked: list[int]) -> dict:
            traffic["down"] += payload_bytes(request.arrays) * len(asked)
            got = send(request, asked)
            replies = {c: got[c] for c in asked if c in got and not isinstance(got[c], str)}
            for c in asked:
                if c not in replies:
                    dropped.append({"client": c, "reason": f"set-up phase '{request.phase}': "
                                                          f"{got.get(c) or 'sent no reply'}"})
            for reply in replies.values():
                if isinstance(reply, dict):
                    traffic["up"] += payload_bytes(reply)
            charge(list(replies), request.release)
            reasons = check_set_up_replies(
                cfg, request, list(replies.values()), [self.init_examples[c] for c in replies],
                self.plan.init_noise_multiplier(self.ledger.noise_multiplier) if private else None,
                [self.client_sizes[c] for c in replies])
            for c, why in zip(list(replies), reasons):
                if why is not None:
                    dropped.append({"client": c, "reason": f"set-up phase '{request.phase}': {why}"})
                    del replies[c]
            return replies

        def charge(clients: list[int], release: int) -> None:
            for c in clients:
                if private and (c, release) not in charged:  # released, whatever its checks say
                    charged.add((c, release))
                    self.charge_init(c)

        def ask_secure_sum(request, asked: list[int]) -> tuple[dict, list[int]]:
            traffic["down"] += payload_bytes(request.arrays) * len(asked)
            total, summed, left_out = secure_sum(request, asked)
            dropped.extend({"client": c, "reason": f"set-up phase '{request.phase}': {why}"}
                           for c, why in left_out.items())
            traffic["up"] += payload_bytes(total) * len(summed)
            charge(summed, request.release)
            return total, summed

        ctx = InitContext(sorted(self.init_examples) if clients is None else clients, generator(cfg.seed, "init"),
                          ask=ask, ask_sum=ask_secure_sum if secure_sum is not None else None,
                          ask_public=self.public_reply)
        try:
            exchange = self.method.initialise(ctx)
        except RoundFailed:
            self.log_failed_round(0, ctx.clients, [dropped], t0)
            raise
        self.last_broadcast = exchange.broadcast if self.keep_broadcast else {}
        bytes_down = traffic["down"] + payload_bytes(exchange.broadcast) * cfg.federation.num_clients
        record = self.record(0, exchange.clients, None, traffic["up"], bytes_down, 0.0, self.maybe_evaluate(0), t0)
        record["dropped"] = dropped
        return record

    def public_reply(self, request) -> dict[str, torch.Tensor]:
        """A set-up reply computed by the server on fedsb.public_data's init examples (nothing is sent)."""
        cfg = self.cfg
        public_data = load_task_data(cfg.fedsb.public_data, task_kind(cfg.data, cfg.model.name))
        public = public_data.train
        if isinstance(self.task, ClassificationTask):  # its labels as the task's class ids
            public = relabel(public, public_data.label_names, self.task.data.label_names)
        chosen = rng(cfg.seed, "public").permutation(len(public))[:cfg.fedsb.init_examples]
        torch.manual_seed(derive_seed(cfg.seed, "public"))
        size = cfg.train.batch_size
        batches = (self.task.batch(chosen[i:i + size], public) for i in range(0, len(chosen), size))
        return client_reply(self.adapted, request, batches, lambda batch: self.task.example_losses(self.model, batch))

    # -- a round ------------------------------------------------------------------------------
    def reference(self, client: int, r: int) -> dict[str, torch.Tensor]:
        """What the client would upload untrained in round r: an update is checked against it."""
        method = self.method
        sent = method.cut(method.upload_of(method.client_state(client, r), r), client)
        return {k: v.detach().clone() for k, v in sent.items()}

    def check_updates(self, payloads: list, references: list[dict[str, torch.Tensor]]) -> list[str | None]:
        """Why each upload of a round cannot be aggregated, or None (server.max_update_norm)."""
        return check_updates(self.cfg, payloads, references)

    def aggregate_round(self, r: int, accepted: list[tuple[int, "ClientUpdate"]], dropped: list[dict],
                        bytes_down: int, t0: float, retries: int = 0) -> dict:
        """Aggregate the accepted updates of round r with the method's rule; the round's log record."""
        fed, method = self.cfg.federation, self.method
        answered = [c for c, _ in accepted]
        updates = [u for _, u in accepted]
        sizes = [self.client_sizes[c] for c in answered]
        weights = ([n / sum(sizes) for n in sizes] if fed.weighting == "examples"
                   else [1 / len(answered)] * len(answered))
        payloads = [u.payload for u in updates]
        aggregate = method.aggregate(payloads, weights, answered, r)
        self.last_broadcast = aggregate.broadcast if self.keep_broadcast else {}
        bytes_up = sum(payload_bytes(p) for p in payloads)
        bytes_down += payload_bytes(aggregate.broadcast) * fed.num_clients
        agg_error = aggregation_error(self.adapted, [u.trained for u in updates], weights, method.eval_state(),
                                      aggregate.base_change)
        seen = [(w, u.loss) for w, u in zip(weights, updates) if u.loss == u.loss]  # DP may draw only empty batches
        train_loss = sum(w * l for w, l in seen) / sum(w for w, _ in seen) if seen else None
        if self.ledger is not None:
            train_loss = None  # computed on raw client data: not released under DP
        record = self.record(r, answered, train_loss, bytes_up, bytes_down, agg_error, self.maybe_evaluate(r), t0)
        record["dropped"] = [{"client": d["client"], "reason": d["reason"]} for d in dropped]
        if retries:
            record["retries"] = retries
        return record

    def log_failed_round(self, r: int, clients: list[int], attempts: list[list[dict]], t0: float) -> None:
        self.log({"round": r, "failed": True, "clients": clients, "attempts": attempts,
                  "seconds": round(time.time() - t0, 3)})

    # -- evaluation and the log ---------------------------------------------------------------
    def evaluate(self) -> dict:
        self.adapted.load_state(self.method.eval_state())
        e = self.cfg.eval
        return self.task.evaluate(self.model, e.batch_size, e.max_examples)

    def maybe_evaluate(self, r: int) -> dict | None:
        every = self.cfg.eval.every
        if (every and r % every == 0) or r == self.cfg.federation.rounds:
            self.last_eval = self.evaluate()
            return self.last_eval
        return None

    def record(self, r, clients, train_loss, bytes_up, bytes_down, agg_error, evaluation, t0) -> dict:
        self.totals["bytes_up"] += bytes_up
        self.totals["bytes_down"] += bytes_down
        return {"round": r, "clients": clients, "train_loss": train_loss, "eval": evaluation,
                "bytes_up": bytes_up, "bytes_down": bytes_down, "agg_error": agg_error,
                "epsilon": None if self.ledger is None else self.ledger.max_epsilon(),
                "seconds": round(time.time() - t0, 3)}

    def log(self, record: dict) -> None:
        run_folder.append_line(self.out / ROUNDS_LOG, record)
        self.logged = record

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, r: int, runtime_state: dict | None = None) -> None:
        """The server's state after round r, and `runtime_state`: what the runtime keeps for its clients."""
        state = {
            "round": r,
            "config": self.cfg.to_dict(),
            "method": self.method.state_dict(),
            "base_weights": self.adapted.base_weights() if self.method.changes_base else None,
            "runtime": runtime_state or {},
            "totals": self.totals,
            "last_eval": self.last_eval,
            "privacy": None if self.ledger is None else self.ledger.state_dict(),
            "rng": checkpoint.rng_state(),
            # the round's log row, to repair a log torn by a crash
            "record": self.logged if self.logged is not None and self.logged.get("round") == r else None,
        }
        checkpoint.save(state, self.out / CHECKPOINT)

    def load_checkpoint(self) -> int:
        """Restore the state of the last checkpoint; its round. The runtime's part is in self.runtime_state."""
        path = self.out / CHECKPOINT
        state = checkpoint.load(path, self.device)
        checkpoint.require(state, CHECKPOINT_KEYS, path)
        saved, now = dict(state["config"]), self.cfg.to_dict()
        for cfg_dict in (saved, now):
            cfg_dict["federation"] = {k: v for k, v in cfg_dict["federation"].items() if k != "rounds"}
        if saved != now:
            key = differing_keys(saved, now)[0]
            raise FedloraError(f"{path} was written by a different config (key '{key}' differs); "
                               "resume with the same config or choose another --out")
        r, rounds = state["round"], self.cfg.federation.rounds
        if r > rounds:
            raise ConfigError(f"federation.rounds = {rounds} is below the {r} rounds {path} has finished: resume "
                              f"with federation.rounds >= {r}")
        self.setup_privacy(state["privacy"])
        self.method.load_state_dict(state["method"])
        if state["base_weights"] is not None:
            self.adapted.load_base_weights(state["base_weights"])
        self.runtime_state = state["runtime"]
        self.totals = state["totals"]
        self.last_eval = state["last_eval"]
        checkpoint.set_rng_state(state["rng"])
        # rows logged after the checkpoint, or torn by the crash, go; the checkpoint's round's row is its own
        run_folder.repair_log(self.out / ROUNDS_LOG, r, state["record"])
        self.logged = state["record"]
        return r

    # -- the end ------------------------------------------------------------------------------
    def finish(self, started: float) -> dict:
        """Export the final global model and write summary.json."""
        if self.last_eval is None:
            self.last_eval = self.evaluate()
        try:
            self.export()
        except OSError as err:
            raise run_folder.write_error(Path(err.filename or self.out), err) from None
        summary = {
            "method": self.cfg.method.name,
            "rounds": self.cfg.federation.rounds,
            "final_eval": self.last_eval,
            "bytes_up_total": self.totals["bytes_up"],
            "bytes_down_total": self.totals["bytes_down"],
            "client_sizes": self.client_sizes,
            "model_source": self.model_source,
            "labels": self.label_names,
            "baselines": (self.task.baselines(self.cfg.eval.max_examples)
                          if isinstance(self.task, ClassificationTask) else None),
            "privacy": None if self.ledger is None else {
                "noise_multiplier": self.ledger.noise_multiplier, "delta": self.ledger.delta,
                "accountant": self.ledger.kind, "epsilon_max": self.ledger.max_epsilon(),
                "epsilon_per_client": {c: self.ledger.epsilon(c) for c in sorted(self.ledger.history)}},
            "seconds_this_session": round(time.time() - started, 2),
            "config": self.cfg.to_dict(),
        }
        run_folder.atomic_write(self.out / SUMMARY, json.dumps(summary, indent=2))
        return summary

    @property
    def label_names(self) -> list[str] | None:
        """A classifier's class names (id -> name); None for a language model."""
        return self.task.data.label_names if isinstance(self.task, ClassificationTask) else None

    def export(self) -> None:
        state = self.method.eval_state()
        self.adapted.load_state(state)
        tokenizer = self.task.tokenizer
        names = self.label_names
        if names is not None:
            write_labels(self.out, names)
            self.model.config.update(label_config(names))  # a saved model folder carries the class names
        if self.adapted.parameterisation == "full":
            self.model.save_pretrained(self.out / "model")
            tokenizer.save_pretrained(self.out / "model")
            return
        cfg = self.cfg
        base = base_model_reference(cfg.model.name, cfg.model.path, self.model_source)
        if self.method.changes_base:  # W0 itself was trained: ship it beside the adapter
            base_dir = self.out / "base_model"
            self.model.save_pretrained(base_dir, state_dict=self.adapted.base_model_state_dict())
            tokenizer.save_pretrained(base_dir)
            base = str(base_dir.resolve())
        self.adapted.export_peft(self.out / "adapter", state, base_model=base, task_type=self.task.task_type,
                                 label_names=names)
