"""The in-process runtime: one base model in memory, the clients differing only in their adapter and
optimizer states; it trains the sampled clients of every round (one after another, or together in one
pass) and hands their uploads to the server core, which aggregates, evaluates, logs and checkpoints."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from . import parallel, progress
from .client import ClientTrainer, ClientUpdate
from .comm import payload_bytes
from .config import Config
from .errors import ClientTimeout, RoundFailed
from .experiment import build_task
from .federation import FederationServer, client_shards
from .models import pick_device


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
        self.server = FederationServer(cfg, out_dir, task, adapted, source, [len(s) for s in self.shards],
                                       progress=progress)
        self.method = self.server.method
        self.clients = ClientTrainer(cfg, task, adapted, self.method, self.server.plan, dict(enumerate(self.shards)))

    @property
    def out(self) -> Path:
        return self.server.out

    @property
    def client_sizes(self) -> list[int]:
        return self.server.client_sizes

    @property
    def ledger(self):
        return self.server.ledger

    def setup_privacy(self, saved: dict | None = None) -> None:
        """The server's accountant and noise multiplier, which the clients use too."""
        self.server.setup_privacy(saved)
        self._share_noise()

    def _share_noise(self) -> None:
        if self.server.ledger is not None:
            self.clients.enable_privacy(self.server.ledger.noise_multiplier)

    def run(self, resume: bool = False) -> dict:
        with self.server.open_run(resume) as start:
            return self._run(start)

    def _run(self, start: int) -> dict:
        server = self.server
        started = time.time()
        self._share_noise()
        rounds = self.cfg.federation.rounds
        if start == 0:
            record = self.initialise()
            server.log(record)
            server.save_checkpoint(0, self.runtime_state())
            progress.line(progress.round_line(record, rounds), self.progress)
            start = 1
        else:
            self.clients.optimizer_states = server.runtime_state.get("optimizer_states", {})
        bar = progress.bar(range(start, rounds + 1), self.progress, desc="rounds", initial=start - 1, total=rounds)
        for r in bar:
            record = self.round(r)
            server.log(record)
            server.save_checkpoint(r, self.runtime_state())
            progress.plain_line(progress.round_line(record, rounds), self.progress)
            if record["eval"]:
                bar.set_postfix({k: round(v, 4) for k, v in record["eval"].items() if "/" not in k})
        return server.finish(started)

    def runtime_state(self) -> dict:
        return {"optimizer_states": self.clients.optimizer_states}

    def initialise(self) -> dict:
        """Round 0: the set-up exchange, each phase's replies computed here, client after client."""

        def send(request, clients: list[int]) -> dict:
            replies = {}
            for k, c in enumerate(progress.bar(clients, self.progress, desc="set-up", leave=False)):
                began = time.time()
                try:
                    replies[c] = self.clients.set_up_reply(c, request)
                except Exception as err:  # a client's failure must not stop the federation
                    replies[c] = failure(err)
                progress.plain_line(f"set-up: client {c} replied ({k + 1} of {len(clients)}, "
                                    f"{time.time() - began:.1f} s)", self.progress)
            return replies

        return self.server.initialise(send)

    def round(self, r: int) -> dict:
        """Sample, train, check and aggregate one round. Clients that raise, time out, return nothing or
        send an update that fails the server's checks are dropped; when fewer than federation.min_clients
        remain the round is run again or the run stops (federation.on_too_few_clients)."""
        t0 = time.time()
        fed, method, server = self.cfg.federation, self.method, self.server
        clients = server.sample_clients(r)
        retrying = fed.on_too_few_clients == "retry"
        snapshot = copy.deepcopy(method.state_dict()) if retrying else None  # a failed attempt may touch it
        failed_attempts: list[list[dict]] = []
        while True:
            accepted, dropped, bytes_down = self.collect(clients, r)
            if len(accepted) >= fed.min_clients:
                break
            failed_attempts.append([{"client": d["client"], "reason": d["reason"]} for d in dropped])
            released = [c for c in clients if c not in {d["client"] for d in dropped if not d["released"]}]
            why = (f"round {r}: {len(accepted)} of {len(clients)} clients answered, fewer than "
                   f"federation.min_clients = {fed.min_clients} (dropped: "
                   + "; ".join(f"client {d['client']}: {d['reason']}" for d in dropped) + ")")
            retry = retrying and len(failed_attempts) <= fed.round_retries
            if retry and released and server.ledger is not None and self.cfg.privacy.epsilon is not None:
                why += "; a retry would charge the clients that answered beyond privacy.epsilon"
                retry = False
            if not retry:
                server.log_failed_round(r, clients, failed_attempts, t0)
                raise RoundFailed(f"{why}; the run stopped after round {r - 1}: --resume continues it")
            method.load_state_dict(copy.deepcopy(snapshot))
        for c, update in accepted:
            self.clients.keep(c, update)
        return server.aggregate_round(r, accepted, dropped, bytes_down, t0, retries=len(failed_attempts))

    def collect(self, clients: list[int], r: int) -> tuple[list[tuple[int, ClientUpdate]], list[dict], int]:
        """Train every client of the round and check what comes back: (accepted (client, update) pairs,
        dropped {client, reason, released}, bytes sent down)."""
        method, fed, server, trainer = self.method, self.cfg.federation, self.server, self.clients
        accepted, dropped, bytes_down = [], [], 0
        starts = {c: method.client_state(c, r) for c in clients}
        references = {c: server.reference(c, r) for c in clients}
        together: dict[int, ClientUpdate] = {}
        groups = {c: group for group in parallel.client_groups(trainer, clients) for c in group}
        for c in progress.bar(clients, self.progress, desc=f"round {r}", leave=False):
            bytes_down += payload_bytes(method.download(c))
            if len(groups[c]) > 1 and c == groups[c][0]:
                together = parallel.train_together(trainer, groups[c], r, starts) or {}
            began = time.monotonic()
            deadline = began + fed.client_timeout if fed.client_timeout else None
            update, released = None, False
            try:
                update = together.pop(c) if c in together else trainer.update(c, r, starts[c], deadline)
                released = update is not None
                if released and server.ledger is not None:
                    server.charge_training(c)
                if update is None:
                    reason = "returned no update"
                elif deadline is not None and time.monotonic() > deadline:
                    reason = f"answered after {time.monotonic() - began:.1f} s > federation.client_timeout"
                else:
                    reason = None
            except ClientTimeout as err:
                reason = str(err)
            except Exception as err:  # a client's failure must not stop the federation
                reason = failure(err)
            if reason is None:
                accepted.append((c, update))
            else:
                dropped.append({"client": c, "reason": reason, "released": released})
        # the server's checks see the round's uploads together (the size rule compares each with their median)
        reasons = server.check_updates([u.payload for _, u in accepted], [references[c] for c, _ in accepted])
        dropped += [{"client": c, "reason": why, "released": True} for (c, _), why in zip(accepted, reasons) if why]
        accepted = [pair for pair, why in zip(accepted, reasons) if why is None]
        dropped.sort(key=lambda d: d["client"])
        self.adapted.set_trainable([])
        return accepted, dropped, bytes_down
