"""Integer rounds of SecAgg+ (flower.secure.secure_integer_sum, the ClientApp's secure_mod): each node's
vector of integers in [0, 2^bits) reaches the server only masked, and the server gets their exact sum
mod 2^bits, without the nodes that fail."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="flwr (the 'flower' extra of fedlora) is not installed")

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import (Code, FitIns, FitRes, Status, bytes_to_ndarray, ndarray_to_bytes,  # noqa: E402
                         ndarrays_to_parameters)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402
import flwr.compat.common.recorddict_compat as compat  # noqa: E402

from fedlora.flower.client_app import secure_mod  # noqa: E402
from fedlora.flower.secure import secure_integer_sum, secure_mean  # noqa: E402

from test_flower import InMemoryGrid, server_identity  # noqa: E402,F401

D = 2000


def vectors_of(nodes: int, bits: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Each node's vector: uniform in [0, 2^bits), its first entries at the top of the range (their sum
    wraps around)."""
    rng = np.random.default_rng(seed)
    vectors = {}
    for i in range(nodes):
        v = rng.integers(0, 1 << bits, D, dtype=np.int64)
        v[:10] = (1 << bits) - 1 - np.arange(10)
        vectors[1000 + i] = v
    return vectors


def integer_app(replies: dict[int, np.ndarray], failing=()) -> ClientApp:
    """A ClientApp whose train handler answers with the node's array (or fails, for the nodes `failing`)."""
    app = ClientApp(mods=[secure_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if context.node_id in failing:
            raise RuntimeError("injected fault")
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([replies[context.node_id]]), 1, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    return app


def run(replies: dict[int, np.ndarray], bits: int, threshold: int, failing=()):
    """The round's result, the masked vectors the server received (node -> array) and the nodes' errors."""
    grid = InMemoryGrid(integer_app(replies, failing), {}, len(replies))
    masked, errors = {}, {}
    real_send = grid.send_and_receive

    def capture(messages, *, timeout=None):
        answers = real_send(messages, timeout=timeout)
        for reply in answers:
            node = reply.metadata.src_node_id
            if reply.has_error():
                errors[node] = reply.error.reason
                continue
            assert all(not record for record in reply.content.array_records.values())  # no array travels
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            if Key.MASKED_PARAMETERS in record:
                masked[node] = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
                assert not any(ndarray_to_bytes(replies[node]) in v for v in record.values() if isinstance(v, list))
        return answers

    grid.send_and_receive = capture
    fitins_of = {node: FitIns(ndarrays_to_parameters([]), {}) for node in replies}
    return secure_integer_sum(grid, fitins_of, 1, threshold, 5.0, bits), masked, errors


def modular_sum(vectors, bits: int) -> torch.Tensor:
    return torch.from_numpy(sum(vectors) % (1 << bits))


@pytest.mark.parametrize("bits,nodes", [(16, 3), (32, 4), (48, 3), (48, 4)])
def test_the_server_gets_the_exact_sum_mod_2_bits(bits, nodes):
    vectors = vectors_of(nodes, bits, seed=bits + nodes)
    assert (sum(vectors.values()) >= 1 << bits).any()  # the sum wraps around
    result, _, errors = run(vectors, bits, threshold=nodes - 1)
    assert not errors
    assert sorted(result.summed) == sorted(vectors)
    assert result.total.dtype == torch.int64
    assert torch.equal(result.total, modular_sum(vectors.values(), bits))


def test_the_server_receives_only_masked_vectors():
    bits = 32
    vectors = vectors_of(3, bits)
    result, masked, _ = run(vectors, bits, threshold=2)
    assert result.total is not None and sorted(masked) == sorted(vectors)
    for node, (factor, vector) in masked.items():
        assert factor.shape == (1,) and vector.shape == (D,)
        assert np.mean(vector == vectors[node]) < 0.01
        # uniform in [0, 2^32): mean 1/2 of the range (standard deviation 0.0065 over D entries), all of it used
        scaled = vector / (1 << bits)
        assert abs(scaled.mean() - 0.5) < 0.05 and scaled.min() < 0.01 and scaled.max() > 0.99
    # the private masks stay in the masked vectors' sum: the server removes them only with the nodes' shares
    assert not torch.equal(modular_sum([m[1] for m in masked.values()], bits), result.total)
    assert torch.equal(result.total, modular_sum(vectors.values(), bits))


@pytest.mark.parametrize("failing,expect_sum", [((1002,), True), ((1001, 1003), False)])
def test_a_node_that_fails_after_the_key_exchange_is_left_out(failing, expect_sum):
    bits = 32
    vectors = vectors_of(4, bits)
    result, masked, errors = run(vectors, bits, threshold=3, failing=failing)
    survivors = sorted(set(vectors) - set(failing))
    assert sorted(errors) == list(failing) and "injected fault" in errors[failing[0]]
    if expect_sum:
        assert sorted(result.summed) == survivors == sorted(masked)
        assert torch.equal(result.total, modular_sum([vectors[n] for n in survivors], bits))
    else:  # 2 survivors, below the threshold of 3
        assert result.total is None and result.summed == []


def test_fewer_nodes_than_the_threshold_give_no_sum():
    result, masked, _ = run(vectors_of(3, 16), 16, threshold=4)
    assert result.total is None and not masked
    with pytest.raises(ValueError, match="threshold 1"):
        run(vectors_of(3, 16), 16, threshold=1)


@pytest.mark.parametrize("bad,message", [
    (np.linspace(0, 1, D), "one integer array"),
    (np.full(D, 1 << 16, dtype=np.int64), r"outside \[0, 2\^16\)"),
    (np.full(D, -1, dtype=np.int64), r"outside \[0, 2\^16\)"),
])
def test_a_reply_that_is_not_integers_mod_2_bits_is_refused(bad, message):
    bits = 16
    vectors = vectors_of(3, bits)
    vectors[1001] = bad
    result, masked, errors = run(vectors, bits, threshold=2)
    assert list(errors) == [1001]
    assert re.search(message, errors[1001]), errors[1001]
    assert 1001 not in masked and sorted(result.summed) == [1000, 1002]
    assert torch.equal(result.total, modular_sum([vectors[1000], vectors[1002]], bits))


def test_an_integer_round_at_another_modulus_is_refused():
    """A float round's workflow (modulus 2^32) with FitIns that say 2^16: every node refuses, no sum."""
    vectors = vectors_of(3, 16)
    grid = InMemoryGrid(integer_app(vectors), {}, 3)
    errors = []
    real_send = grid.send_and_receive

    def capture(messages, *, timeout=None):
        answers = real_send(messages, timeout=timeout)
        errors.extend(a.error.reason for a in answers if a.has_error())
        return answers

    grid.send_and_receive = capture
    fitins_of = {node: FitIns(ndarrays_to_parameters([]), {"integer-bits": 16}) for node in vectors}
    result = secure_mean(grid, fitins_of, 1, 2, 5.0, 1)
    assert result.mean is None
    assert len(errors) == 3 and all("modulus is 4294967296, not 2^16" in e for e in errors), errors
