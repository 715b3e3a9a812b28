"""What every federated method shares: the global state, downloads, uploads, weighted averaging.

A method says how its adapters are parameterised, which factors a client trains and uploads, what the
server sends back and how it aggregates; the simulator (and any other runtime) only calls it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from ..adapters import AdaptedModel
from ..aggregation import combine
from ..config import Config
from ..errors import ConfigError

State = dict[str, torch.Tensor]


@dataclass
class Request:
    """One phase of a set-up exchange: what every asked client computes on its set-up examples and sends back
    (Fed-SB's phases are described in init_sb.py)."""
    phase: str
    expected: State  # a valid reply's keys, shapes and dtypes (meta tensors); checked like a round's update
    arrays: State = field(default_factory=dict)  # sent with the request to every asked client
    release: int = 0  # under DP, the private release the reply is computed from: each new one is charged
    signs: bool = False  # sketch phases: sketch sign(G) rather than G
    sketch_seed: int = 0  # the seed of the shared test matrices
    sketch_size: int = 0  # k, their columns

    def settings(self) -> dict:
        """The request's scalar fields (what a runtime sends beside its arrays)."""
        return {"phase": self.phase, "release": self.release, "signs": self.signs,
                "sketch_seed": self.sketch_seed, "sketch_size": self.sketch_size}


@dataclass
class InitContext:
    """What a method's initialisation may use (Fed-SB's needs the clients' first-step gradients)."""
    clients: list[int]  # the clients taking part in the set-up exchange
    generator: torch.Generator
    # sends a request to the given clients; returns the replies that passed the server's checks, by client
    # (the runtime counts the bytes, charges private releases and logs what it dropped)
    ask: Callable[[Request, list[int]], dict[int, State]] | None = None
    # the reply the server computes itself on fedsb.public_data: nothing is sent, no privacy is spent
    ask_public: Callable[[Request], State] | None = None


@dataclass
class Exchange:
    """The set-up exchange's outcome: what every client of the federation receives, and who contributed."""
    broadcast: State = field(default_factory=dict)  # sent to every client of the federation
    clients: list[int] = field(default_factory=list)


@dataclass
class Aggregate:
    base_change: State = field(default_factory=dict)  # layer -> d_out x d_in added to W0 everywhere
    broadcast: State = field(default_factory=dict)  # what every client receives after aggregation


def weighted_sum(payloads: list[State], weights: list[float], key: str) -> torch.Tensor:
    return combine([p[key] for p in payloads], weights)


class Method:
    name: ClassVar[str]
    parameterisation: ClassVar[str] = "lora"
    trains: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")  # factor kinds a client trains (+ the head)
    uploads: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")  # factor kinds a client sends (+ the head)
    downloads: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")  # factor kinds a client receives (+ the head)
    changes_base: ClassVar[bool] = False  # whether aggregation writes into W0 (FedEx-LoRA, FLoRA)
    # whether the server rule is a weighted sum of the payloads, so a robust rule may stand in for it
    linear_aggregation: ClassVar[bool] = True

    def __init__(self, adapted: AdaptedModel, cfg: Config, client_sizes: list[int]):
        self.adapted = adapted
        self.cfg = cfg
        self.client_sizes = client_sizes
        self.global_state: State = {}
        if cfg.server.aggregation != "mean" and not self.linear_aggregation:
            raise ConfigError(f"server.aggregation = '{cfg.server.aggregation}' needs a method whose server rule "
                              f"is a weighted sum (fedit, ffa, fedsb, fedsa, full), not '{self.name}'")

    # -- set-up -------------------------------------------------------------------------------
    def initialise(self, ctx: InitContext) -> Exchange:
        """Default: PEFT's LoRA init and the head from the run's seed, derived alike on every client."""
        self.global_state = self.seed_state(ctx.generator)
        return Exchange()

    def seed_state(self, generator: torch.Generator) -> State:
        """The part of the initial global state that the server and every client derive from the seed alone."""
        return self.adapted.lora_init(generator) | self.adapted.head_init(generator)

    def init_reads_client_data(self) -> bool:
        """Whether the set-up exchange computes on the clients' data (and so, under DP, costs privacy)."""
        return False

    def init_releases(self) -> int:
        """Private releases each set-up client makes under DP (each charged to its budget, planned alike)."""
        return 0

    def init_traffic(self) -> tuple[State, State]:
        """What one set-up client sends and receives in the set-up exchange, before round 1, all phases
        together, as meta tensors of the real shapes and dtypes."""
        return {}, {}

    # -- one round ----------------------------------------------------------------------------
    def client_state(self, client: int, round_: int) -> State:
        """The state a client trains from (the global state, plus anything it keeps itself)."""
        return self.global_state

    def download(self, client: int) -> State:
        return {k: self.global_state[k] for k in self.adapted.keys_of(self.downloads)}

    def trainable_keys(self) -> list[str]:
        return self.adapted.keys_of(self.trains)

    def upload(self, client: int, trained: State) -> State:
        return self.upload_of(trained)

    def upload_of(self, state: State) -> State:
        """The tensors a client holding `state` sends (no side effects: the server uses it as the reference
        an update is checked against)."""
        return {k: state[k] for k in self.adapted.keys_of(self.uploads)}

    def aggregate(self, payloads: list[State], weights: list[float], clients: list[int], round_: int) -> Aggregate:
        server = self.cfg.server
        for key in payloads[0]:
            self.global_state[key] = combine([p[key] for p in payloads], weights, server.aggregation,
                                             server.trim_fraction)
        return Aggregate()

    def receive(self, broadcast: State) -> State:
        """A client's side of a broadcast (the set-up exchange's, or a round's after aggregation): it updates
        the client's copy of the global state; returns what it added to W0 per layer."""
        self.global_state = self.global_state | broadcast
        return {}

    def eval_state(self) -> State:
        """The global model that is evaluated and exported."""
        return self.global_state

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"global": self.global_state}

    def load_state_dict(self, state: dict) -> None:
        self.global_state = state["global"]
