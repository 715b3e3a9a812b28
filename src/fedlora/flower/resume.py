"""A resumed Flower run: the nodes start a new Flower run with none of what they kept, so every node gets the
server's whole state after the checkpoint's round (and W0 when the method changes it) and keeps it; a client
that keeps state of its own (FedSA-LoRA's B) reloads it from its node's state-dir."""
from __future__ import annotations

from collections.abc import Callable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from ..federation import FederationServer
from .nodes import NodeMap
from .records import flatten, to_record


def resync(grid: Grid, server: FederationServer, nodes: NodeMap, message: Callable[..., Message], r: int,
           timeout: float) -> set[int]:
    """Send the server's state after round r to every node; the clients whose node took it."""
    state = {f"method/{k}": v for k, v in flatten(server.method.state_dict()).items()}
    if server.method.changes_base:
        state |= {f"base/{k}": v for k, v in server.adapted.base_weights().items()}
    trained = {}  # for a method whose clients keep their own state: each one's last round (up to r)
    for row in server.run.rows() if server.method.keeps_own_state else []:
        if 0 < row["round"] <= r:
            trained |= {c: row["round"] for c in row.get("clients") or []}
    messages = [message(c, MessageType.QUERY, "resync", r, None, {"last-trained": trained.get(c, 0)})
                for c in sorted(nodes.node_of)]
    record = to_record(state)
    for m in messages:
        m.content["arrays"] = record
    replies = nodes.by_client(messages, grid.send_and_receive(messages, timeout=timeout))
    return {c for c, reply in replies.items() if not reply.has_error()}
