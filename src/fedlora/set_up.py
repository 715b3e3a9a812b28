"""Round 0 on the server: the method's set-up exchange (Fed-SB's is a federated SVD of the clients' first-step
gradients), with every reply checked like a round's update, every byte counted and every private release
charged; and the reply the server computes itself on public data (fedsb.init_data = "public")."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .comm import payload_bytes
from .data.presets import relabel
from .errors import RoundFailed
from .experiment import load_task_data, task_kind
from .init_sb import client_reply
from .methods import InitContext, Request
from .methods.base import State
from .seeding import derive_seed, generator, rng
from .tasks import ClassificationTask
from .validation import check_set_up_replies

if TYPE_CHECKING:
    from .federation import FederationServer


class SetUpExchange:
    """One run of the set-up exchange. `send(request, clients)` is the runtime's: the clients compute their
    replies to a methods.Request and it returns {client: reply}, or an error message (str) for a client that
    sent none. `secure_sum(request, clients)`, when the runtime has secure aggregation, serves the method's
    sums instead: it returns the sum of the replies, the clients in it and {client: why} for those left out;
    no reply is seen, so none is checked (the protocol's clipping range bounds each)."""

    def __init__(self, server: FederationServer, send, secure_sum=None):
        self.server, self.send, self.secure_sum = server, send, secure_sum
        self.traffic = {"up": 0, "down": 0}
        self.dropped: list[dict] = []
        self.charged: set[tuple[int, int]] = set()

    def run(self) -> tuple[dict, State]:
        """The exchange and the initial evaluation, logged; the round's record and the exchange's broadcast."""
        server, t0 = self.server, time.time()
        ctx = InitContext(sorted(server.init_examples), generator(server.cfg.seed, "init"), ask=self.ask,
                          ask_sum=self.ask_secure_sum if self.secure_sum is not None else None,
                          ask_public=lambda request: public_reply(server, request))
        try:
            exchange = server.method.initialise(ctx)
        except RoundFailed:
            server.log_failed_round(0, ctx.clients, [self.dropped], t0)
            raise
        bytes_down = self.traffic["down"] + payload_bytes(exchange.broadcast) * server.cfg.federation.num_clients
        record = server.record(0, exchange.clients, None, self.traffic["up"], bytes_down, 0.0,
                               server.maybe_evaluate(0, exchange.broadcast), t0)
        record["dropped"] = self.dropped
        if exchange.delta_to_base:
            record["delta_to_base"] = exchange.delta_to_base
        server.run.log(record)
        return record, exchange.broadcast

    def drop(self, client: int, request: Request, why: str) -> None:
        self.dropped.append({"client": client, "reason": f"set-up phase '{request.phase}': {why}"})

    def charge(self, clients: list[int], release: int) -> None:
        """Charge each client's private release once, whatever its checks say."""
        for c in clients:
            if self.server.ledger is not None and (c, release) not in self.charged:
                self.charged.add((c, release))
                self.server.charge_init(c)

    def ask(self, request: Request, asked: list[int]) -> dict[int, State]:
        """The replies to a request that passed the server's checks (validation.check_set_up_replies)."""
        server = self.server
        self.traffic["down"] += payload_bytes(request.arrays) * len(asked)
        got = self.send(request, asked)
        replies = {c: got[c] for c in asked if c in got and not isinstance(got[c], str)}
        for c in asked:
            if c not in replies:
                self.drop(c, request, got.get(c) or "sent no reply")
        self.traffic["up"] += sum(payload_bytes(reply) for reply in replies.values() if isinstance(reply, dict))
        self.charge(list(replies), request.release)
        ledger = server.ledger
        reasons = check_set_up_replies(
            server.cfg, request, list(replies.values()), [server.init_examples[c] for c in replies],
            server.plan.init_noise_multiplier(ledger.noise_multiplier) if ledger is not None else None,
            [server.client_sizes[c] for c in replies])
        for c, why in zip(list(replies), reasons):
            if why is not None:
                self.drop(c, request, why)
                del replies[c]
        return replies

    def ask_secure_sum(self, request: Request, asked: list[int]) -> tuple[State, list[int]]:
        self.traffic["down"] += payload_bytes(request.arrays) * len(asked)
        total, summed, left_out = self.secure_sum(request, asked)
        for c, why in left_out.items():
            self.drop(c, request, why)
        self.traffic["up"] += payload_bytes(total) * len(summed)
        self.charge(summed, request.release)
        return total, summed


def public_reply(server: FederationServer, request: Request) -> dict[str, torch.Tensor]:
    """A set-up reply computed by the server on fedsb.public_data's init examples (nothing is sent)."""
    cfg, task = server.cfg, server.task
    public_data = load_task_data(cfg.fedsb.public_data, task_kind(cfg.data, cfg.model.name))
    public = public_data.train
    if isinstance(task, ClassificationTask):  # its labels as the task's class ids
        public = relabel(public, public_data.label_names, task.data.label_names)
    chosen = rng(cfg.seed, "public").permutation(len(public))[:cfg.fedsb.init_examples]
    torch.manual_seed(derive_seed(cfg.seed, "public"))
    size = cfg.train.batch_size
    batches = (task.batch(chosen[i:i + size], public) for i in range(0, len(chosen), size))
    return client_reply(server.adapted, request, batches, lambda batch: task.example_losses(server.model, batch))
