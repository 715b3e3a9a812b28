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

from .. import progress, run_folder
from ..comm import payload_bytes
from ..errors import ConfigError, RoundFailed
from ..client import ClientUpdate
from ..federation import FederationPlan, FederationServer
from ..privacy.randomness import refuse_seeded
from .records import flatten, flower_bytes, from_record, to_record

FLOWER_BYTES = "flower_bytes.json"  # Flower's own count of the ArrayRecord bytes, per round, up and down
RESUME_COMMAND = "`fedlora flower run APP CONNECTION --resume`"


def check_supported(cfg, resume: bool = False, secagg: float | None = None) -> None:
    refuse_seeded(cfg, "on Flower")
    if secagg is not None:
        from .secure import check_secure

        check_secure(cfg)
    if cfg.train.keep_optimizer_state:
        raise ConfigError("train.keep_optimizer_state: not supported on Flower (a ClientApp process answers "
                          "one message and keeps no optimizer between rounds)")
    if cfg.federation.on_too_few_clients == "retry":
        raise ConfigError("federation.on_too_few_clients = 'retry': not supported on Flower; use 'stop'")


class FedloraStrategy(Strategy):
    def __init__(self, server: FederationServer, round_timeout: float = 600, node_wait: float = 120,
                 resume: bool = False, secagg: float | None = None):
        check_supported(server.cfg, resume, secagg)
        self.server = server
        self.resume = resume
        self.secagg = secagg  # SecAgg+'s reconstruction threshold (a fraction of the round's clients), or None
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

    def _privacy(self, client: int) -> dict:
        """Under DP, what a node trains with: the noise multiplier and delta calibrated from every node's size,
        and its set-up examples; the node checks them against its own plan (FederationPlan.check_client_privacy)."""
        server = self.server
        if server.ledger is None:
            return {}
        return {"noise-multiplier": float(server.ledger.noise_multiplier), "delta": float(server.ledger.delta),
                "init-examples": int(server.plan.init_examples.get(client, 0))}

    # -- who is who -----------------------------------------------------------------------------
    def connect(self, grid: Grid) -> None:
        """Wait up to node-wait seconds for a SuperNode per fedlora client: ask every node that connects which
        client it is (partition-id) and on how many examples it trains. A node that cannot say, two nodes with
        the same client id, or a client without a node when the wait is over stop the run. A node training on
        the shared data must report the server's own partition of it; one with its own `data-path` is trusted
        for its size, which then weights its updates."""
        fed, server = self.server.cfg.federation, self.server
        deadline = time.monotonic() + self.node_wait
        asked: set[int] = set()
        sizes = list(server.client_sizes)
        while True:
            new = [node for node in grid.get_node_ids() if node not in asked]
            asked |= set(new)
            hello = [Message(RecordDict({"config": ConfigRecord({"phase": "hello"})}), dst_node_id=node,
                             message_type=MessageType.QUERY) for node in new]
            wait = max(1.0, min(self.round_timeout, deadline - time.monotonic()))
            for reply in grid.send_and_receive(hello, timeout=wait) if hello else []:
                node = reply.metadata.src_node_id
                if reply.has_error():
                    raise ConfigError(f"SuperNode {node} cannot take part: {reply.error.reason}")
                answer = reply.content["config"]
                client, examples = int(answer["client"]), int(answer["examples"])
                if client in self.nodes:
                    raise ConfigError(f"SuperNodes {self.nodes[client]} and {node} both have partition-id {client}: "
                                      "each needs its own (flower-supernode --node-config 'partition-id=...')")
                if not answer["own-data"] and examples != server.client_sizes[client]:
                    raise ConfigError(f"SuperNode {node} (client {client}) has {examples} examples of the shared "
                                      f"training data, the server's partition gives it {server.client_sizes[client]}:"
                                      " its data file or config differs from the server's")
                if examples < 1:
                    raise ConfigError(f"SuperNode {node} (client {client}) has no training examples")
                if self.resume and server.method.keeps_own_state and not answer["keeps-state"]:
                    raise ConfigError(f"resume: SuperNode {node} (client {client}) keeps no state of its own, and "
                                      f"{server.cfg.method.name}'s clients keep what the server never had: start "
                                      "each SuperNode with the state-dir of the stopped run (flower-supernode "
                                      "--node-config '... state-dir=\"/path\"')")
                self.nodes[client], self.clients[node], sizes[client] = node, client, examples
            missing = sorted(set(range(fed.num_clients)) - set(self.nodes))
            if not missing:
                break
            if time.monotonic() >= deadline:
                raise ConfigError(f"no SuperNode for clients {missing} within node-wait = {self.node_wait:g} s "
                                  f"({len(self.nodes)} of {fed.num_clients} clients connected)")
            time.sleep(0.5)
        server.client_sizes[:] = sizes  # the method's list too: weights come from the nodes' sizes
        server.plan = FederationPlan(server.cfg, server.client_sizes)
        log(INFO, "fedlora clients on this federation: %s, examples %s", sorted(self.nodes), sizes)

    # -- the set-up exchange --------------------------------------------------------------------
    def initialise(self, grid: Grid) -> dict:
        """Round 0: the method's set-up exchange, each of its phases one QUERY round to the set-up clients."""
        server = self.server

        def send(request, clients: list[int]) -> dict:
            messages = [self._message(c, MessageType.QUERY, "set-up", 0, request.arrays or None,
                                      {"request": json.dumps(request.settings())} | self._privacy(c))
                        for c in clients if c in self.nodes]
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

        record = server.initialise(send, secure_sum=self._secure_set_up(grid) if self.secagg is not None else None)
        self._log_dropped(0, record["dropped"])
        return record

    def _secure_set_up(self, grid: Grid):
        """The set-up phases' sums through SecAgg+ (Fed-SB's replies are sums the server only adds up): each
        client weighs 1, the clipping range is the largest value any reply to the phase can hold."""
        from ..init_sb import reply_bound
        from .secure import fitins, secure_mean, sum_state

        server = self.server

        def secure_sum(request, clients: list[int]) -> tuple[dict, list[int], dict[int, str]]:
            clip = reply_bound(server.adapted, request)
            asked = {self.nodes[c]: fitins(request.arrays, 0, 1, 1, clip, request.settings(), self._privacy(c))
                     for c in clients if c in self.nodes}
            outcome = secure_mean(grid, asked, 0, self.secagg, self.round_timeout, 1, clip)
            summed = sorted(self.clients[n] for n in outcome.summed)
            left_out = {c: "has no SuperNode" if c not in self.nodes else "left the secure aggregation (failed, "
                        f"or no answer within {self.round_timeout:g} s)" for c in clients if c not in summed}
            if outcome.mean is None:
                return {}, [], left_out
            return sum_state(outcome, request.expected, len(summed), server.device), summed, left_out

        return secure_sum

    # -- a round ----------------------------------------------------------------------------------
    def _downloads(self, clients: list[int]) -> tuple[dict[int, dict], list[dict], int]:
        """The round's clients that can train, each with its download; the ones dropped; the bytes sent."""
        downloads, dropped, bytes_down = {}, [], 0
        for c in clients:
            if c not in self.nodes or c in self.out_of_sync:
                why = "has no SuperNode" if c not in self.nodes else "missed a broadcast and holds a stale model"
                dropped.append({"client": c, "reason": why})
                continue
            downloads[c] = self.server.method.download(c)
            bytes_down += payload_bytes(downloads[c])
        return downloads, dropped, bytes_down

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server, r = self.server, server_round
        clients = server.sample_clients(r)
        downloads, dropped, bytes_down = self._downloads(clients)
        messages = [self._message(c, MessageType.TRAIN, "train", r, download, self._privacy(c))
                    for c, download in downloads.items()]
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
            accepted.append((c, ClientUpdate(payload=payload, trained=start | server.method.pad(payload),
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

    def secure_round(self, grid: Grid, r: int) -> tuple[ArrayRecord, MetricRecord]:
        """Round r through Flower's SecAgg+: the server gets the weighted mean of the uploads of the clients
        that stayed, never an upload, and applies the method's rule to it. The per-upload checks cannot see
        a masked upload: SecAgg+'s clipping range bounds every value instead (a node refuses to exceed it)."""
        from .secure import fitins, mean_state, secure_mean

        server, t0 = self.server, time.time()
        clients = server.sample_clients(r)
        examples = server.cfg.federation.weighting == "examples"
        weight = {c: server.client_sizes[c] if examples else 1 for c in clients}
        downloads, dropped, bytes_down = self._downloads(clients)
        heaviest = max(weight.values())
        asked = {self.nodes[c]: fitins(download, r, weight[c], heaviest, settings=self._privacy(c))
                 for c, download in downloads.items()}
        outcome = secure_mean(grid, asked, r, self.secagg, self.round_timeout, max(weight.values()))
        summed = sorted(self.clients[n] for n in outcome.summed)
        dropped += [{"client": self.clients[n], "reason": "left the secure aggregation (failed, or no answer "
                     f"within {self.round_timeout:g} s)"} for n in asked if n not in outcome.summed]
        self._log_dropped(r, dropped)
        min_clients = server.cfg.federation.min_clients
        if outcome.mean is None or len(summed) < min_clients:
            server.log_failed_round(r, clients, [dropped], t0)
            raise RoundFailed(f"round {r}: secure aggregation summed {len(summed)} of {len(clients)} clients "
                              f"(SecAgg+'s threshold, or federation.min_clients = {min_clients}, not met)")
        if server.ledger is not None:
            for c in summed:
                server.charge_training(c)
        mean = mean_state(outcome, server.reference(summed[0], r))
        aggregate = server.method.aggregate([mean], [1.0], summed, r)
        server.last_broadcast = aggregate.broadcast
        up = payload_bytes(mean) * len(summed)  # the payloads' own size; SecAgg+'s traffic comes on top
        record = self.last_record = server.record(r, summed, None, up, bytes_down, None, server.maybe_evaluate(r), t0)
        record["dropped"], record["secure_aggregation"] = dropped, True
        server.log(record)
        return to_record(server.method.eval_state()), MetricRecord({"clients": float(len(summed))})

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
        if not self.resume:  # before the wait for the nodes
            server.refuse_existing_run(f"{RESUME_COMMAND} continues it")
        self.connect(grid)
        with server.open_run(self.resume) as start:
            return self._run(grid, start, num_rounds, started)

    def _run(self, grid: Grid, start: int, num_rounds: int | None, started: float) -> Result:
        server = self.server
        rounds = num_rounds or server.cfg.federation.rounds
        if start == 0:
            self.last_record = self.initialise(grid)
            server.log(self.last_record)
            self._exchange(grid, 0)
            self._checkpoint(0, rounds)
            start = 1
        else:
            self._resync(grid, start - 1)
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
            self._exchange(grid, r)
            self._checkpoint(r, rounds)
            if self.last_record["eval"]:
                result.evaluate_metrics_serverapp[r] = _metrics(self.last_record["eval"])
        server.finish(started)
        run_folder.atomic_write(server.out / FLOWER_BYTES, json.dumps(self.flower_bytes, indent=2))
        return result

    def _checkpoint(self, r: int, rounds: int) -> None:
        """The server core's checkpoint after round r, and the round's line in the run's log stream."""
        self.server.save_checkpoint(r, {"out_of_sync": sorted(self.out_of_sync), "flower_bytes": self.flower_bytes})
        log(INFO, "fedlora %s", progress.round_line(self.last_record, rounds))

    def _resync(self, grid: Grid, r: int) -> None:
        """A resumed run: the nodes start a new Flower run with none of what they kept, so every node gets
        the server's whole state after round r (and W0 when the method changes it) and keeps it."""
        server = self.server
        saved = server.runtime_state
        self.flower_bytes = {int(k): v for k, v in saved.get("flower_bytes", {}).items()}
        state = {f"method/{k}": v for k, v in flatten(server.method.state_dict()).items()}
        if server.method.changes_base:
            state |= {f"base/{k}": v for k, v in server.adapted.base_weights().items()}
        trained = {}  # for a method whose clients keep their own state: each one's last round (up to r)
        for row in run_folder.read_log(server.out / run_folder.ROUNDS_LOG) if server.method.keeps_own_state else []:
            if 0 < row["round"] <= r:
                trained |= {c: row["round"] for c in row.get("clients") or []}
        messages = [self._message(c, MessageType.QUERY, "resync", r, None, {"last-trained": trained.get(c, 0)})
                    for c in sorted(self.nodes)]
        record = to_record(state)
        for m in messages:
            m.content["arrays"] = record
        applied = {c for c, reply in self._by_client(messages, grid.send_and_receive(
            messages, timeout=self.round_timeout)).items() if not reply.has_error()}
        self.out_of_sync = set(self.nodes) - applied
        log(INFO, "fedlora: resumed after round %d; clients %s hold the server's state", r, sorted(applied))
        if self.out_of_sync:
            log(WARNING, "clients %s did not take the server's state and take no further part",
                sorted(self.out_of_sync))


def _metrics(values: dict) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in values.items()})
