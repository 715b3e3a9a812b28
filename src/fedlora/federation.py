"""The server core of a federation, whatever runs the clients: the method's set-up exchange, the closing of
every round (privacy accounting, the checks of the uploads, the minimum of clients, the weights, the method's
aggregation, the round's record), evaluation, the checkpoint's server state and the summary. It never trains
or reaches a client: a runtime (the in-process simulator, or Flower) carries the messages and hands it what
came back. The run folder's files are run_folder.RunFolder's; the exported model is export.py's."""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .adapters import AdaptedModel
from .client import ClientUpdate
from .comm import payload_bytes
from .config import Config, differing_keys, with_defaults
from .data import fingerprint
from .data.sources import describe_labels
from .errors import ConfigError, FedloraError, RoundFailed
from .experiment import build_task
from .export import export_model
from .methods import check_method
from .methods.base import State
from .models import pick_device
from .plan import FederationPlan, PrivacySettings, client_shards, shard_sizes
from .privacy.accounting import PrivacyLedger
from .privacy.client_level import ClientLevelDP, sum_clipped
from .privacy.distributed import DistributedDP, update_dimension
from .files import write_error
from .run_folder import SUMMARY, RunFolder
from .tasks import ClassificationTask, Task
from .set_up import SetUpExchange
from .validation import check_updates, upload_problems

CHECKPOINT_KEYS = ("round", "config", "method", "base_weights", "runtime", "totals", "last_eval", "privacy", "rng",
                   "record")
RESUME_HINT = "`fedlora run --resume` continues a run of the in-process simulator"


@dataclass
class Outcome:
    """What transport brought back from one client of a round: its update, or why it has none. `released`: it
    trained to the end (under DP a private release, charged whatever becomes of the update)."""
    client: int
    update: ClientUpdate | None = None
    reason: str | None = None
    released: bool = False


def evaluate_model(task: Task, adapted: AdaptedModel, state: State, eval_cfg) -> dict:
    """The model `state` (adapters and head, over the model's W0 as it is) on `task`'s evaluation data: its
    metrics and "examples", the number evaluated. The one evaluation routine of every party: the server on
    its evaluation file, and each client on its own (the simulator's and a Flower node's alike)."""
    adapted.load_state(state)
    metrics = task.evaluate(adapted.model, eval_cfg.batch_size, eval_cfg.max_examples)
    return metrics | {"examples": len(task.eval_indices(eval_cfg.max_examples))}


def client_model(method, own: State | None, global_state: State | None = None) -> State:
    """The model a client uses, which it evaluates: the global model (`global_state`, default the method's
    eval_state) with what the client keeps of its own over it (FedSA-LoRA's personalised B)."""
    return (method.eval_state() if global_state is None else global_state) | (own or {})


def federated_evaluation(results: dict[int, dict | str]) -> dict | None:
    """The clients' evaluations of a round ({client: metrics with "examples", or why it has none}): each
    client's metrics, their mean weighted by the examples each evaluated (Flower's convention for evaluate
    replies), and the clients that failed. None when no client evaluated or failed."""
    done = {c: m for c, m in sorted(results.items()) if isinstance(m, dict)}
    failed = {str(c): why for c, why in sorted(results.items()) if isinstance(why, str)}
    if not done and not failed:
        return None
    total = sum(m["examples"] for m in done.values())
    keys = sorted({k for m in done.values() for k in m if k != "examples"})
    mean = {k: sum(m[k] * m["examples"] for m in done.values() if k in m) / total for k in keys} if total else {}
    return {"clients": {str(c): m for c, m in done.items()}, "mean": mean | {"examples": total}, "failed": failed}


class RetryRound(FedloraError):
    """Too few clients answered and the round may run again (federation.on_too_few_clients = 'retry')."""


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
                 client_sizes: Sequence[int], progress: bool = True, shards: Sequence | None = None):
        """`shards`: the clients' training rows (plan.client_shards), fingerprinted for the checkpoint."""
        self.cfg = cfg
        self.run = RunFolder(out_dir)
        self.out = self.run.out
        self.task, self.adapted, self.model_source = task, adapted, model_source
        self.model = adapted.model
        self.device = task.device
        self.progress = progress
        self.client_sizes = client_sizes
        self.shards = shards
        self._fingerprint: dict | None = None
        method_class = check_method(cfg)
        self.warnings = method_class.ignored_settings(cfg)  # shown at the start and kept in summary.json
        self.plan = FederationPlan(cfg, client_sizes)
        self.method = method_class(adapted, cfg, client_sizes)
        self.totals = {"bytes_up": 0, "bytes_down": 0}
        self.last_eval: dict | None = None
        self.last_client_eval: dict | None = None
        # the runtime's federated evaluation: (round, broadcast) -> {client: metrics, or why none}; the broadcast
        # is what every client applies after the round's aggregation, before it evaluates
        self.client_evaluator = None
        self.ledger: PrivacyLedger | None = None  # set by setup_privacy under example-level DP
        self.client_dp: ClientLevelDP | None = None  # set by setup_privacy under client-level DP
        self.runtime_state: dict = {}  # what the runtime kept for its clients, from a resumed checkpoint

    @classmethod
    def from_config(cls, cfg: Config, out_dir: str | Path, progress: bool = True) -> "FederationServer":
        """A server with its own copy of the model (for evaluation and export) and of the data's partition
        (for the clients' sizes)."""
        device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        task, adapted, source = build_task(cfg, device, progress)
        shards = client_shards(cfg, task)
        return cls(cfg, out_dir, task, adapted, source, shard_sizes(shards), progress, shards)

    def set_client_sizes(self, sizes: list[int]) -> None:
        """The clients' sizes as the runtime learned them (a Flower node with its own data reports its own):
        the weights, the plan and the privacy calibration follow them. Before the run starts."""
        self.client_sizes = self.method.client_sizes = list(sizes)
        self.plan = FederationPlan(self.cfg, self.client_sizes)
        self._fingerprint = None

    @property
    def init_examples(self) -> dict[int, int]:
        return self.plan.init_examples

    def sample_clients(self, r: int) -> list[int]:
        """Round r's clients: under client-level DP a Poisson draw from the server's own randomness, else the
        plan's draw of federation.clients_per_round from the seed."""
        return self.client_dp.cohort(r) if self.client_dp is not None else self.plan.sample_clients(r)

    def client_weight(self, client: int) -> int:
        """A client's unnormalised weight in the average: its examples, or 1 (federation.weighting; 'auto' weighs
        by examples except under client-level DP, whose bound on a client's influence needs equal weights)."""
        weighting = self.cfg.federation.weighting
        if weighting == "uniform" or (weighting == "auto" and self.cfg.privacy.per_client):
            return 1
        return self.client_sizes[client]

    def weights(self, clients: list[int]) -> list[float]:
        raw = [self.client_weight(c) for c in clients]
        return [w / sum(raw) for w in raw]

    # -- privacy ------------------------------------------------------------------------------
    def setup_privacy(self, saved: dict | None = None) -> None:
        if not self.cfg.privacy.enabled:
            return
        if self.cfg.privacy.per_client:
            self.client_dp = (DistributedDP(self.cfg, update_dimension(self.method), self.device) if self.distributed
                              else ClientLevelDP(self.cfg, self.device))
            if saved is not None:
                self.client_dp.load_state_dict(saved)
            return
        if saved is not None:
            self.ledger = PrivacyLedger.from_state_dict(saved)
        else:
            self.ledger = PrivacyLedger(self.cfg.privacy.accountant, self.plan.delta(), self.plan.noise_multiplier())

    @property
    def distributed(self) -> bool:
        return self.cfg.privacy.distributed

    def privacy_for(self, client: int) -> PrivacySettings | None:
        """What a client trains with under DP (None without DP): the server's noise multiplier and delta, and its
        set-up examples."""
        if self.ledger is None:
            return None
        return self.plan.privacy(client, self.ledger.noise_multiplier, self.ledger.delta)

    def update_clip(self) -> float | None:
        """Under client-level DP the bound S every client clips its update to this round; else None."""
        return self.client_dp.clip if self.client_dp is not None else None

    def epsilon_spent(self) -> float | None:
        if self.client_dp is not None:
            return self.client_dp.epsilon()
        return None if self.ledger is None else self.ledger.max_epsilon()

    def charge_init(self, client: int) -> None:
        """Charge one private release of a client in the set-up exchange to its budget."""
        self.ledger.charge(client, self.plan.init_sample_rate(client), 1,
                           self.plan.init_noise_multiplier(self.ledger.noise_multiplier))

    def charge_training(self, client: int) -> None:
        self.ledger.charge(client, self.plan.sample_rate(client), self.cfg.train.local_steps)

    # -- the run folder -----------------------------------------------------------------------
    @contextmanager
    def open_run(self, resume: bool, resume_hint: str = RESUME_HINT):
        """Hold the run folder (its lock) for the block, which gets the first round still to run."""
        with self.run.held():
            yield self.begin(resume, resume_hint)

    def begin(self, resume: bool, resume_hint: str = RESUME_HINT) -> int:
        """Start or resume the run in its folder (held by the caller); the first round still to run (0: the
        set-up exchange)."""
        for warning in self.warnings if self.progress else []:
            print(f"warning: {warning}", file=sys.stderr)
        if self.run.start(resume, resume_hint):
            return self.load_checkpoint() + 1
        if self.progress and self.label_names is not None:
            print(describe_labels(self.task.data), file=sys.stderr)
        self.setup_privacy(None)
        return 0

    def refuse_existing_run(self, resume_hint: str = RESUME_HINT) -> None:
        self.run.refuse_existing_run(resume_hint)

    def initialise(self, send, secure_sum=None) -> tuple[dict, State]:
        """Round 0: the method's set-up exchange (set_up.SetUpExchange, carried by the runtime's `send` or
        `secure_sum`) and the initial evaluation, logged; the round's record and what every client receives."""
        return SetUpExchange(self, send, secure_sum).run()

    # -- a round ------------------------------------------------------------------------------
    def reference(self, client: int, r: int) -> dict[str, torch.Tensor]:
        """What the client would upload untrained in round r: an update is checked against it."""
        method = self.method
        sent = method.cut(method.upload_of(method.client_state(client, r), r), client)
        return {k: v.detach().clone() for k, v in sent.items()}

    def close_round(self, r: int, clients: list[int], outcomes: list[Outcome], bytes_down: int, t0: float, *,
                    secure_mean: State | None = None, distributed_sum: torch.Tensor | None = None,
                    attempts: list[list[dict]] | None = None, may_retry: bool = False) -> tuple[dict, State]:
        """Round r once transport is done, the same in every runtime: charge every client that released, check
        the uploads together (the size rule compares each with their median), drop the failing ones, enforce
        federation.min_clients, weight, aggregate with the method's rule, record and log the round. Returns the
        round's record and what every client receives after aggregation (the method's broadcast).
        `secure_mean`: under secure aggregation, the weighted mean of the uploads of the clients whose outcome
        has no reason (no upload is seen, so none is checked: the protocol's clipping range bounds each).
        `distributed_sum`: under distributed DP, the secure sum (mod 2^bits) of the messages of the clients whose
        outcome has no reason (None: none was summed); each message is clipped and bounded by the mechanism.
        Too few clients: with `may_retry` (and no private release a retry would charge again beyond
        privacy.epsilon) RetryRound, with the attempt added to `attempts`; else the failed round is logged and
        RoundFailed raised."""
        if self.ledger is not None:
            for o in outcomes:
                if o.released:
                    self.charge_training(o.client)
        dropped = [{"client": o.client, "reason": o.reason} for o in outcomes if o.reason is not None]
        accepted = [o for o in outcomes if o.reason is None]
        if secure_mean is None and not self.distributed:
            payloads, references = [o.update.payload for o in accepted], [self.reference(o.client, r) for o in accepted]
            # under client-level DP clipping bounds every update: a size rule relative to the others would let one
            # client's update decide whether another's counts
            reasons = (upload_problems(payloads, references) if self.client_dp is not None
                       else check_updates(self.cfg, payloads, references))
            dropped += [{"client": o.client, "reason": why} for o, why in zip(accepted, reasons) if why]
            accepted = [o for o, why in zip(accepted, reasons) if why is None]
        dropped.sort(key=lambda d: d["client"])
        attempts = attempts if attempts is not None else []
        min_clients = self.cfg.federation.min_clients
        nobody_sampled = self.client_dp is not None and not clients  # a Poisson cohort may be empty: noise alone
        # distributed DP: a round of fewer than n_min clients' noise shares (or federation.min_clients) is
        # withheld, never failed or retried: through SecAgg+ no such sum is unmasked, and a round run again
        # would give the server a second noised copy of the same updates
        withheld = self.distributed and len(accepted) < self.client_dp.mechanism.min_survivors
        if (len(accepted) < min_clients or not accepted) and not nobody_sampled and not withheld:
            attempts.append(dropped)
            why = (f"round {r}: {len(accepted)} of {len(clients)} clients answered"
                   + (" through secure aggregation" if secure_mean is not None or self.distributed else "")
                   + f", fewer than federation.min_clients = {min_clients} (dropped: "
                   + "; ".join(f"client {d['client']}: {d['reason']}" for d in dropped) + ")")
            if may_retry and any(o.released for o in outcomes) and self.ledger is not None \
                    and self.cfg.privacy.epsilon is not None:
                why += "; a retry would charge the clients that answered beyond privacy.epsilon"
                may_retry = False
            if may_retry:
                raise RetryRound(why)
            self.log_failed_round(r, clients, attempts, t0)
            raise RoundFailed(f"{why}; the run stopped after round {r - 1}: --resume continues it")
        record, broadcast = self.aggregate_round(r, accepted, dropped, bytes_down, t0, secure_mean, distributed_sum)
        if len(attempts):
            record["retries"] = len(attempts)
        self.run.log(record)
        return record, broadcast

    def aggregate_round(self, r: int, accepted: list[Outcome], dropped: list[dict], bytes_down: int, t0: float,
                        secure_mean: State | None = None,
                        distributed_sum: torch.Tensor | None = None) -> tuple[dict, State]:
        """Aggregate the accepted updates of round r (or their secure mean, or under distributed DP the secure
        sum of their messages) with the method's rule; the round's record and broadcast."""
        method = self.method
        answered = [o.client for o in accepted]
        secure, dp_record = secure_mean is not None or self.distributed, {}
        if self.client_dp is not None:
            reference = self.reference(answered[0] if answered else 0, r)
        if self.distributed:
            secure_mean, dp_record = self.client_dp.release_sum(reference, distributed_sum, answered, r)
            if secure_mean is None:  # withheld: nothing released, the global model stays
                record = self.record(r, answered, None, self.client_dp.message_bytes() * len(answered), bytes_down,
                                     None, self.maybe_evaluate(r, {}), t0)
                return record | {"dropped": dropped, "secure_aggregation": True} | dp_record, {}
        elif self.client_dp is not None:
            if secure_mean is not None:  # the mean of the clipped uploads (weights 1 / answered)
                update_sum = {k: (secure_mean[k].float() - reference[k].float()) * len(answered) for k in reference}
                within = None
            else:
                update_sum, _ = sum_clipped([o.update.payload for o in accepted], reference, self.client_dp.clip)
                within = sum(1 for o in accepted if o.update.within_clip)
            secure_mean, dp_record = self.client_dp.release(reference, update_sum, within, r)
        if secure_mean is not None:
            aggregate = method.aggregate([secure_mean], [1.0], answered, r)
            # the payloads' own size (distributed DP: the integers at privacy.modulus_bits); the protocol's on top
            bytes_up = (self.client_dp.message_bytes() if self.distributed else payload_bytes(secure_mean)) * len(answered)
            agg_error, train_loss = None, None
        else:
            weights = self.weights(answered)
            payloads = [o.update.payload for o in accepted]
            # what each client trained, as the server can know it: its start and its upload
            trained = [method.client_state(c, r) | method.pad(p) for c, p in zip(answered, payloads)]
            aggregate = method.aggregate(payloads, weights, answered, r)
            bytes_up = sum(payload_bytes(p) for p in payloads)
            agg_error = None if method.keeps_own_state else aggregation_error(
                self.adapted, trained, weights, method.eval_state(), aggregate.base_change)
            losses = [(w, o.update.loss) for w, o in zip(weights, accepted) if o.update.loss == o.update.loss]
            train_loss = sum(w * l for w, l in losses) / sum(w for w, _ in losses) if losses else None
            if self.ledger is not None:
                train_loss = None  # computed on raw client data: not released under DP
        bytes_down += payload_bytes(aggregate.broadcast) * self.cfg.federation.num_clients
        record = self.record(r, answered, train_loss, bytes_up, bytes_down, agg_error,
                             self.maybe_evaluate(r, aggregate.broadcast), t0)
        record["dropped"] = dropped
        record |= dp_record
        if secure:
            record["secure_aggregation"] = True
        return record, aggregate.broadcast

    def log_failed_round(self, r: int, clients: list[int], attempts: list[list[dict]], t0: float) -> None:
        self.run.log({"round": r, "failed": True, "clients": clients, "attempts": attempts,
                      "seconds": round(time.time() - t0, 3)})

    # -- evaluation and the record ------------------------------------------------------------
    @property
    def server_evaluates(self) -> bool:
        """Whether the server holds evaluation data (data.eval_path, a preset's split); with data.client_paths
        and no data.eval_path it holds none."""
        return not isinstance(self.task, ClassificationTask) or len(self.task.data.eval) > 0

    def evaluate(self) -> dict | None:
        """The global model on the server's evaluation data (None: it has none)."""
        if not self.server_evaluates:
            return None
        return {k: v for k, v in evaluate_model(self.task, self.adapted, self.method.eval_state(),
                                                self.cfg.eval).items() if k != "examples"}

    def evaluates(self, r: int) -> bool:
        """Whether round r is evaluated: every eval.every rounds and the last."""
        every = self.cfg.eval.every
        return bool(every and r % every == 0) or r == self.cfg.federation.rounds

    def maybe_evaluate(self, r: int, broadcast: State | None = None) -> tuple[dict | None, dict | None]:
        """Round r's evaluations when it is evaluated: the server's, and the clients' own (federated
        evaluation, carried by the runtime's client_evaluator)."""
        if not self.evaluates(r):
            return None, None
        self.last_eval = self.evaluate()
        if self.client_evaluator is not None:
            self.last_client_eval = federated_evaluation(self.client_evaluator(r, broadcast or {}))
        return self.last_eval, self.last_client_eval if self.client_evaluator is not None else None

    def evaluation_notes(self, evaluating: list[int], turn_off: str) -> list[str]:
        """What a run says at its start about its evaluation: that nothing is evaluated, when neither the server
        nor any client has evaluation data; under DP, what the clients' evaluation replies reveal."""
        if not self.server_evaluates and not evaluating:
            return ["nothing will be evaluated: the server has no evaluation file (data.eval_path) and no "
                    "client has one of its own (data.client_eval_paths; on Flower a node's eval-path)"]
        if evaluating and self.cfg.privacy.enabled:
            return [f"federated evaluation under DP: the replies of clients {evaluating} (how many evaluation "
                    "examples each holds, its accuracy and loss on them) are released outside the DP guarantee, "
                    f"which covers training only; {turn_off} turns them off"]
        return []

    def record(self, r, clients, train_loss, bytes_up, bytes_down, agg_error, evaluation, t0) -> dict:
        """Round r's record; `evaluation`: maybe_evaluate's pair (the server's, the clients')."""
        self.totals["bytes_up"] += bytes_up
        self.totals["bytes_down"] += bytes_down
        server_eval, client_eval = evaluation
        record = {"round": r, "clients": clients, "train_loss": train_loss, "eval": server_eval,
                  "bytes_up": bytes_up, "bytes_down": bytes_down, "agg_error": agg_error,
                  "epsilon": self.epsilon_spent()}
        if client_eval is not None:
            record["client_eval"] = client_eval
        return record | {"seconds": round(time.time() - t0, 3)}

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, r: int, runtime_state: dict | None = None) -> None:
        """The server's state after round r, and `runtime_state`: what the runtime keeps for its clients."""
        self.run.save_checkpoint(r, {
            "config": self.cfg.to_dict(),
            "method": self.method.state_dict(),
            "base_weights": self.adapted.base_weights() if self.method.changes_base else None,
            "runtime": runtime_state or {},
            "totals": self.totals,
            "last_eval": self.last_eval,
            "last_client_eval": self.last_client_eval,
            "privacy": self.client_dp.state_dict() if self.client_dp is not None
            else None if self.ledger is None else self.ledger.state_dict(),
            "rng": checkpoint.rng_state(),
            "data": self.data_fingerprint(),
        })

    def load_checkpoint(self) -> int:
        """Restore the state of the last checkpoint; its round. The runtime's part is in self.runtime_state."""
        state = self.run.load_checkpoint(self.device, CHECKPOINT_KEYS)
        path = self.run.checkpoint_path
        saved, now = with_defaults(state["config"]), self.cfg.to_dict()
        for cfg_dict in (saved, now):
            cfg_dict["federation"] = {k: v for k, v in cfg_dict["federation"].items() if k != "rounds"}
        differing = differing_keys(saved, now)  # a key one version lacks and the other leaves unset is none
        if differing:
            raise FedloraError(f"{path} was written by a different config (key '{differing[0]}' differs); "
                               "resume with the same config or choose another --out")
        r, rounds = state["round"], self.cfg.federation.rounds
        if r > rounds:
            raise ConfigError(f"federation.rounds = {rounds} is below the {r} rounds {path} has finished: resume "
                              f"with federation.rounds >= {r}")
        self.check_data(state.get("data"), path)  # a checkpoint of an older fedlora has no fingerprint
        self.setup_privacy(state["privacy"])
        self.method.load_state_dict(state["method"])
        if state["base_weights"] is not None:
            self.adapted.load_base_weights(state["base_weights"])
        self.runtime_state = state["runtime"]
        self.totals = state["totals"]
        self.last_eval = state["last_eval"]
        self.last_client_eval = state.get("last_client_eval")
        checkpoint.set_rng_state(state["rng"])
        self.run.resume_log(state)
        return r

    def data_fingerprint(self) -> dict:
        """The fingerprint of the data this run trains and evaluates on (data.fingerprint), computed once."""
        if self._fingerprint is None:
            data = self.task.data
            sizes = self.client_sizes if isinstance(self.client_sizes, list) else None
            self._fingerprint = fingerprint.fingerprint(data.train, data.eval, self.shards, sizes, self.label_names)
        return self._fingerprint

    def check_data(self, saved: dict | None, path: Path) -> None:
        """Refuse to resume on data other than the checkpoint's, saying what changed."""
        if saved is None:
            return
        d = self.cfg.data
        where = [getattr(split, "source", None) or file or d.name or d.hub_id
                 for split, file in ((self.task.data.train, d.path), (self.task.data.eval, d.eval_path or d.path))]
        changed = fingerprint.differences(saved, self.data_fingerprint(), *where)
        if changed:
            raise FedloraError(f"{path} was written on other data: {changed}; resume with the data the run "
                               "started with or choose another --out")

    # -- the end ------------------------------------------------------------------------------
    def finish(self, started: float) -> dict:
        """Export the final global model and write summary.json."""
        if self.last_eval is None:
            self.last_eval = self.evaluate()
        try:
            export_model(self.out, self.cfg, self.task, self.adapted, self.method, self.model_source,
                         self.label_names)
        except OSError as err:
            raise write_error(Path(err.filename or self.out), err) from None
        summary = {
            "method": self.cfg.method.name,
            "rounds": self.cfg.federation.rounds,
            "final_eval": self.last_eval,
            "final_client_eval": self.last_client_eval,
            "bytes_up_total": self.totals["bytes_up"],
            "bytes_down_total": self.totals["bytes_down"],
            "trained_numbers": self.method.trained_numbers(),  # per client: adapter and head
            "warnings": self.warnings,
            "client_sizes": self.client_sizes if isinstance(self.client_sizes, list) else None,  # None: sampled
            "model_source": self.model_source,
            "labels": self.label_names,
            "baselines": (self.task.baselines(self.cfg.eval.max_examples)
                          if isinstance(self.task, ClassificationTask) and self.server_evaluates else None),
            "privacy": self.client_dp.summary() if self.client_dp is not None else None if self.ledger is None else {
                "noise_multiplier": self.ledger.noise_multiplier, "delta": self.ledger.delta,
                "accountant": self.ledger.kind, "epsilon_max": self.ledger.max_epsilon(),
                "epsilon_per_client": {c: self.ledger.epsilon(c) for c in sorted(self.ledger.history)}},
            "seconds_this_session": round(time.time() - started, 2),
            "config": self.cfg.to_dict(),
        }
        self.run.write_json(SUMMARY, summary)
        return summary

    @property
    def label_names(self) -> list[str] | None:
        """A classifier's class names (id -> name); None for a language model."""
        return self.task.data.label_names if isinstance(self.task, ClassificationTask) else None
