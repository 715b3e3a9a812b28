"""The in-process runtime: one base model in memory, the clients differing only in their adapter and
optimizer states; it trains the sampled clients of every round (one after another, or together in one
pass) and hands their uploads to the server core, which aggregates, evaluates, logs and checkpoints."""
from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import parallel, progress
from .client import ClientTrainer, ClientUpdate
from .comm import payload_bytes
from .config import Config
from .errors import ClientTimeout
from .experiment import build_task
from .federation import FederationServer, Outcome, RetryRound, client_model, evaluate_model
from .models import pick_device
from .plan import client_shards, shard_sizes
from .privacy.distributed import modular_sum


def failure(err: Exception) -> str:
    """Why a client was dropped when its computation raised."""
    return f"raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


class Simulator:
    def __init__(self, cfg: Config, out_dir: str | Path, *, progress: bool = True, data=None, model=None,
                 tokenizer=None):
        """`data`, `model` and `tokenizer` stand in for the config's data and model (see build_task)."""
        self.cfg = cfg
        self.progress = progress
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        task, adapted, source = build_task(cfg, self.device, progress, data, model, tokenizer)
        self.task, self.adapted, self.model = task, adapted, adapted.model
        self.shards = client_shards(cfg, task)
        self.server = FederationServer(cfg, out_dir, task, adapted, source, shard_sizes(self.shards),
                                       progress=progress, shards=self.shards)
        self.method = self.server.method
        self.trainer = ClientTrainer(cfg, task, adapted, self.method, self.server.plan, self.shards)
        # data.client_eval_paths: every client evaluates the model it uses on its own evaluation file
        own_eval = getattr(task.data, "client_eval", None) or []
        self.eval_tasks = {c: task.evaluating_on(split) for c, split in enumerate(own_eval) if split is not None}
        if self.eval_tasks:
            self.server.client_evaluator = self.evaluate_clients
        self.server.warnings += self.server.evaluation_notes(sorted(self.eval_tasks),
                                                             "leaving out data.client_eval_paths")

    @property
    def out(self) -> Path:
        return self.server.out

    @property
    def client_sizes(self) -> Sequence[int]:
        return self.server.client_sizes

    @property
    def ledger(self):
        return self.server.ledger

    def run(self, resume: bool = False) -> dict:
        with self.server.open_run(resume) as start:
            return self._run(start)

    def _run(self, start: int) -> dict:
        server = self.server
        started = time.time()
        rounds = self.cfg.federation.rounds
        if start == 0:
            record = self.initialise()
            server.save_checkpoint(0, self.runtime_state())
            progress.line(progress.round_line(record, rounds), self.progress)
            start = 1
        else:
            kept = server.runtime_state
            self.trainer.optimizer_states = kept.get("optimizer_states", {})
            self.trainer.own_states = kept.get("own_states", {})
        bar = progress.bar(range(start, rounds + 1), self.progress, desc="rounds", initial=start - 1, total=rounds)
        for r in bar:
            record = self.round(r)
            server.save_checkpoint(r, self.runtime_state())
            progress.plain_line(progress.round_line(record, rounds), self.progress)
            if record["eval"]:
                bar.set_postfix({k: round(v, 4) for k, v in record["eval"].items() if "/" not in k})
        return server.finish(started)

    def evaluate_clients(self, r: int, broadcast: dict) -> dict[int, dict | str]:
        """Federated evaluation in round r: each client with an evaluation file evaluates the model it uses (the
        global model, with FedSA-LoRA's own B) on it. The server's model already holds the round's broadcast."""
        results: dict[int, dict | str] = {}
        for c, task in self.eval_tasks.items():
            try:
                results[c] = evaluate_model(task, self.adapted, client_model(self.method, self.trainer.own_states.get(c)),
                                            self.cfg.eval)
            except Exception as err:  # a client's failure must not stop the federation
                results[c] = failure(err)
        return results

    def runtime_state(self) -> dict:
        """What the clients keep between rounds, which only this runtime holds."""
        return {"optimizer_states": self.trainer.optimizer_states, "own_states": self.trainer.own_states}

    def initialise(self) -> dict:
        """Round 0: the set-up exchange, each phase's replies computed here, client after client."""

        def send(request, clients: list[int]) -> dict:
            replies = {}
            for k, c in enumerate(progress.bar(clients, self.progress, desc="set-up", leave=False)):
                began = time.time()
                try:
                    replies[c] = self.trainer.set_up_reply(c, request, self.server.privacy_for(c))
                except Exception as err:  # a client's failure must not stop the federation
                    replies[c] = failure(err)
                progress.plain_line(f"set-up: client {c} replied ({k + 1} of {len(clients)}, "
                                    f"{time.time() - began:.1f} s)", self.progress)
            return replies

        record, _ = self.server.initialise(send)
        return record

    def round(self, r: int) -> dict:
        """Sample and train one round, and hand what came back to the server, which closes it. When too few
        clients remain the round runs again (federation.on_too_few_clients = 'retry', at most
        federation.round_retries times) from the state it started in, or the run stops."""
        t0 = time.time()
        fed, server = self.cfg.federation, self.server
        clients = server.sample_clients(r)
        retrying = fed.on_too_few_clients == "retry"
        snapshot = copy.deepcopy((self.method.state_dict(), self.trainer.own_states)) if retrying else None
        attempts: list[list[dict]] = []
        while True:
            outcomes, bytes_down = self.train_round(clients, r)
            try:
                record, _ = server.close_round(r, clients, outcomes, bytes_down, t0, attempts=attempts,
                                               distributed_sum=self.secure_sum(outcomes),
                                               may_retry=retrying and len(attempts) < fed.round_retries)
            except RetryRound:  # a failed attempt may have touched the state: the round starts again from it
                method_state, self.trainer.own_states = copy.deepcopy(snapshot)
                self.method.load_state_dict(method_state)
                continue
            updates = {o.client: o.update for o in outcomes}
            for c in record["clients"]:
                self.trainer.keep(c, updates[c])
            return record

    def secure_sum(self, outcomes: list[Outcome]) -> torch.Tensor | None:
        """Under distributed DP, what secure aggregation gives the server: the sum of the messages of the clients
        that answered, mod 2^bits (None: none answered, or another mechanism)."""
        messages = [o.update.message for o in outcomes if o.reason is None]
        if not self.server.distributed or len(messages) < self.server.client_dp.mechanism.min_survivors:
            return None  # as SecAgg+ at its threshold: no sum the run would withhold is formed
        return modular_sum(messages, self.server.client_dp.mechanism.bits)

    def train_round(self, clients: list[int], r: int) -> tuple[list[Outcome], int]:
        """Train every client of the round: each one's outcome (its update, or why it has none) and the bytes
        sent down."""
        method, fed, trainer = self.method, self.cfg.federation, self.trainer
        outcomes, bytes_down = [], 0
        starts = {c: trainer.start(c, r) for c in clients}
        privacy = {c: self.server.privacy_for(c) for c in clients}
        clip = self.server.update_clip()
        together: dict[int, ClientUpdate] = {}
        groups = {c: group for group in parallel.client_groups(trainer, clients) for c in group}
        for c in progress.bar(clients, self.progress, desc=f"round {r}", leave=False):
            bytes_down += payload_bytes(method.download(c))
            if len(groups[c]) > 1 and c == groups[c][0]:
                private = privacy if self.server.ledger is not None else None
                together = parallel.train_together(trainer, groups[c], r, starts, private, clip) or {}
            began = time.monotonic()
            deadline = began + fed.client_timeout if fed.client_timeout else None
            update, reason = None, None
            try:
                update = (together.pop(c) if c in together
                          else trainer.update(c, r, starts[c], deadline, privacy[c], clip))
                if update is None:
                    reason = "returned no update"
                elif deadline is not None and time.monotonic() > deadline:
                    reason = f"answered after {time.monotonic() - began:.1f} s > federation.client_timeout"
                elif self.server.distributed:
                    trainer.seal(c, r, update, starts[c], self.server.client_dp.mechanism)
            except ClientTimeout as err:
                reason = str(err)
            except Exception as err:  # a client's failure must not stop the federation
                reason = failure(err)
            outcomes.append(Outcome(c, update, reason, released=update is not None))
        self.adapted.set_trainable([])
        return outcomes, bytes_down
