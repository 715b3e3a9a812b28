"""Secure aggregation of a round's uploads with Flower's SecAgg+: SecAggPlusWorkflow on the server,
secaggplus_mod on the nodes; nothing of the protocol is written here. The server learns only the weighted
mean of the uploads (weights: the clients' examples, or 1 each), which is what the method's rule needs for
the methods whose server rule is a weighted mean of the payloads; the phases of Fed-SB's set-up exchange
go through it as well, each client weighing 1, and the server learns only each phase's sum.

Flower's SecAgg+ runs in its legacy workflow: it asks a legacy Strategy (configure_fit) for each sampled
node's FitIns and gives the strategy's aggregate_fit the unmasked mean as a FitRes. `RoundStrategy` is
that strategy for one round; on the node the TRAIN message the mod passes on carries the FitIns, and the
ClientApp answers with a FitRes (`download_of`, `fitres_content`).

Integer rounds (`secure_integer_sum` on the server, `secagg_mod` on the nodes) carry each client's vector of
integers in [0, 2^bits) and give the server only their exact sum mod 2^bits (no weights, clipping or
quantisation). The masks are Flower's own: `pseudo_rand_gen` seeds numpy's RandomState with a 32-bit fold of
each 32-byte seed (and draws in [0, 2^bits - 2]), so the masks' strength is that of Flower's SecAgg+ as
shipped."""
from __future__ import annotations

import json
import math
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
# flwr is pinned to 1.41.* (pyproject.toml): the integer rounds run Flower's own SecAgg+ stages of this version
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.common import (Code, FitIns, FitRes, Status, bytes_to_ndarray, ndarray_to_bytes, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
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
    return run_round(grid, fitins_of, r, SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=threshold, max_weight=float(max_weight), clipping_range=clip,
        quantization_range=QUANTIZATION, timeout=timeout))


def run_round(grid, fitins_of: dict[int, FitIns], r: int, workflow: SecAggPlusWorkflow) -> RoundStrategy:
    strategy = RoundStrategy(fitins_of)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=r), strategy=strategy,
                            client_manager=SimpleClientManager())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: r})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([]), True)
    workflow(grid, context)
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


def distributed_round(grid, server, nodes, downloads: dict[int, dict], r: int, threshold: float, timeout: float,
                      settings: dict[int, dict]) -> tuple[list, torch.Tensor | None]:
    """Round r under distributed DP: each client of `downloads` trains and sends its message (integers mod
    2^bits, noised by the client) into SecAgg+'s integer sum. SecAgg+'s threshold, as a count, is raised to the
    plan's n_min, so that the server cannot unmask a sum of fewer clients' noise shares (and each node checks
    it). Returns each asked client's federation.Outcome and the sum mod 2^bits (None when there is none)."""
    from ..federation import Outcome

    plan = server.client_dp.mechanism
    # a sum the run would not release must not be unmasked at all: n_min (at least federation.min_clients)
    count = max(plan.min_survivors, math.ceil(threshold * len(downloads) - 1e-9), 2)
    asked = {nodes.node_of[c]: fitins(download, r, 1, 1, settings=settings[c]) for c, download in downloads.items()}
    result = secure_integer_sum(grid, asked, r, count, timeout, plan.bits)
    summed = {nodes.client_of[n] for n in result.summed}
    outcomes = [Outcome(c, released=True) if c in summed else
                Outcome(c, reason=f"left the secure aggregation (failed, or no answer within {timeout:g} s)")
                for c in downloads]
    return outcomes, result.total


def round_threshold(context: Context) -> int:
    """On a node, during a SecAgg+ round: the protocol's threshold the server set up (the fewest clients whose
    vectors any unmasked sum holds)."""
    return int(SecAggPlusState(**context.state.config_records[RECORD_KEY_STATE]).threshold)


def integer_fitres_content(message: torch.Tensor) -> RecordDict:
    """The FitRes of an integer round: the client's message, one int64 array, which secagg_mod masks."""
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([message.cpu().numpy().astype(np.int64)]), 1, {})
    return compat.fitres_to_recorddict(res, keep_input=True)


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


# -- integer rounds: vectors mod 2^bits, summed exactly ----------------------------------------------------

INTEGER_BITS = "integer-bits"  # in a FitIns's config: an integer round, its modulus 2^bits
MASKING = ContextVar("fedlora_integer_masking", default=False)  # set while secagg_mod masks the reply it asks for


def masked_collect_stage() -> bool:
    """Whether the ClientApp is answering from inside secagg_mod's masked-vector stage of an integer round:
    what it returns there is masked before it leaves, and nowhere else."""
    return MASKING.get()


@dataclass
class IntegerSum:
    total: torch.Tensor | None  # the vectors' sum mod 2^bits (int64); None when the round did not complete
    summed: list[int]  # the nodes whose vectors are in it


def secure_integer_sum(grid, fitins_of: dict[int, FitIns], r: int, threshold: int, timeout: float,
                       bits: int) -> IntegerSum:
    """One integer round of SecAgg+ at modulus 2^bits over the nodes in `fitins_of` (their FitIns get
    INTEGER_BITS = bits); each node's ClientApp answers with a FitRes holding one integer array in
    [0, 2^bits), which `secagg_mod` masks as is. Returns the arrays' exact sum mod 2^bits and who is in it.

    `threshold` is an absolute number of nodes (Flower reads the int 1 as the fraction 1.0, every node: it is
    refused here, as is any threshold below 2). The sum Flower unmasks always holds at least `threshold`
    nodes' vectors: after collecting the masked vectors, SecAggPlusWorkflow._check_threshold halts the round
    unless every sampled node has at least `threshold` neighbours among the nodes whose vectors came back
    (with num_shares=1.0 a node's neighbours are all the sampled nodes), and the unmask stage removes the
    masks of exactly those nodes: a node lost later only withholds shares, and with fewer than `threshold`
    shares for some node the round halts. Each node's `_unmask` also refuses to send shares when fewer than
    `threshold` nodes are active. With fewer nodes asked than `threshold`, no round is run.

    Exactness: the workflow is Flower's, unchanged. With clipping_range 1, quantization_range 2 and weight
    factor 1 per node, its affine map of the unmasked sum S (mod 2^bits) of n nodes is x = (S - n) * (2 / n),
    which is inverted here with rounding (see below); this is shorter than overriding its unmask stage."""
    if threshold < 2:
        raise ValueError(f"integer secure sum: threshold {threshold} < 2 would release one node's vector "
                         "(and Flower reads the int 1 as every node)")
    if not 1 < bits <= 48:
        raise ValueError(f"integer secure sum: bits = {bits} outside 2..48, which the exact inversion covers")
    if len(fitins_of) >= 1 << bits:
        raise ValueError(f"integer secure sum: {len(fitins_of)} nodes reach 2^{bits}, where the nodes' weight "
                         "factors (1 each, summed mod 2^bits) would wrap around")
    if len(fitins_of) < threshold:
        return IntegerSum(None, [])
    asked = {node: FitIns(ins.parameters, ins.config | {INTEGER_BITS: bits}) for node, ins in fitins_of.items()}
    result = run_round(grid, asked, r, SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=int(threshold), max_weight=1.0, clipping_range=1.0,
        quantization_range=2, modulus_range=1 << bits, timeout=timeout))
    if result.mean is None:
        return IntegerSum(None, [])
    # Flower's unmask stage: S - 1 (dequantize, exact: integers below 2^53), minus n - 1 (exact), times
    # fl(2 / n): x = fl((S - n) * fl(2 / n)). Here fl(x * (n / 2)) (n / 2 exact) = (S - n)(1 + e) with
    # |e| <= 3 * 2^-53 + 2^-105, and |S - n| < 2^48 + n, so the error is below 0.1 for any n < 2^47:
    # rounding gives S - n exactly.
    n = len(result.summed)
    total = (np.rint(result.mean[0] * (n / 2)).astype(np.int64) + n) % (1 << bits)
    return IntegerSum(torch.from_numpy(total), result.summed)


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod, except at the collect stage of an integer round (its FitIns has INTEGER_BITS):
    there the ClientApp's reply, a FitRes holding one integer array y in [0, 2^bits), is masked as it is, with
    weight factor 1 and no weight, clipping or quantisation, so that the server unmasks the exact sum.

    Masking is addition mod 2^bits, so Flower's own stage masks a stand-in, which it turns into [q, 0...]
    (values below its clipping range quantise to exactly 0; q is its weight factor for the stand-in's
    weight), and [1 - q, y] is added to the masked vector mod 2^bits: the masks, the shares' decryption and
    their checks stay Flower's. A reply that is not one integer array in [0, 2^bits), or a round whose
    modulus is not 2^bits, is refused with a ValueError."""
    stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
    fit_config = msg.content.config_records.get("fitins.config", {})
    if (msg.metadata.message_type != MessageType.TRAIN or stage != Stage.COLLECT_MASKED_VECTORS
            or INTEGER_BITS not in fit_config):
        return secaggplus_mod(msg, context, call_next)
    bits = int(fit_config[INTEGER_BITS])
    shift = []

    def stand_in(msg: Message, context: Context) -> Message:
        state = SecAggPlusState(**context.state.config_records[RECORD_KEY_STATE])
        if state.mod_range != 1 << bits:
            raise ValueError(f"integer secure aggregation: the round's SecAgg+ modulus is {state.mod_range}, "
                             f"not 2^{bits} as its FitIns's '{INTEGER_BITS}' says")
        marker = MASKING.set(True)  # the ClientApp seals only inside this stage (masked_collect_stage)
        try:
            reply = call_next(msg, context)
        finally:
            MASKING.reset(marker)
        res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        arrays = parameters_to_ndarrays(res.parameters)
        if len(arrays) != 1 or not np.issubdtype(arrays[0].dtype, np.integer):
            raise ValueError(f"integer secure aggregation: the reply must hold one integer array, not "
                             f"{[str(a.dtype) for a in arrays]}")
        y = arrays[0]
        if y.size and (y.min() < 0 or y.max() >= state.mod_range):
            raise ValueError(f"integer secure aggregation: the reply holds values in [{y.min()}, {y.max()}], "
                             f"outside [0, 2^{bits})")
        # weight >= max_weight: Flower's weight ratio is >= 1 and keeps the stand-in's -inf below its clipping
        # range; q is the weight factor Flower computes for it (as its _collect_masked_vectors does)
        weight = math.ceil(state.max_weight)
        q = round(weight / state.max_weight * state.target_range)
        shift.extend([np.array([1 - q], dtype=np.int64), y.astype(np.int64)])
        res.parameters, res.num_examples = ndarrays_to_parameters([np.full(y.shape, -np.inf)]), weight
        reply.content.update(compat.fitres_to_recorddict(res, keep_input=True))
        return reply

    out = secaggplus_mod(msg, context, stand_in)
    record = out.content.config_records[RECORD_KEY_CONFIGS]
    masked = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
    record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in
                                     parameters_mod(parameters_addition(masked, shift), 1 << bits)]
    return out
