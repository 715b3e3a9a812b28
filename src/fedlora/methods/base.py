"""What every federated method shares: the global state, downloads, uploads, weighted averaging.

A method says how its adapters are parameterised, which factors a client trains and uploads, what the
server sends back and how it aggregates; the simulator (and any other runtime) only calls it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from ..adapters import AdaptedModel
from ..aggregation import combine
from ..config import Config, changed_keys
from ..errors import ConfigError
from ..privacy.client_level import client_level_plan

State = dict[str, torch.Tensor]
METHODS: dict[str, type[Method]] = {}  # by config name (method.name): the built-in methods and register_method's


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


@dataclass(frozen=True)
class SetUpPlan:
    """A set-up exchange that computes on the clients' data: the examples it reads over all its clients (each
    client's share is proportional to its size), the private releases each client makes from them under DP
    (each charged to its budget), and their own noise multiplier (None: the training's)."""
    examples: int
    releases: int = 1
    noise_multiplier: float | None = None


@dataclass
class InitContext:
    """What a method's initialisation may use (Fed-SB's needs the clients' first-step gradients)."""
    clients: list[int]  # the clients taking part in the set-up exchange
    generator: torch.Generator
    # sends a request to the given clients; returns the replies that passed the server's checks, by client
    # (the runtime counts the bytes, charges private releases and logs what it dropped)
    ask: Callable[[Request, list[int]], dict[int, State]] | None = None
    # the same request when only the sum of the replies is needed: returns that sum (float32, the keys of
    # request.expected) and the clients in it; under secure aggregation the server never sees a reply
    ask_sum: Callable[[Request, list[int]], tuple[State, list[int]]] | None = None
    # the reply the server computes itself on fedsb.public_data: nothing is sent, no privacy is spent
    ask_public: Callable[[Request], State] | None = None

    def __post_init__(self):
        if self.ask_sum is None and self.ask is not None:
            self.ask_sum = self._sum_of_replies

    def _sum_of_replies(self, request: Request, clients: list[int]) -> tuple[State, list[int]]:
        replies = self.ask(request, clients)
        return {k: sum(reply[k].float() for reply in replies.values()) for k in request.expected}, list(replies)


@dataclass
class Exchange:
    """The set-up exchange's outcome: what every client of the federation receives, and who contributed."""
    broadcast: State = field(default_factory=dict)  # sent to every client of the federation
    clients: list[int] = field(default_factory=list)
    # per adapted layer, ||initial delta||_2 / ||W0||_2, for a set-up that starts away from W0
    delta_to_base: dict[str, float] = field(default_factory=dict)


@dataclass
class Aggregate:
    base_change: State = field(default_factory=dict)  # layer -> d_out x d_in added to W0 everywhere
    broadcast: State = field(default_factory=dict)  # what every client receives after aggregation


def weighted_sum(payloads: list[State], weights: list[float], key: str) -> torch.Tensor:
    return combine([p[key] for p in payloads], weights)


def methods_where(flag: str) -> str:
    """The registered methods whose class attribute `flag` is true, as a list for a message."""
    return ", ".join(name for name, method in METHODS.items() if getattr(method, flag))


METHOD_SECTIONS = ("fedsb", "hetlora")


class Method:
    name: ClassVar[str]
    parameterisation: ClassVar[str] = "lora"
    trains: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")  # factor kinds a client trains (+ the head)
    uploads: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")  # factor kinds a client sends (+ the head)
    downloads: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")  # factor kinds a client receives (+ the head)
    changes_base: ClassVar[bool] = False  # whether aggregation writes into W0 (FedEx-LoRA, FLoRA)
    # whether the server rule is a weighted sum of the payloads, so that a robust rule, secure aggregation or
    # client-level DP may stand in for the sum
    summed: ClassVar[bool] = True
    # whether the server's rule gives exactly the weighted sum of the clients' updates B_i A_i (None: not stated)
    exact: ClassVar[bool | None] = None
    # whether clients may hold different ranks (adapter.client_ranks): each trains, sends and receives the first
    # r_i components of the global rank-adapter.rank factors, which the server zero-pads back (see `cut`, `pad`)
    heterogeneous_ranks: ClassVar[bool] = False
    # whether a client's optimizer state may be kept across rounds (train.keep_optimizer_state): not where
    # the trained tensors change meaning between rounds (RoLoRA trains another factor, FedSVD re-factorises)
    carries_optimizer_state: ClassVar[bool] = True
    # the method sections of the config (Config's `fedsb`, `hetlora`) this method reads
    settings: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def ignored_settings(cls, cfg: Config) -> list[str]:
        """Warnings for method sections given away from their defaults that this method never reads (a recipe
        may keep them for another method it is switched to, so they are not refused)."""
        found = []
        for section in METHOD_SECTIONS:
            keys = sorted(changed_keys(getattr(cfg, section)))
            if keys and section not in cls.settings:
                found.append(f"{', '.join(f'{section}.{k}' for k in keys)} {'has' if len(keys) == 1 else 'have'} "
                             f"no effect with method.name = '{cls.name}' (only a method of the {section} family "
                             "reads them)")
        return found

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse, with a ConfigError naming the key, a config this method cannot run; a method with rules of
        its own extends it. `methods.check_method` calls it once a config is built."""
        if cfg.train.keep_optimizer_state and not cls.carries_optimizer_state:
            raise ConfigError(f"train.keep_optimizer_state: method '{cls.name}' changes what a client trains "
                              "between rounds, so its optimizer state cannot be carried over")
        if cfg.adapter.client_ranks is not None and not cls.heterogeneous_ranks:
            raise ConfigError(f"adapter.client_ranks: method '{cls.name}' cannot aggregate clients of different "
                              f"ranks (methods that can: {methods_where('heterogeneous_ranks')})")
        if cfg.privacy.per_client:
            cls.check_client_level(cfg)
        if cfg.server.aggregation != "mean" and not cls.summed:
            raise ConfigError(f"server.aggregation = '{cfg.server.aggregation}' needs a method whose server rule "
                              f"is a weighted sum ({methods_where('summed')}), not '{cls.name}'")

    @classmethod
    def check_client_level(cls, cfg: Config) -> None:
        """Refuse, with a ConfigError, what client-level DP cannot privatise: a server rule that is no sum of the
        uploads (the noise is calibrated to a sum), a set-up exchange that reads the clients' data, and a plan the
        accountant cannot fit into privacy.epsilon (privacy.client_level.client_level_plan)."""
        if not cls.summed:
            raise ConfigError(f"privacy.unit = 'client': method '{cls.name}' cannot be private at the client level: "
                              "its server needs each client's factors, not their sum, to which the noise is added "
                              f"(methods that can: {methods_where('summed')})")
        if cls.set_up_plan(cfg) is not None:
            raise ConfigError(f"privacy.unit = 'client': method '{cls.name}''s set-up exchange reads the clients' "
                              "data, which client-level DP does not privatise; set up from public data "
                              "(fedsb.init_data = 'public' with fedsb.public_data)")
        client_level_plan(cfg)

    @classmethod
    def check_secure(cls, cfg: Config) -> None:
        """Refuse, with a ConfigError, this method's settings that secure aggregation cannot serve: it gives the
        server only the weighted sum of the uploads (flower/secure.py checks what holds for every method)."""
        if not cls.summed:
            raise ConfigError(f"secagg: method '{cls.name}' cannot use secure aggregation: its server needs "
                              f"each client's factors, not their sum (it serves {methods_where('summed')})")

    def __init__(self, adapted: AdaptedModel, cfg: Config, client_sizes: list[int]):
        self.adapted = adapted
        self.cfg = cfg
        self.client_sizes = client_sizes
        self.global_state: State = {}
        self.ranks = list(cfg.adapter.client_ranks) if cfg.adapter.client_ranks else None

    # -- set-up -------------------------------------------------------------------------------
    def initialise(self, ctx: InitContext) -> Exchange:
        """Default: PEFT's LoRA init and the head from the run's seed, derived alike on every client."""
        self.global_state = self.seed_state(ctx.generator)
        return Exchange()

    def seed_state(self, generator: torch.Generator) -> State:
        """The part of the initial global state that the server and every client derive from the seed alone."""
        return self.adapted.lora_init(generator) | self.adapted.head_init(generator)

    @classmethod
    def set_up_plan(cls, cfg: Config) -> "SetUpPlan | None":
        """The set-up exchange's use of the clients' data before round 1 (None: it reads none, and costs no
        privacy); every party plans it alike from the config."""
        return None

    def init_traffic(self) -> tuple[State, State]:
        """What one set-up client sends and receives in the set-up exchange, before round 1, all phases
        together, as meta tensors of the real shapes and dtypes."""
        return {}, {}

    # -- one round ----------------------------------------------------------------------------
    def client_state(self, client: int, round_: int, own: State | None = None) -> State:
        """The state a client trains from: the global state as it holds it, with `own`, what it kept of its
        last training (own_part), over it."""
        return self.at_rank(self.global_state, client) | (own or {})

    def own_part(self, trained: State) -> State:
        """What a client keeps of its trained state and never sends (FedSA-LoRA's own B); nothing by default.
        The runtime keeps it for the client and hands it back to client_state."""
        return {}

    def download(self, client: int) -> State:
        return self.cut({k: self.global_state[k] for k in self.adapted.keys_of(self.downloads)}, client)

    def take_download(self, client: int, download: State) -> None:
        """A client's side of its download: its copy of the global state (zero-padded to adapter.rank)."""
        self.global_state = self.global_state | self.pad(download)

    def trains_in(self, round_: int) -> tuple[str, ...]:
        """The factor kinds a client trains in round `round_` (RoLoRA alternates; most methods: `trains`)."""
        return self.trains

    def uploads_in(self, round_: int) -> tuple[str, ...]:
        """The factor kinds a client sends in round `round_` (most methods: `uploads`)."""
        return self.uploads

    def trainable_keys(self, round_: int) -> list[str]:
        return self.adapted.keys_of(self.trains_in(round_))

    def upload(self, client: int, trained: State, round_: int) -> State:
        return self.cut(self.upload_of(trained, round_), client)

    def upload_of(self, state: State, round_: int) -> State:
        """The tensors a client holding `state` sends in round `round_` (no side effects: the server uses it
        as the reference an update is checked against)."""
        return {k: state[k] for k in self.adapted.keys_of(self.uploads_in(round_))}

    def aggregate(self, payloads: list[State], weights: list[float], clients: list[int], round_: int) -> Aggregate:
        server = self.cfg.server
        payloads = [self.pad(p) for p in payloads]
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

    # -- heterogeneous ranks ------------------------------------------------------------------
    def rank_of(self, client: int) -> int:
        return self.ranks[client] if self.ranks is not None else self.adapted.rank

    def cut(self, state: State, client: int) -> State:
        """The state's LoRA factors cut to the client's rank r_i (A's first r_i rows, B's first r_i columns):
        what the client sends and receives; the state itself when every client holds adapter.rank."""
        r = self.rank_of(client)
        if r == self.adapted.rank:
            return state
        return {k: v[:r] if k.endswith(".lora_A") else v[:, :r] if k.endswith(".lora_B") else v
                for k, v in state.items()}

    def pad(self, state: State) -> State:
        """Factors cut to a client's rank, zero-padded back to adapter.rank (other tensors as they are)."""
        if self.ranks is None:
            return state
        full = self.adapted.rank
        return {k: F.pad(v, (0, 0, 0, full - v.shape[0])) if k.endswith(".lora_A") and len(v) < full
                else F.pad(v, (0, full - v.shape[1])) if k.endswith(".lora_B") and v.shape[1] < full else v
                for k, v in state.items()}

    def trained_numbers(self) -> dict[str, int]:
        """How many numbers a client of the full rank trains: its adapter (or target weights) and the head apart."""
        params = self.adapted.parameters_by_key()
        return {"adapter": sum(params[k].numel() for k in self.adapted.keys_of(self.trains, head=False)),
                "head": sum(p.numel() for p in self.adapted.head_params.values())}

    def at_rank(self, state: State, client: int) -> State:
        """The state as a client of rank r_i holds it: the components of its trained factors beyond r_i zero
        (a frozen factor, FFA-LoRA's A, stays whole: the zero columns of B leave its rows unused)."""
        if self.rank_of(client) == self.adapted.rank:
            return state
        trained = set(self.adapted.keys_of(self.trains, head=False))
        return state | self.pad(self.cut({k: v for k, v in state.items() if k in trained}, client))

    def gradient_step(self, client: int, params: dict[str, torch.Tensor]) -> Callable[[], None] | None:
        """What runs on the gradients of a client's trained `params` (by state key) before each optimizer step;
        None: nothing. For a client below adapter.rank it zeroes the gradient of the components beyond its
        rank, so they stay zero (their gradient is zero already, but DP-SGD's noise is not)."""
        r = self.rank_of(client)
        if r == self.adapted.rank:
            return None
        factors = [(k.endswith(".lora_A"), p) for k, p in params.items() if k.endswith((".lora_A", ".lora_B"))]

        def mask():
            for rows, p in factors:
                if p.grad is not None:
                    (p.grad[r:] if rows else p.grad[:, r:]).zero_()
        return mask

    # -- checkpoints --------------------------------------------------------------------------
    keeps_own_state = False  # its clients keep state the server never receives (own_part)

    def state_dict(self) -> dict:
        return {"global": self.global_state}

    def load_state_dict(self, state: dict) -> None:
        self.global_state = state["global"]
