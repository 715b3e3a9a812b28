"""Which Flower node is which fedlora client: the 'hello' exchange with every SuperNode that connects, and
replies matched to the clients they answer."""
from __future__ import annotations

import json
import time
from collections.abc import Iterable
from logging import INFO

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from ..errors import ConfigError
from ..federation import FederationServer


class NodeMap:
    """The federation's SuperNodes: `node_of[client]` and `client_of[node]`."""

    def __init__(self):
        self.node_of: dict[int, int] = {}
        self.client_of: dict[int, int] = {}
        self.eval_examples: dict[int, int] = {}  # the clients whose node has evaluation data: how many examples
        self.eval_errors: dict[int, str] = {}  # the clients whose node's evaluation data cannot be read: why

    def connect(self, grid: Grid, server: FederationServer, node_wait: float, timeout: float, resume: bool) -> None:
        """Wait up to `node_wait` seconds for a SuperNode per fedlora client: ask every node that connects which
        client it is (partition-id) and on how many examples it trains. A node that cannot say, two nodes with
        the same client id, or a client without a node when the wait is over stop the run. A node training on
        the shared data must report the server's own partition of it; one with its own `data-path` is trusted
        for its size, which the server then uses (set_client_sizes)."""
        fed = server.cfg.federation
        deadline = time.monotonic() + node_wait
        asked: set[int] = set()
        sizes = list(server.client_sizes)
        while True:
            new = [node for node in grid.get_node_ids() if node not in asked]
            asked |= set(new)
            hello = [Message(RecordDict({"config": ConfigRecord({"phase": "hello"})}), dst_node_id=node,
                             message_type=MessageType.QUERY) for node in new]
            wait = max(1.0, min(timeout, deadline - time.monotonic()))
            for reply in grid.send_and_receive(hello, timeout=wait) if hello else []:
                client, examples = self._introduce(reply, server, resume)
                self.node_of[client], self.client_of[reply.metadata.src_node_id], sizes[client] = (
                    reply.metadata.src_node_id, client, examples)
            missing = sorted(set(range(fed.num_clients)) - set(self.node_of))
            if not missing:
                break
            if time.monotonic() >= deadline:
                raise ConfigError(f"no SuperNode for clients {missing} within node-wait = {node_wait:g} s "
                                  f"({len(self.node_of)} of {fed.num_clients} clients connected)")
            time.sleep(0.5)
        server.set_client_sizes(sizes)
        log(INFO, "fedlora clients on this federation: %s, examples %s", sorted(self.node_of), sizes)

    def _introduce(self, reply: Message, server: FederationServer, resume: bool) -> tuple[int, int]:
        """The client a node's hello reply names and its examples, after the checks of connect."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise ConfigError(f"SuperNode {node} cannot take part: {reply.error.reason}")
        answer = reply.content["config"]
        client, examples = int(answer["client"]), int(answer["examples"])
        if client in self.node_of:
            raise ConfigError(f"SuperNodes {self.node_of[client]} and {node} both have partition-id {client}: "
                              "each needs its own (flower-supernode --node-config 'partition-id=...')")
        labels = json.loads(answer.get("labels", "null"))
        if labels is not None and server.label_names is not None and labels != server.label_names:
            raise ConfigError(f"SuperNode {node} (client {client}): its training data has the classes {labels}, the "
                              f"server's config {server.label_names}: every party needs the same classes (give "
                              "data.name a preset, or files whose labels cover every class)")
        if int(answer.get("eval-examples", 0)) > 0:
            self.eval_examples[client] = int(answer["eval-examples"])
        if answer.get("eval-error"):
            self.eval_errors[client] = f"SuperNode {node} (client {client}): {answer['eval-error']}"
        if not answer["own-data"] and examples != server.client_sizes[client]:
            raise ConfigError(f"SuperNode {node} (client {client}) has {examples} examples of the shared "
                              f"training data, the server's partition gives it {server.client_sizes[client]}:"
                              " its data file or config differs from the server's")
        if examples < 1:
            raise ConfigError(f"SuperNode {node} (client {client}) has no training examples")
        if resume and server.method.keeps_own_state and not answer["keeps-state"]:
            raise ConfigError(f"resume: SuperNode {node} (client {client}) keeps no state of its own, and "
                              f"{server.cfg.method.name}'s clients keep what the server never had: start "
                              "each SuperNode with the state-dir of the stopped run (flower-supernode "
                              "--node-config '... state-dir=\"/path\"')")
        return client, examples

    def by_client(self, sent: list[Message], replies: Iterable[Message]) -> dict[int, Message]:
        """Each reply under the fedlora client it answers. The SuperLink's own error reply for a node that is
        gone carries no source node, only the id of the message it answers."""
        asked = {m.metadata.message_id: self.client_of[m.metadata.dst_node_id] for m in sent if m.metadata.message_id}
        by_client = {}
        for reply in replies:
            client = asked.get(reply.metadata.reply_to_message_id, self.client_of.get(reply.metadata.src_node_id))
            if client is not None:
                by_client[client] = reply
        return by_client

    def absence(self, client: int) -> str | None:
        """Why a client cannot be reached (None: it can)."""
        return None if client in self.node_of else "has no SuperNode"
