"""Secure aggregation of a round's uploads with Flower's SecAgg+: SecAggPlusWorkflow on the server,
secaggplus_mod on the nodes; nothing of the protocol is written here. The server learns only the weighted
mean of the uploads (weights: the clients' examples, or 1 each), which is what the method's rule needs for
the methods whose server rule is a weighted mean of the payloads; the phases of Fed-SB's set-up exchange
go through it as well, each client weighing 1, and the server learns only each phase's sum.

Flower's SecAgg+ runs in its legacy workflow: it asks a legacy Strategy (configure_fit) for each sampled
node's FitIns and gives the strategy's aggregate_fit the unmasked mean as a FitRes. `RoundStrategy` is
that strategy for one round; on the node the TRAIN message the mod passes on carries the FitIns, and the
ClientApp answers with a FitRes (`download_of`, `fitres_content`)."""
from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
import flwr.compat.common.recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from ..errors import ConfigError
from ..methods import check_method

CLIP = 8.0  # SecAgg+'s clipping range for a round: each uploaded value, times its weight share, within +-CLIP
QUANTIZATION = 2 ** 22


def check_secure(cfg) -> None:
    """Refuse what secure aggregation cannot serve (the method's own rules: `Method.check_secure`); before any
    weights or data are loaded."""
    check_method(cfg).check_secure(cfg)
    if cfg.server.aggregation != "mean":
        raise ConfigError(f"secagg: server.aggregation = '{cfg.server.aggregation}' needs each client's upload; "
                          "secure aggregation gives only their weighted mean (use 'mean')")
    if cfg.federation.clients_per_round < 2:
        raise ConfigError("secagg: federation.clients_per_round must be at least 2 for secure aggregation")
    if cfg.privacy.per_client and cfg.privacy.clipping == "adaptive":
        raise ConfigError("secagg: privacy.clipping = 'adaptive' needs each client's bit (was its update within the "
                          "bound), which would reach the server outside the secure sum; use privacy.clipping = "
                          "'fixed' with secure aggregation")
    if cfg.adapter.client_ranks is not None:
        raise ConfigError("secagg: adapter.client_ranks gives the clients' uploads different shapes, which "
                          "secure aggregation cannot sum; leave one of the two out")


class _Node(ClientProxy):
    def __init__(self, node_id: int):
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):
        # SecAggPlusWorkflow reaches the nodes through the Grid; the proxy only names a node
        raise RuntimeError(f"node {self.node_id}: a secure-aggregation round sends its messages through the Grid")

    get_parameters = fit = evaluate = reconnect = get_properties


class RoundStrategy(LegacyStrategy):
    """The legacy Strategy SecAggPlusWorkflow drives for one round: the FitIns of each node, and the unmasked
    weighted mean and the nodes whose masked vectors it sums."""

    def __init__(self, fitins: dict[int, FitIns]):
        self.fitins = fitins
        self.mean: list[np.ndarray] | None = None
        self.summed: list[int] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Node(node), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.summed = [proxy.node_id for proxy, _ in results]
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def fitins(download: dict[str, torch.Tensor], r: int, weight: int, max_weight: int, clip: float = CLIP,
           request: dict | None = None, settings: dict | None = None) -> FitIns:
    """What a node gets: the arrays it needs, its weight, the clipping range, for a set-up phase the request
    (methods.Request.settings()), and any other `settings` (the round's privacy settings)."""
    keys = sorted(download)
    settings = {"round": r, "keys": json.dumps(keys), "weight": weight, "max-weight": max_weight,
                "clip": clip} | (settings or {})
    if request is not None:
        settings["request"] = json.dumps(request)
    return FitIns(ndarrays_to_parameters([download[k].detach().cpu().float().numpy() for k in keys]), settings)


def secure_mean(grid, fitins_of: dict[int, FitIns], r: int, threshold: float, timeout: float,
                max_weight: int, clip: float = CLIP) -> RoundStrategy:
    """One round of SecAgg+ over the nodes in `fitins_of`; the strategy holds the mean and who is in it."""
    strategy = RoundStrategy(fitins_of)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=r), strategy=strategy,
                            client_manager=SimpleClientManager())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: r})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([]), True)
    SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=threshold, max_weight=float(max_weight),
                       clipping_range=clip, quantization_range=QUANTIZATION, timeout=timeout)(grid, context)
    return strategy


def mean_state(strategy: RoundStrategy, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = sorted(reference)
    return {k: torch.as_tensor(v, dtype=reference[k].dtype, device=reference[k].device).reshape(reference[k].shape)
            for k, v in zip(keys, strategy.mean)}


def sum_state(strategy: RoundStrategy, expected: dict[str, torch.Tensor], clients: int,
              device) -> dict[str, torch.Tensor]:
    """A set-up phase's sum (each client weighs 1, so the sum is the mean times the clients), in float32 with
    `expected`'s shapes; sums of integer votes are integers and are rounded to them."""
    total = {}
    for k, v in zip(sorted(expected), strategy.mean):
        value = torch.as_tensor(v * clients, dtype=torch.float32, device=device).reshape(expected[k].shape)
        total[k] = value.round() if not expected[k].dtype.is_floating_point else value
    return total


# -- the node's side ---------------------------------------------------------------------------------------

def download_of(content: RecordDict, device) -> tuple[dict[str, torch.Tensor], dict]:
    ins = compat.recorddict_to_fitins(content, keep_input=True)
    keys = json.loads(ins.config["keys"])
    arrays = parameters_to_ndarrays(ins.parameters)
    return {k: torch.from_numpy(np.array(a)).to(device) for k, a in zip(keys, arrays)}, ins.config


def fitres_content(payload: dict[str, torch.Tensor], settings: dict, client: int) -> RecordDict:
    """The FitRes secaggplus_mod masks: the payload's values in key order, and the client's weight. A value
    beyond SecAgg+'s clipping range would be clipped silently: it is refused here instead."""
    share, clip = int(settings["weight"]) / int(settings["max-weight"]), float(settings["clip"])
    arrays = [payload[k].detach().cpu().float().numpy() for k in sorted(payload)]
    worst = max(float(np.abs(a).max()) for a in arrays if a.size) * share
    if worst > clip:
        raise ValueError(f"secure aggregation: client {client}'s upload reaches {worst:.3g} (times its weight "
                         f"share), beyond SecAgg+'s clipping range of +-{clip:g}")
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(settings["weight"]), {})
    return compat.fitres_to_recorddict(res, keep_input=True)


# -- the server's rounds through SecAgg+ -------------------------------------------------------------------

def secure_round(grid, server, nodes, downloads: dict[int, dict], r: int, threshold: float, timeout: float,
                 settings: dict[int, dict]) -> tuple[list, dict[str, torch.Tensor] | None]:
    """Round r's uploads through SecAgg+: each client of `downloads` trains and its upload enters the masked
    sum with its weight (server.client_weight). Returns each asked client's federation.Outcome (in the sum,
    or why not) and the weighted mean of the uploads in the sum (None when there is none)."""
    from ..federation import Outcome

    weight = {c: server.client_weight(c) for c in downloads}
    heaviest = max(weight.values(), default=1)
    asked = {nodes.node_of[c]: fitins(download, r, weight[c], heaviest, settings=settings[c])
             for c, download in downloads.items()}
    result = secure_mean(grid, asked, r, threshold, timeout, heaviest)
    summed = {nodes.client_of[n] for n in result.summed}
    outcomes = [Outcome(c, released=True) if c in summed else
                Outcome(c, reason=f"left the secure aggregation (failed, or no answer within {timeout:g} s)")
                for c in downloads]
    if result.mean is None:
        return outcomes, None
    return outcomes, mean_state(result, server.reference(min(summed), r))


def set_up_sums(grid, server, nodes, threshold: float, timeout: float, settings_of):
    """The set-up phases' sums through SecAgg+ (Fed-SB's replies are sums the server only adds up): each
    client weighs 1, the clipping range is the largest value any reply to the phase can hold. The function
    FederationServer.initialise takes as `secure_sum`."""
    from ..init_sb import reply_bound

    def secure_sum(request, clients: list[int]) -> tuple[dict, list[int], dict[int, str]]:
        clip = reply_bound(server.adapted, request)
        asked = {nodes.node_of[c]: fitins(request.arrays, 0, 1, 1, clip, request.settings(), settings_of(c))
                 for c in clients if c in nodes.node_of}
        result = secure_mean(grid, asked, 0, threshold, timeout, 1, clip)
        summed = sorted(nodes.client_of[n] for n in result.summed)
        left_out = {c: nodes.absence(c) or "left the secure aggregation (failed, or no answer within "
                    f"{timeout:g} s)" for c in clients if c not in summed}
        if result.mean is None:
            return {}, [], left_out
        return sum_state(result, request.expected, len(summed), server.device), summed, left_out

    return secure_sum
