"""A Flower Message-API strategy that runs a fedlora method, in the shape of Flower's own FedAvg: configure_train
turns the round's sampled clients into TRAIN messages, aggregate_train turns the replies into outcomes and
hands them to the server core (federation.FederationServer.close_round: the same checks, aggregation, log and
records as the in-process simulator), configure_evaluate / aggregate_evaluate carry the round's broadcast and,
in evaluated rounds, the federated evaluation: the global model to every node with evaluation data, which
replies with its metrics and "num-examples" (the server core logs them and their example-weighted mean).
Who is who (nodes.py), a resumed run (resume.py) and rounds through SecAgg+ (secure.py) have modules of their
own; Flower sends the method's downloads, uploads and broadcasts as ArrayRecords and counts their bytes.

Stages on the wire, per node: a QUERY 'hello' (which fedlora client is this node), for Fed-SB a QUERY
'set-up' per phase of its set-up exchange (fedsb.init: one or two Flower rounds), then per round a TRAIN
(download -> upload) and, when the method broadcasts after aggregation (FedEx-LoRA, FLoRA, and Fed-SB's B and
A once), an EVALUATE to every node that carries the broadcast; in an evaluated round an EVALUATE, carrying the
global model, to every node with evaluation data (one message with the broadcast, when there is one).
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

from .. import progress
from ..comm import payload_bytes
from ..errors import ConfigError, RoundFailed
from ..client import ClientUpdate
from ..federation import FederationServer, Outcome, federated_evaluation
from ..privacy.randomness import refuse_seeded
from .nodes import NodeMap
from .records import flower_bytes, from_record, keep_for_audit, privacy_settings, to_record
from .resume import resync

FLOWER_BYTES = "flower_bytes.json"  # Flower's own count of the ArrayRecord bytes, per round, up and down
RESUME_COMMAND = "`fedlora flower run APP CONNECTION --resume`"


def check_supported(cfg, resume: bool = False, secagg: float | None = None, server: bool = True) -> None:
    """Refuse what Flower cannot run, before anything loads; `server`: the ServerApp's check (a node does not
    know the run's secagg-threshold)."""
    refuse_seeded(cfg, "on Flower")
    if secagg is not None:
        from .secure import check_secure

        check_secure(cfg)
    if cfg.train.keep_optimizer_state:
        raise ConfigError("train.keep_optimizer_state: not supported on Flower (a ClientApp process answers "
                          "one message and keeps no optimizer between rounds)")
    if cfg.federation.on_too_few_clients == "retry":
        raise ConfigError("federation.on_too_few_clients = 'retry': not supported on Flower; use 'stop'")
    if server and cfg.privacy.distributed and secagg is None:
        raise ConfigError("privacy.mechanism = 'distributed' needs secure aggregation on Flower (the run config "
                          "entry secagg-threshold): each client's message is noised only with its share of the "
                          "noise, and the server must see only their sum")


class FedloraStrategy(Strategy):
    def __init__(self, server: FederationServer, round_timeout: float = 600, node_wait: float = 120,
                 resume: bool = False, secagg: float | None = None, federated_eval: bool = True):
        check_supported(server.cfg, resume, secagg)
        self.server = server
        self.federated_eval = federated_eval  # the nodes evaluate on their own data (run config federated-eval)
        server.client_evaluator = self.evaluate_clients
        self.grid: Grid | None = None
        self.evaluating: list[int] = []  # the clients the evaluate messages being sent ask to evaluate
        self.delivered: int | None = None  # the last round whose broadcast went out with its evaluation
        self.client_results: dict[int, dict | str] = {}  # the last evaluate replies, by client
        self._eval_sent: list[Message] = []
        self.resume = resume
        self.secagg = secagg  # SecAgg+'s reconstruction threshold (a fraction of the round's clients), or None
        self.round_timeout = round_timeout
        self.node_wait = node_wait
        self.nodes = NodeMap()
        self.out_of_sync: set[int] = set()  # clients that missed a broadcast and so hold a stale model
        self.flower_bytes: dict[int, dict[str, int]] = {}  # round -> Flower's count of bytes up and down
        self.last_record: dict | None = None
        self.broadcast: dict = {}  # what every node receives after the last exchange
        self._sent: dict[int, tuple] = {}

    def summary(self) -> None:
        fed = self.server.cfg.federation
        log(INFO, "fedlora %s: %d clients, %d per round, %d rounds", self.server.cfg.method.name, fed.num_clients,
            fed.clients_per_round, fed.rounds)

    # -- messages ---------------------------------------------------------------------------------
    def _count(self, r: int, way: str, record: ArrayRecord) -> None:
        """Flower's count of a record sent in round r: "up", "down" (the method's payloads, which the log counts
        too) or "eval" (the global model sent for federated evaluation)."""
        counts = self.flower_bytes.setdefault(r, {"up": 0, "down": 0})
        counts[way] = counts.get(way, 0) + flower_bytes(record)

    def _message(self, client: int, kind: str, phase: str, r: int, arrays: dict | None = None,
                 settings: dict | None = None) -> Message:
        content = RecordDict({"config": ConfigRecord({"phase": phase, "round": r, "client": client} | (settings or {}))})
        if arrays is not None:
            record = to_record(arrays)
            self._count(r, "down", record)
            content["arrays"] = record
        return Message(content, dst_node_id=self.nodes.node_of[client], message_type=kind, group_id=str(r))

    def _privacy(self, client: int) -> dict:
        """Under DP, what a node trains with (FederationServer.privacy_for); the node checks it against its own
        plan (FederationPlan.check_client_privacy)."""
        return privacy_settings(self.server.privacy_for(client), self.server.update_clip())

    def _set_up_settings(self, client: int) -> dict:
        """What a node's set-up reply needs from the server's plan: its set-up examples (from every node's
        size, which no node knows), and under DP its privacy settings."""
        return {"init-examples": int(self.server.init_examples.get(client, 0))} | self._privacy(client)

    def _log_dropped(self, r: int, dropped: list[dict]) -> None:
        for d in dropped:
            log(WARNING, "round %d: dropped client %d: %s", r, d["client"], d["reason"])

    def connect(self, grid: Grid) -> None:
        """Wait for a SuperNode per client and learn each one's size and evaluation data (NodeMap.connect); say
        which nodes cannot evaluate, and what the run's evaluation will be."""
        self.nodes.connect(grid, self.server, self.node_wait, self.round_timeout, self.resume)
        for why in self.nodes.eval_errors.values():
            log(WARNING, "fedlora: takes no part in evaluation: %s", why)
        evaluating = sorted(self.nodes.eval_examples) if self.federated_eval else []
        if self.nodes.eval_examples and self.federated_eval:
            log(INFO, "fedlora federated evaluation: clients %s, examples %s", evaluating,
                [self.nodes.eval_examples[c] for c in evaluating])
        notes = self.server.evaluation_notes(evaluating, "the run config entry federated-eval=false")
        for note in notes:
            log(WARNING, "fedlora: %s", note)
        self.server.warnings += notes

    # -- the set-up exchange --------------------------------------------------------------------
    def initialise(self, grid: Grid) -> dict:
        """Round 0: the method's set-up exchange, each of its phases one QUERY round to the set-up clients."""
        server = self.server

        def send(request, clients: list[int]) -> dict:
            messages = [self._message(c, MessageType.QUERY, "set-up", 0, request.arrays or None,
                                      {"request": json.dumps(request.settings())} | self._set_up_settings(c))
                        for c in clients if c in self.nodes.node_of]
            by_client = self.nodes.by_client(messages, grid.send_and_receive(messages, timeout=self.round_timeout))
            return {c: self._reply_arrays(0, c, by_client.get(c)) for c in clients}

        secure_sum = None
        if self.secagg is not None:
            from .secure import set_up_sums

            secure_sum = set_up_sums(grid, server, self.nodes, self.secagg, self.round_timeout, self._set_up_settings)
        record, self.broadcast = server.initialise(send, secure_sum=secure_sum)
        self._log_dropped(0, record["dropped"])
        return record

    def _reply_arrays(self, r: int, client: int, reply: Message | None) -> dict | str:
        """The tensors a client's reply carries, counted; or why there are none."""
        if client not in self.nodes.node_of:
            return "has no SuperNode"
        if reply is None:
            return f"no answer within {self.round_timeout:g} s"
        if reply.has_error():
            return f"failed on its node: {reply.error.reason}"
        try:
            record = reply.content["arrays"]
            arrays = from_record(record, self.server.device)
        except Exception as err:  # a reply without arrays, or arrays that are no tensors
            why = str(err).splitlines()[0] if isinstance(err, ValueError) and str(err) else type(err).__name__
            return f"sent no readable tensors ({why})"
        self._count(r, "up", record)
        return arrays

    # -- a round ----------------------------------------------------------------------------------
    def _downloads(self, clients: list[int]) -> tuple[dict[int, dict], list[Outcome], int]:
        """The round's clients that can train, each with its download; the outcomes of the others; the bytes
        sent."""
        downloads, absent, bytes_down = {}, [], 0
        for c in clients:
            if c not in self.nodes.node_of or c in self.out_of_sync:
                why = self.nodes.absence(c) or "missed a broadcast and holds a stale model"
                absent.append(Outcome(c, reason=why))
                continue
            downloads[c] = self.server.method.download(c)
            bytes_down += payload_bytes(downloads[c])
        return downloads, absent, bytes_down

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = server_round
        clients = self.server.sample_clients(r)
        downloads, absent, bytes_down = self._downloads(clients)
        messages = [self._message(c, MessageType.TRAIN, "train", r, download, self._privacy(c))
                    for c, download in downloads.items()]
        self._sent[r] = (clients, messages, absent, bytes_down, time.time())
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = server_round
        clients, sent, outcomes, bytes_down, t0 = self._sent.pop(r)
        by_client = self.nodes.by_client(sent, replies)
        for m in sent:
            c = self.nodes.client_of[m.metadata.dst_node_id]
            got = self._reply_arrays(r, c, by_client.get(c))
            if isinstance(got, str):
                outcomes.append(Outcome(c, reason=got))
                continue
            metrics = by_client[c].content["metrics"] if "metrics" in by_client[c].content else {}
            within = bool(metrics["within-clip"]) if "within-clip" in metrics else None
            update = ClientUpdate(payload=got, loss=float(metrics.get("loss", float("nan"))), within_clip=within)
            outcomes.append(Outcome(c, update, released=True))
        outcomes.sort(key=lambda o: o.client)
        return self._close(r, clients, outcomes, bytes_down, t0)

    def secure_round(self, grid: Grid, r: int) -> tuple[ArrayRecord, MetricRecord]:
        """Round r through Flower's SecAgg+: the server gets the weighted mean of the uploads of the clients
        that stayed, never an upload, and applies the method's rule to it. The per-upload checks cannot see
        a masked upload: SecAgg+'s clipping range bounds every value instead (a node refuses to exceed it)."""
        from .secure import distributed_round, secure_round

        t0 = time.time()
        clients = self.server.sample_clients(r)
        downloads, absent, bytes_down = self._downloads(clients)
        settings = {c: self._privacy(c) for c in downloads}
        if self.server.distributed:  # the clients' noised integers: the sum is released as it is unmasked
            outcomes, total = distributed_round(grid, self.server, self.nodes, downloads, r, self.secagg,
                                                self.round_timeout, settings)
            keep_for_audit(f"round{r}-sum", lambda: {"sum": total,
                                                     "clients": [o.client for o in outcomes if o.reason is None]})
            return self._close(r, clients, sorted(absent + outcomes, key=lambda o: o.client), bytes_down, t0,
                               distributed_sum=total)
        outcomes, mean = secure_round(grid, self.server, self.nodes, downloads, r, self.secagg,
                                      self.round_timeout, settings)
        return self._close(r, clients, sorted(absent + outcomes, key=lambda o: o.client), bytes_down, t0, mean)

    def _close(self, r: int, clients: list[int], outcomes: list[Outcome], bytes_down: int, t0: float,
               secure_mean: dict | None = None, distributed_sum=None) -> tuple[ArrayRecord, MetricRecord]:
        """The server core closes the round; what Flower's loop gets back: the global state and the metrics."""
        server = self.server
        try:
            record, self.broadcast = server.close_round(r, clients, outcomes, bytes_down, t0,
                                                        secure_mean=secure_mean, distributed_sum=distributed_sum)
        except RoundFailed:
            self._log_dropped(r, server.run.logged["attempts"][-1])
            raise
        self._log_dropped(r, record["dropped"])
        self.last_record = record
        metrics = {"clients": float(len(record["clients"]))}
        if record["train_loss"] is not None:
            metrics["train_loss"] = float(record["train_loss"])
        return to_record(server.method.eval_state()), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Flower's evaluate messages after a round's aggregation: the round's broadcast (FedEx-LoRA's residuals,
        FLoRA's stacked factors, Fed-SB's B and A in round 0) to every node, which applies it to its copy of the
        model, and to each client of `self.evaluating` the global model ("model"), which it evaluates."""
        model = to_record(self.server.method.eval_state()) if self.evaluating else None
        messages = []
        for c in sorted(self.nodes.node_of):
            if not self.broadcast and c not in self.evaluating:
                continue
            message = self._message(c, MessageType.EVALUATE, "evaluate", server_round, self.broadcast or None)
            if c in self.evaluating:
                message.content["model"] = model
                self._count(server_round, "eval", model)
            messages.append(message)
        self._eval_sent = messages
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The replies to the evaluate messages: a node that did not apply the broadcast holds a stale model and
        takes no further part; each evaluating client's metrics (or why it has none) go to
        `self.client_results`. Returns their example-weighted mean (Flower's convention), if any."""
        by_client = self.nodes.by_client(self._eval_sent, replies)
        if self.broadcast:
            applied = {c for c, m in by_client.items() if not m.has_error()}
            missed = set(self.nodes.node_of) - applied
            if missed:
                log(WARNING, "round %d: clients %s missed the broadcast and take no further part",
                    server_round, sorted(missed))
            self.out_of_sync |= missed
        self.client_results = {c: self._evaluation(by_client.get(c)) for c in self.evaluating}
        evaluation = federated_evaluation(self.client_results)
        return _metrics(evaluation["mean"]) if evaluation and evaluation["clients"] else None

    def _evaluation(self, reply: Message | None) -> dict | str:
        """A client's evaluation from its reply: its metrics and "examples", or why it has none."""
        if reply is None:
            return f"no evaluation within {self.round_timeout:g} s"
        if reply.has_error():
            return f"failed on its node: {reply.error.reason}"
        if "config" in reply.content and "eval-error" in reply.content["config"]:
            return str(reply.content["config"]["eval-error"])
        metrics = dict(reply.content["metrics"])
        return {k: float(v) for k, v in metrics.items() if k != "num-examples"} | {
            "examples": int(metrics["num-examples"])}

    def evaluate_clients(self, r: int, broadcast: dict) -> dict[int, dict | str]:
        """Federated evaluation of round r (the server core's client_evaluator): one evaluate message per node,
        carrying the round's broadcast and, to each node with evaluation data, the global model; the replies."""
        if not self.federated_eval:
            return {}
        self.broadcast = broadcast
        self.evaluating = [c for c in sorted(self.nodes.eval_examples) if c not in self.out_of_sync]
        stale = {c: "missed a broadcast and holds a stale model" for c in self.nodes.eval_examples
                 if c in self.out_of_sync}
        try:
            self._exchange_evaluate(self.grid, r)
            self.delivered = r
        finally:
            self.evaluating = []
        return self.client_results | stale | {c: why for c, why in self.nodes.eval_errors.items()}

    # -- the run ----------------------------------------------------------------------------------
    def _exchange_evaluate(self, grid: Grid, r: int) -> None:
        messages = self.configure_evaluate(r, ArrayRecord(), ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=self.round_timeout) if messages else []
        self.aggregate_evaluate(r, replies)

    def _send_broadcast(self, grid: Grid, r: int) -> None:
        """The round's broadcast, unless its evaluation carried it."""
        if self.delivered != r and self.broadcast:
            self._exchange_evaluate(grid, r)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config=None, evaluate_config=None, evaluate_fn=None) -> Result:
        """The whole run, as the simulator's: round 0 (set-up), federation.rounds rounds, export, summary."""
        server = self.server
        started = time.time()
        self.grid = grid
        if timeout is not None:
            self.round_timeout = timeout
        self.summary()
        if not self.resume:  # before the wait for the nodes
            server.refuse_existing_run(f"{RESUME_COMMAND} continues it")
        self.connect(grid)
        with server.open_run(self.resume, f"{RESUME_COMMAND} continues it") as start:
            return self._run(grid, start, num_rounds, started)

    def _run(self, grid: Grid, start: int, num_rounds: int | None, started: float) -> Result:
        server = self.server
        rounds = num_rounds or server.cfg.federation.rounds
        if start == 0:
            self.last_record = self.initialise(grid)
            self._send_broadcast(grid, 0)
            self._checkpoint(0, rounds)
            start = 1
        else:
            self.flower_bytes = {int(k): v for k, v in server.runtime_state.get("flower_bytes", {}).items()}
            applied = resync(grid, server, self.nodes, self._message, start - 1, self.round_timeout)
            self.out_of_sync = set(self.nodes.node_of) - applied
            log(INFO, "fedlora: resumed after round %d; clients %s hold the server's state", start - 1, sorted(applied))
            if self.out_of_sync:
                log(WARNING, "clients %s did not take the server's state and take no further part",
                    sorted(self.out_of_sync))
        result = Result()
        for r in range(start, rounds + 1):
            if self.secagg is not None:
                arrays, metrics = self.secure_round(grid, r)
            else:
                messages = self.configure_train(r, ArrayRecord(), ConfigRecord(), grid)
                replies = grid.send_and_receive(messages, timeout=self.round_timeout)
                arrays, metrics = self.aggregate_train(r, replies)
            result.arrays = arrays
            result.train_metrics_clientapp[r] = metrics
            self._send_broadcast(grid, r)
            self._checkpoint(r, rounds)
            if self.last_record["eval"]:
                result.evaluate_metrics_serverapp[r] = _metrics(self.last_record["eval"])
            if (self.last_record.get("client_eval") or {}).get("clients"):
                result.evaluate_metrics_clientapp[r] = _metrics(self.last_record["client_eval"]["mean"])
        server.finish(started)
        server.run.write_json(FLOWER_BYTES, self.flower_bytes)
        for line in progress.client_eval_lines(server.last_client_eval):  # the run's end: each party's evaluation
            log(INFO, "fedlora final evaluation, %s", line)
        return result

    def _checkpoint(self, r: int, rounds: int) -> None:
        """The server core's checkpoint after round r (after the round's broadcast, whose bytes it counts), and
        the round's line in the run's log stream."""
        self.server.save_checkpoint(r, {"out_of_sync": sorted(self.out_of_sync), "flower_bytes": self.flower_bytes})
        log(INFO, "fedlora %s", progress.round_line(self.last_record, rounds))


def _metrics(values: dict) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in values.items()})
