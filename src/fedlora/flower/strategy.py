"""A Flower Message-API strategy that runs a fedlora method: the method object, the client sampling, the
update checks, the aggregation, the log and the export are the in-process simulator's own; Flower sends the
method's downloads, uploads and broadcasts as ArrayRecords and counts their bytes.

Stages on the wire, per node: a QUERY 'hello' (which fedlora client is this node), for Fed-SB a QUERY
'set-up' per phase of its set-up exchange (fedsb.init: one or two Flower rounds), then per round a TRAIN (download -> upload) and,
when the method broadcasts after aggregation (FedEx-LoRA, FLoRA, and Fed-SB's B and A once), an EVALUATE
to every node that carries the broadcast.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from .. import run_folder
from ..comm import payload_bytes
from ..errors import ConfigError, RoundFailed
from ..client import ClientUpdate
from ..federation import FederationServer
from .records import flower_bytes, from_record, to_record

FLOWER_BYTES = "flower_bytes.json"  # Flower's own count of the ArrayRecord bytes, per round, up and down


def check_supported(cfg) -> None:
    if cfg.train.keep_optimizer_state:
        raise ConfigError("train.keep_optimizer_state: not supported on Flower (a ClientApp process answers "
                          "one message and keeps no optimizer between rounds)")
    if cfg.federation.on_too_few_clients == "retry":
        raise ConfigError("federation.on_too_few_clients = 'retry': not supported on Flower; use 'stop'")


class FedloraStrategy(Strategy):
    def __init__(self, server: FederationServer, round_timeout: float = 600, node_wait: float = 120):
        check_supported(server.cfg)
        self.server = server
        server.keep_broadcast = True
        self.round_timeout = round_timeout
        self.node_wait = node_wait
        self.nodes: dict[int, int] = {}  # fedlora client -> Flower node id
        self.clients: dict[int, int] = {}  # Flower node id -> fedlora client
        self.out_of_sync: set[int] = set()  # clients that missed a broadcast and so hold a stale model
        self.flower_bytes: dict[int, dict[str, int]] = {}  # round -> Flower's count of bytes up and down
        self.last_record: dict | None = None
        self._sent: dict[int, tuple[list[int], int, float, list[dict]]] = {}

    def summary(self) -> None:
        fed = self.server.cfg.federation
        log(INFO, "fedlora %s: %d clients, %d per round, %d rounds", self.server.cfg.method.name, fed.num_clients,
            fed.clients_per_round, fed.rounds)

    # -- traffic --------------------------------------------------------------------------------
    def _count(self, r: int, way: str, record: ArrayRecord) -> None:
        counts = self.flower_bytes.setdefault(r, {"up": 0, "down": 0})
        counts[way] += flower_bytes(record)

    def _message(self, client: int, kind: str, phase: str, r: int, arrays: dict | None = None,
                 settings: dict | None = None) -> Message:
        content = RecordDict({"config": ConfigRecord({"phase": phase, "round": r, "client": client} | (settings or {}))})
        if arrays is not None:
            record = to_record(arrays)
            self._count(r, "down", record)
            content["arrays"] = record
        return Message(content, dst_node_id=self.nodes[client], message_type=kind, group_id=str(r))

    # -- who is who -----------------------------------------------------------------------------
    def connect(self, grid: Grid) -> None:
        """Wait for the federation's SuperNodes and learn which fedlora client (partition-id) each one is."""
        wanted = self.server.cfg.federation.num_clients
        deadline = time.monotonic() + self.node_wait
        while len(list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
            time.sleep(0.5)
        hello = [Message(RecordDict({"config": ConfigRecord({"phase": "hello"})}), dst_node_id=node,
                         message_type=MessageType.QUERY) for node in grid.get_node_ids()]
        for reply in grid.send_and_receive(hello, timeout=self.round_timeout):
            if reply.has_error():
                log(WARNING, "node %s did not say which client it is: %s", reply.metadata.src_node_id,
                    reply.error.reason)
                continue
            client = int(reply.content["config"]["client"])
            if client in self.nodes:
                raise ConfigError(f"two SuperNodes have partition-id {client}: each needs its own")
            self.nodes[client] = reply.metadata.src_node_id
            self.clients[reply.metadata.src_node_id] = client
        log(INFO, "fedlora clients on this federation: %s", sorted(self.nodes))
        missing = sorted(set(range(wanted)) - set(self.nodes))
        if missing:
            log(WARNING, "no SuperNode for clients %s: they are dropped whenever they are sampled", missing)

    # -- the set-up exchange --------------------------------------------------------------------
    def initialise(self, grid: Grid) -> dict:
        """Round 0: the method's set-up exchange, each of its phases one QUERY round to the set-up clients."""
        server = self.server

        def send(request, clients: list[int]) -> dict:
            messages = [self._message(c, MessageType.QUERY, "set-up", 0, request.arrays or None,
                                      {"request": json.dumps(request.settings())}) for c in clients if c in self.nodes]
            by_client = self._by_client(messages, grid.send_and_receive(messages, timeout=self.round_timeout))
            replies = {}
            for c in clients:
                reply = by_client.get(c)
                if c not in self.nodes:
                    replies[c] = "has no SuperNode"
                elif reply is None:
                    replies[c] = f"no answer within {self.round_timeout:g} s"
                elif reply.has_error():
                    replies[c] = f"failed on its node: {reply.error.reason}"
                else:
                    try:
                        record = reply.content["arrays"]
                        replies[c] = from_record(record, server.device)
                    except Exception as err:  # a reply without arrays, or arrays that are no tensors
                        replies[c] = f"sent no readable tensors ({type(err).__name__})"
                        continue
                    self._count(0, "up", record)
            return replies

        record = server.initialise(send)
        self._log_dropped(0, record["dropped"])
        return record

    # -- a round ----------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server, r = self.server, server_round
        clients = server.sample_clients(r)
        messages, dropped, bytes_down = [], [], 0
        for c in clients:
            if c not in self.nodes or c in self.out_of_sync:
                why = "has no SuperNode" if c not in self.nodes else "missed a broadcast and holds a stale model"
                dropped.append({"client": c, "reason": why})
                continue
            download = server.method.download(c)
            bytes_down += payload_bytes(download)
            messages.append(self._message(c, MessageType.TRAIN, "train", r, download))
        self._sent[r] = (clients, messages, bytes_down, time.time(), dropped)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server, r = self.server, server_round
        clients, sent, bytes_down, t0, dropped = self._sent.pop(r)
        by_client = self._by_client(sent, replies)
        not_sent = {d["client"] for d in dropped}
        accepted = []
        for c in clients:
            if c in not_sent:
                continue
            reply = by_client.get(c)
            if reply is None:
                dropped.append({"client": c, "reason": f"no answer within {self.round_timeout:g} s"})
                continue
            if reply.has_error():
                dropped.append({"client": c, "reason": f"failed on its node: {reply.error.reason}"})
                continue
            try:
                record = reply.content["arrays"]
                payload = from_record(record, server.device)
            except Exception as err:  # a reply without arrays, or arrays that are no tensors
                why = str(err).splitlines()[0] if isinstance(err, ValueError) and str(err) else type(err).__name__
                dropped.append({"client": c, "reason": f"sent no readable tensors ({why})"})
                continue
            self._count(r, "up", record)
            start = server.method.client_state(c, r)
            if server.ledger is not None:
                server.charge_training(c)
            metrics = reply.content["metrics"] if "metrics" in reply.content else {}
            accepted.append((c, ClientUpdate(payload=payload, trained=start | payload,
                                             loss=float(metrics.get("loss", float("nan"))), optimizer_state=None)))
        # the server's checks see the round's uploads together (the size rule compares each with their median)
        reasons = server.check_updates([u.payload for _, u in accepted], [server.reference(c, r) for c, _ in accepted])
        dropped += [{"client": c, "reason": why} for (c, _), why in zip(accepted, reasons) if why]
        accepted = [pair for pair, why in zip(accepted, reasons) if why is None]
        self._log_dropped(r, dropped)
        min_clients = server.cfg.federation.min_clients
        if len(accepted) < min_clients:
            server.log_failed_round(r, clients, [dropped], t0)
            raise RoundFailed(f"round {r}: {len(accepted)} of {len(clients)} clients answered, fewer than "
                              f"federation.min_clients = {min_clients}")
        record = self.last_record = server.aggregate_round(r, accepted, dropped, bytes_down, t0)
        server.log(record)
        train = {"clients": float(len(accepted))}
        if record["train_loss"] is not None:
            train["train_loss"] = float(record["train_loss"])
        return to_record(server.method.eval_state()), MetricRecord(train)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The broadcast of the round (FedEx-LoRA's residuals, FLoRA's stacked factors, Fed-SB's B and A in
        round 0) to every node, which applies it to its copy of the model; evaluation itself is central."""
        broadcast = self.server.last_broadcast
        if not broadcast:
            return []
        return [self._message(c, MessageType.EVALUATE, "broadcast", server_round, broadcast)
                for c in sorted(self.nodes)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.server.last_broadcast:
            applied = {self.clients[m.metadata.src_node_id] for m in replies if not m.has_error()}
            missed = set(self.nodes) - applied
            if missed:
                log(WARNING, "round %d: clients %s missed the broadcast and take no further part",
                    server_round, sorted(missed))
            self.out_of_sync |= missed
        evaluation = self.last_record["eval"] if self.last_record else None
        return _metrics(evaluation) if evaluation else None

    def _by_client(self, sent: list[Message], replies: Iterable[Message]) -> dict[int, Message]:
        """Each reply under the fedlora client it answers. The SuperLink's own error reply for a node that is
        gone carries no source node, only the id of the message it answers."""
        asked = {m.metadata.message_id: self.clients[m.metadata.dst_node_id] for m in sent if m.metadata.message_id}
        by_client = {}
        for reply in replies:
            client = asked.get(reply.metadata.reply_to_message_id, self.clients.get(reply.metadata.src_node_id))
            if client is not None:
                by_client[client] = reply
        return by_client

    def _log_dropped(self, r: int, dropped: list[dict]) -> None:
        for d in dropped:
            log(WARNING, "round %d: dropped client %d: %s", r, d["client"], d["reason"])

    # -- the run ----------------------------------------------------------------------------------
    def _exchange(self, grid: Grid, r: int) -> None:
        replies = grid.send_and_receive(self.configure_evaluate(r, ArrayRecord(), ConfigRecord(), grid),
                                        timeout=self.round_timeout)
        self.aggregate_evaluate(r, replies)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config=None, evaluate_config=None, evaluate_fn=None) -> Result:
        """The whole run, as the simulator's: round 0 (set-up), federation.rounds rounds, export, summary."""
        server = self.server
        started = time.time()
        if timeout is not None:
            self.round_timeout = timeout
        self.summary()
        with server.open_run(resume=False):
            return self._run(grid, num_rounds, started)

    def _run(self, grid: Grid, num_rounds: int | None, started: float) -> Result:
        server = self.server
        self.connect(grid)
        self.last_record = self.initialise(grid)
        server.log(self.last_record)
        self._exchange(grid, 0)
        result = Result()
        for r in range(1, (num_rounds or server.cfg.federation.rounds) + 1):
            messages = self.configure_train(r, ArrayRecord(), ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=self.round_timeout)
            arrays, metrics = self.aggregate_train(r, replies)
            result.arrays = arrays
            result.train_metrics_clientapp[r] = metrics
            self._exchange(grid, r)
            if self.last_record["eval"]:
                result.evaluate_metrics_serverapp[r] = _metrics(self.last_record["eval"])
        server.finish(started)
        run_folder.atomic_write(server.out / FLOWER_BYTES, json.dumps(self.flower_bytes, indent=2))
        return result


def _metrics(values: dict) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in values.items()})
