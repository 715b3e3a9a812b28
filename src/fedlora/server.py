"""The in-process federation: one base model in memory, clients differing only in their adapter and
optimizer states; rounds of sampling, local training, aggregation, evaluation, logging and checkpoints."""
from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import AdaptedModel
from .client import local_train, make_optimizer
from .comm import payload_bytes
from .config import Config, differing_keys
from .experiment import build_task, load_task_data, task_kind
from .data import PRESETS as CLASSIFICATION_PRESETS
from .data import INSTRUCTION_PRESETS, load_classification, load_instructions, partition
from .errors import ClientTimeout, ConfigError, FedloraError, RoundFailed
from .init_sb import gradient_sums, private_gradient_sum
from .methods import METHODS, InitContext
from .lm_task import CausalLMTask
from .models import PRESETS as MODEL_PRESETS
from . import parallel
from .models import (default_target_modules, head_modules, load_causal_lm, load_classifier, pick_device,
                     resolve_model_source)
from .privacy.accounting import PrivacyLedger, calibrate_noise, planned_epsilon
from .privacy.dpsgd import DPSGD
from .privacy.grad_sample import for_trainable
from .seeding import derive_seed, generator, rng
from .tasks import ClassificationTask, Task
from .validation import update_problem

CHECKPOINT = "checkpoint.pt"
ROUNDS_LOG = "rounds.jsonl"


@dataclass
class ClientUpdate:
    payload: dict[str, torch.Tensor]  # what the client sends
    trained: dict[str, torch.Tensor]  # its whole trained state (for the exactness diagnostic only)
    loss: float
    optimizer_state: dict | None  # kept on the client across rounds with train.keep_optimizer_state


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


class Simulation:
    def __init__(self, cfg: Config, out_dir: str | Path, *, progress: bool = True):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.task, self.adapted, self.model_source = build_task(cfg, self.device, progress)
        self.model = self.adapted.model
        d, groups = cfg.data, self.task.train_labels
        self.shards = partition(groups, cfg.federation.num_clients, d.partition,
                                seed=derive_seed(cfg.seed, "partition"), dirichlet_alpha=d.dirichlet_alpha,
                                label_proportions=d.label_proportions, min_client_examples=d.min_client_examples,
                                num_labels=self.task.num_groups)
        self.client_sizes = [len(s) for s in self.shards]
        self.method = METHODS[cfg.method.name](self.adapted, cfg, self.client_sizes)
        self.optimizer_states: dict[int, dict] = {}
        self.totals = {"bytes_up": 0, "bytes_down": 0}
        self.last_eval: dict | None = None
        # what the last exchange sent to every client, kept only for a runtime that sends it itself (Flower):
        # FedEx-LoRA's is as large as the adapted weights
        self.keep_broadcast = False
        self.last_broadcast: dict[str, torch.Tensor] = {}
        self.ledger: PrivacyLedger | None = None  # set by run() when privacy is enabled
        init_clients = self._sample_clients(0)
        share = cfg.fedsb.init_examples / sum(self.client_sizes[c] for c in init_clients)
        self.init_examples = {c: max(1, min(self.client_sizes[c], round(share * self.client_sizes[c])))
                              for c in init_clients}

    def _losses(self, batch: dict) -> torch.Tensor:
        return self.task.example_losses(self.model, batch)

    # -- privacy ------------------------------------------------------------------------------
    def _sample_rate(self, client: int) -> float:
        return min(1.0, self.cfg.train.batch_size / self.client_sizes[client])

    def _privacy_plan(self) -> list[list[tuple[float, int, float | None]]]:
        """Every client's planned DP-SGD steps as (sample rate, steps, fixed noise or None) segments; the
        client sampling of every round is known in advance from the seed."""
        plans: list[list[tuple[float, int, float | None]]] = [[] for _ in self.client_sizes]
        if self.method.init_reads_client_data():
            for c, n in self.init_examples.items():
                plans[c].append((n / self.client_sizes[c], 1, self.cfg.fedsb.init_noise_multiplier))
        rounds = np.zeros(len(self.client_sizes), dtype=int)
        for r in range(1, self.cfg.federation.rounds + 1):
            rounds[self._sample_clients(r)] += 1
        for c, k in enumerate(rounds):
            if k:
                plans[c].append((self._sample_rate(c), int(k) * self.cfg.train.local_steps, None))
        return plans

    def _setup_privacy(self, saved: dict | None) -> None:
        p = self.cfg.privacy
        if not p.enabled:
            return
        plans = self._privacy_plan()
        delta = p.delta or min(1e-5, 1 / (10 * max(self.client_sizes)))
        if saved is not None:
            sigma = saved["noise_multiplier"]
        elif p.noise_multiplier is not None:
            sigma = p.noise_multiplier
        else:
            sigma = calibrate_noise(p.accountant, p.epsilon, delta, plans)
        if p.epsilon is not None:
            planned = planned_epsilon(p.accountant, sigma, plans, delta)
            if planned > p.epsilon * (1 + 1e-6):
                worst = max(range(len(plans)), key=lambda c: sum(n for _, n, _ in plans[c]))
                steps = ", ".join(f"{n} steps at sample rate {q:.4g}" for q, n, _ in plans[worst])
                raise ConfigError(
                    f"privacy: the planned training spends epsilon {planned:.3f} > privacy.epsilon {p.epsilon} "
                    f"(noise_multiplier {sigma:.3f}, delta {delta:g}; e.g. client {worst}: {steps}); lower "
                    "federation.rounds or train.local_steps, or raise privacy.noise_multiplier")
        self.ledger = (PrivacyLedger.from_state_dict(saved) if saved is not None
                       else PrivacyLedger(p.accountant, delta, sigma))
        self._recorder = for_trainable(self.adapted, self.method.trainable_keys(), p.grad_norm)

    def _client_dp(self, client: int, r: int, params: dict | None = None) -> DPSGD | None:
        """The client's DP-SGD for round r over `params` (default: the model's trainable parameters)."""
        if self.ledger is None:
            return None
        params = params or self.adapted.parameters_by_key()
        noise = torch.Generator(self.device).manual_seed(derive_seed(self.cfg.seed, "noise", r, client))
        return DPSGD(self._recorder, {k: params[k] for k in self.method.trainable_keys()},
                     self.cfg.privacy.clip_norm, self.ledger.noise_multiplier,
                     self._sample_rate(client) * self.client_sizes[client], noise)

    # -- the run ------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        if resume and (self.out / CHECKPOINT).exists():
            start = self._load_checkpoint() + 1
        else:
            self.refuse_existing_run()
            self._setup_privacy(None)
            self._log(self._initialise())
            self._save_checkpoint(0)
            start = 1
        rounds = self.cfg.federation.rounds
        bar = tqdm(range(start, rounds + 1), desc="rounds", disable=not self.progress, initial=start - 1,
                   total=rounds)
        for r in bar:
            record = self._round(r)
            self._log(record)
            self._save_checkpoint(r)
            if record["eval"]:
                bar.set_postfix({k: round(v, 4) for k, v in record["eval"].items()})
        return self._finish(started)

    def _finish(self, started: float) -> dict:
        """Export the final global model and write summary.json."""
        rounds = self.cfg.federation.rounds
        if self.last_eval is None:
            self.last_eval = self._evaluate()
        self._export()
        summary = {
            "method": self.cfg.method.name,
            "rounds": rounds,
            "final_eval": self.last_eval,
            "bytes_up_total": self.totals["bytes_up"],
            "bytes_down_total": self.totals["bytes_down"],
            "client_sizes": self.client_sizes,
            "model_source": self.model_source,
            "privacy": None if self.ledger is None else {
                "noise_multiplier": self.ledger.noise_multiplier, "delta": self.ledger.delta,
                "accountant": self.ledger.kind, "epsilon_max": self.ledger.max_epsilon(),
                "epsilon_per_client": {c: self.ledger.epsilon(c) for c in sorted(self.ledger.history)}},
            "seconds_this_session": round(time.time() - started, 2),
            "config": self.cfg.to_dict(),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def refuse_existing_run(self) -> None:
        if (self.out / ROUNDS_LOG).exists():
            raise FedloraError(f"{self.out} already holds a run: choose another output folder (`fedlora run "
                               "--resume` continues a run of the in-process simulator)")

    def _initialise(self, gradient_sum=None, clients: list[int] | None = None) -> dict:
        """Round 0: the method's set-up exchange (Fed-SB's gradient init) and the initial evaluation.
        Another runtime passes the clients' gradient sums it gathered (and the clients that sent them)."""
        t0 = time.time()
        cfg = self.cfg
        ctx = InitContext(sorted(self.init_examples) if clients is None else clients, generator(cfg.seed, "init"),
                          gradient_sum=gradient_sum or self._client_gradient_sum,
                          public_gradient_sum=self._public_gradient_sum)
        exchange = self.method.initialise(ctx)
        self.last_broadcast = exchange.broadcast if self.keep_broadcast else {}
        bytes_up = sum(payload_bytes(p) for p in exchange.uploads)
        bytes_down = payload_bytes(exchange.broadcast) * cfg.federation.num_clients
        return self._record(0, exchange.clients, None, bytes_up, bytes_down, 0.0, self._maybe_evaluate(0), t0)

    def _batches(self, indices: np.ndarray, split=None):
        for i in range(0, len(indices), self.cfg.train.batch_size):
            yield self.task.batch(indices[i:i + self.cfg.train.batch_size], split)

    def _client_gradient_sum(self, client: int) -> dict[str, torch.Tensor]:
        """A client's sum of dL/dW0 over its init examples; under DP a Poisson draw at the same expected
        size, clipped per example, noised, and charged to the client's budget."""
        cfg, n = self.cfg, self.init_examples[client]
        torch.manual_seed(derive_seed(cfg.seed, "init", client))  # dropout
        draw = rng(cfg.seed, "init", client)
        if self.ledger is None:
            return gradient_sums(self.adapted, self._batches(draw.permutation(self.shards[client])[:n]), self._losses)
        q = n / self.client_sizes[client]
        chosen = self.shards[client][draw.random(self.client_sizes[client]) < q]
        noise = torch.Generator(self.device).manual_seed(derive_seed(cfg.seed, "noise", 0, client))
        sigma = self._charge_init(client)
        return private_gradient_sum(self.adapted, self._batches(chosen), self._losses, cfg.privacy.clip_norm,
                                    sigma, noise, cfg.privacy.grad_norm)

    def _charge_init(self, client: int) -> float:
        """Charge a client's private gradient sum of the set-up exchange to its budget; the noise multiplier."""
        sigma = self.cfg.fedsb.init_noise_multiplier or self.ledger.noise_multiplier
        self.ledger.charge(client, self.init_examples[client] / self.client_sizes[client], 1, sigma)
        return sigma

    def _charge_training(self, client: int) -> None:
        self.ledger.charge(client, self._sample_rate(client), self.cfg.train.local_steps)

    def _public_gradient_sum(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        public = load_task_data(cfg.fedsb.public_data, task_kind(cfg.data, cfg.model.name)).train
        if isinstance(self.task, ClassificationTask) and max(public.labels) >= self.task.data.num_labels:
            raise ConfigError(f"fedsb.public_data has labels up to {max(public.labels)}, but the task has "
                              f"{self.task.data.num_labels} classes")
        chosen = rng(cfg.seed, "public").permutation(len(public))[:cfg.fedsb.init_examples]
        torch.manual_seed(derive_seed(cfg.seed, "public"))
        return gradient_sums(self.adapted, self._batches(chosen, public), self._losses)

    def _round(self, r: int) -> dict:
        """Sample, train, check and aggregate one round. Clients that raise, time out, return nothing or
        send an update that fails the server's checks are dropped; when fewer than federation.min_clients
        remain the round is run again or the run stops (federation.on_too_few_clients)."""
        t0 = time.time()
        fed, method = self.cfg.federation, self.method
        clients = self._sample_clients(r)
        retrying = fed.on_too_few_clients == "retry"
        snapshot = copy.deepcopy(method.state_dict()) if retrying else None  # a failed attempt may touch it
        failed_attempts: list[list[dict]] = []
        while True:
            accepted, dropped, bytes_down = self._collect(clients, r)
            if len(accepted) >= fed.min_clients:
                break
            failed_attempts.append([{"client": d["client"], "reason": d["reason"]} for d in dropped])
            released = [c for c in clients if c not in {d["client"] for d in dropped if not d["released"]}]
            why = (f"round {r}: {len(accepted)} of {len(clients)} clients answered, fewer than "
                   f"federation.min_clients = {fed.min_clients} (dropped: "
                   + "; ".join(f"client {d['client']}: {d['reason']}" for d in dropped) + ")")
            retry = retrying and len(failed_attempts) <= fed.round_retries
            if retry and released and self.ledger is not None and self.cfg.privacy.epsilon is not None:
                why += "; a retry would charge the clients that answered beyond privacy.epsilon"
                retry = False
            if not retry:
                self._log({"round": r, "failed": True, "clients": clients, "attempts": failed_attempts,
                           "seconds": round(time.time() - t0, 3)})
                raise RoundFailed(f"{why}; the run stopped after round {r - 1}: --resume continues it")
            method.load_state_dict(copy.deepcopy(snapshot))
        return self._aggregate_round(r, accepted, dropped, bytes_down, t0, retries=len(failed_attempts))

    def _aggregate_round(self, r: int, accepted: list[tuple[int, "ClientUpdate"]], dropped: list[dict],
                         bytes_down: int, t0: float, retries: int = 0) -> dict:
        """Aggregate the accepted updates of round r with the method's rule; the round's log record."""
        fed, method = self.cfg.federation, self.method
        answered = [c for c, _ in accepted]
        updates = [u for _, u in accepted]
        sizes = [self.client_sizes[c] for c in answered]
        weights = ([n / sum(sizes) for n in sizes] if fed.weighting == "examples"
                   else [1 / len(answered)] * len(answered))
        for c, u in accepted:
            if u.optimizer_state is not None:
                self.optimizer_states[c] = u.optimizer_state
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
        record = self._record(r, answered, train_loss, bytes_up, bytes_down, agg_error, self._maybe_evaluate(r), t0)
        record["dropped"] = [{"client": d["client"], "reason": d["reason"]} for d in dropped]
        if retries:
            record["retries"] = retries
        return record

    def _collect(self, clients: list[int], r: int) -> tuple[list[tuple[int, "ClientUpdate"]], list[dict], int]:
        """Train every client of the round and check what comes back: (accepted (client, update) pairs,
        dropped {client, reason, released}, bytes sent down)."""
        method, fed = self.method, self.cfg.federation
        accepted, dropped, bytes_down = [], [], 0
        starts = {c: method.client_state(c, r) for c in clients}
        references = {c: {k: v.detach().clone() for k, v in method.upload_of(starts[c]).items()} for c in clients}
        together: dict[int, ClientUpdate] = {}
        groups = {c: group for group in parallel.client_groups(self, clients) for c in group}
        for c in tqdm(clients, desc=f"round {r}", leave=False, disable=not self.progress):
            bytes_down += payload_bytes(method.download(c))
            start, reference = starts[c], references[c]
            if len(groups[c]) > 1 and c == groups[c][0]:
                together = parallel.train_together(self, groups[c], r, starts) or {}
            began = time.monotonic()
            deadline = began + fed.client_timeout if fed.client_timeout else None
            update, released = None, False
            try:
                update = together.pop(c) if c in together else self._client_update(c, r, start, deadline)
                released = update is not None
                if update is None:
                    reason = "returned no update"
                elif deadline is not None and time.monotonic() > deadline:
                    reason = f"answered after {time.monotonic() - began:.1f} s > federation.client_timeout"
                else:
                    reason = update_problem(update.payload, reference, self.cfg.server.max_update_norm)
            except ClientTimeout as err:
                reason = str(err)
            except Exception as err:  # a client's failure must not stop the federation
                reason = f"raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
            if reason is None:
                accepted.append((c, update))
            else:
                dropped.append({"client": c, "reason": reason, "released": released})
        self.adapted.set_trainable([])
        return accepted, dropped, bytes_down

    def _client_update(self, c: int, r: int, start: dict, deadline: float | None) -> "ClientUpdate | None":
        """One client's local training from `start`; what it sends back, and what it keeps."""
        cfg, adapted = self.cfg, self.adapted
        adapted.load_state(start)
        optimizer = self._client_optimizer(c, adapted.set_trainable(self.method.trainable_keys()))
        torch.manual_seed(derive_seed(cfg.seed, "client", r, c))  # dropout
        dp = self._client_dp(c, r)
        batches = self.task.client_batches(self.shards[c], cfg.train.batch_size, cfg.train.local_steps,
                                           rng(cfg.seed, "client", r, c),
                                           sample_rate=self._sample_rate(c) if dp else None)
        step_losses = local_train(self.model, optimizer, batches, self._losses, cfg.train.max_grad_norm, dp,
                                  deadline)
        return self._client_result(c, adapted.state(), step_losses, optimizer, dp)

    def _client_optimizer(self, c: int, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        optimizer = make_optimizer(params, self.cfg.train)
        if self.cfg.train.keep_optimizer_state and c in self.optimizer_states:
            # a copy: loading aliases the saved tensors, and an attempt that fails must leave them as they were
            optimizer.load_state_dict(copy.deepcopy(self.optimizer_states[c]))
        return optimizer

    def _client_result(self, c: int, trained: dict, step_losses: list[float], optimizer: torch.optim.Optimizer,
                       dp: DPSGD | None) -> "ClientUpdate":
        """What a client that trained sends back and keeps; its DP steps charged to its budget."""
        if dp is not None:
            self._charge_training(c)
        return ClientUpdate(payload=self.method.upload(c, trained), trained=trained,
                            loss=float(np.mean(step_losses)) if step_losses else float("nan"),
                            optimizer_state=optimizer.state_dict() if self.cfg.train.keep_optimizer_state else None)

    # -- pieces -------------------------------------------------------------------------------
    def _sample_clients(self, r: int) -> list[int]:
        fed = self.cfg.federation
        return sorted(int(c) for c in rng(self.cfg.seed, "sample", r).choice(
            fed.num_clients, fed.clients_per_round, replace=False))

    def _evaluate(self) -> dict:
        self.adapted.load_state(self.method.eval_state())
        e = self.cfg.eval
        return self.task.evaluate(self.model, e.batch_size, e.max_examples)

    def _maybe_evaluate(self, r: int) -> dict | None:
        every = self.cfg.eval.every
        if (every and r % every == 0) or r == self.cfg.federation.rounds:
            self.last_eval = self._evaluate()
            return self.last_eval
        return None

    def _record(self, r, clients, train_loss, bytes_up, bytes_down, agg_error, evaluation, t0) -> dict:
        self.totals["bytes_up"] += bytes_up
        self.totals["bytes_down"] += bytes_down
        return {"round": r, "clients": clients, "train_loss": train_loss, "eval": evaluation,
                "bytes_up": bytes_up, "bytes_down": bytes_down, "agg_error": agg_error,
                "epsilon": None if self.ledger is None else self.ledger.max_epsilon(),
                "seconds": round(time.time() - t0, 3)}

    def _log(self, record: dict) -> None:
        with open(self.out / ROUNDS_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- checkpoints --------------------------------------------------------------------------
    def _save_checkpoint(self, r: int) -> None:
        state = {
            "round": r,
            "config": self.cfg.to_dict(),
            "method": self.method.state_dict(),
            "base_weights": self.adapted.base_weights() if self.method.changes_base else None,
            "optimizer_states": self.optimizer_states,
            "totals": self.totals,
            "last_eval": self.last_eval,
            "privacy": None if self.ledger is None else self.ledger.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def _load_checkpoint(self) -> int:
        path = self.out / CHECKPOINT
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as err:  # a truncated or foreign file
            raise FedloraError(f"{path}: not a readable fedlora checkpoint ({type(err).__name__})") from None
        saved, now = dict(state["config"]), self.cfg.to_dict()
        for cfg_dict in (saved, now):
            cfg_dict["federation"] = {k: v for k, v in cfg_dict["federation"].items() if k != "rounds"}
        if saved != now:
            key = differing_keys(saved, now)[0]
            raise FedloraError(f"{path} was written by a different config (key '{key}' differs); "
                               "resume with the same config or choose another --out")
        self._setup_privacy(state["privacy"])
        self.method.load_state_dict(state["method"])
        if state["base_weights"] is not None:
            self.adapted.load_base_weights(state["base_weights"])
        self.optimizer_states = state["optimizer_states"]
        self.totals = state["totals"]
        self.last_eval = state["last_eval"]
        rng_state = state["rng"]
        torch.set_rng_state(rng_state["torch"].cpu())
        np.random.set_state(rng_state["numpy"])
        random.setstate(rng_state["python"])
        if rng_state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in rng_state["cuda"]])
        r = state["round"]
        log = self.out / ROUNDS_LOG
        if log.exists():  # drop rounds logged after the checkpoint was written
            kept = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln)["round"] <= r]
            log.write_text("".join(ln + "\n" for ln in kept))
        return r

    # -- export -------------------------------------------------------------------------------
    def _export(self) -> None:
        state = self.method.eval_state()
        self.adapted.load_state(state)
        tokenizer = self.task.tokenizer
        if self.adapted.parameterisation == "full":
            self.model.save_pretrained(self.out / "model")
            tokenizer.save_pretrained(self.out / "model")
            return
        base = self.model_source
        if self.method.changes_base:  # W0 itself was trained: ship it beside the adapter
            base_dir = self.out / "base_model"
            self.model.save_pretrained(base_dir, state_dict=self.adapted.base_model_state_dict())
            tokenizer.save_pretrained(base_dir)
            base = str(base_dir.resolve())
        self.adapted.export_peft(self.out / "adapter", state, base_model=base, task_type=self.task.task_type)
