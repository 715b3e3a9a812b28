"""A resumed Flower run checks its data as the simulator's does: the server refuses to resume on a training file
other than the stopped run's, before any node trains."""
from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="flwr (the 'flower' extra of fedlora) is not installed")

from fedlora.errors import FedloraError  # noqa: E402
from fedlora.flower.client_app import _runtimes, client_app  # noqa: E402
from fedlora.flower.project import to_run_config  # noqa: E402

from conftest import read_log  # noqa: E402
from test_flower import InMemoryGrid, server_identity  # noqa: E402,F401
from test_flower_deploy import strategy_for  # noqa: E402
from test_reliability import _sentiment_rows  # noqa: E402


def test_a_flower_resume_on_a_replaced_training_file_is_refused(sim_config, tmp_path):
    (tmp_path / "train.tsv").write_text(_sentiment_rows(120, 0))
    cfg = sim_config(method={"name": "ffa"}, eval={"every": 0}, data={"path": str(tmp_path / "train.tsv"),
                                                                       "partition": "iid"},
                     federation={"num_clients": 2, "clients_per_round": 2, "rounds": 2})
    out = tmp_path / "flower"

    def grid():
        return InMemoryGrid(client_app(), to_run_config(cfg), cfg.federation.num_clients)

    stopping = grid()
    real_send = stopping.send_and_receive

    def crash_in_round_2(messages, *, timeout=None):
        if any(m.metadata.message_type == "train" and m.metadata.group_id == "2" for m in messages):
            raise ConnectionError("the SuperLink is gone")
        return real_send(messages, timeout=timeout)

    stopping.send_and_receive = crash_in_round_2
    with pytest.raises(ConnectionError):
        strategy_for(cfg, out).start(stopping)
    (tmp_path / "train.tsv").write_text(_sentiment_rows(300, 7))
    _runtimes.clear()  # the resumed run's nodes are new processes: they read the file again
    resuming, sent = grid(), []
    real_resume_send = resuming.send_and_receive

    def record(messages, *, timeout=None):
        sent.extend(m.metadata.message_type for m in messages)
        return real_resume_send(messages, timeout=timeout)

    resuming.send_and_receive = record
    with pytest.raises(FedloraError, match=r"differs \(300 rows, was 120\); 2 of 2 clients' training rows changed "
                                           r"\(client 0: 60 -> 150 rows; client 1: 60 -> 150 rows\)"):
        strategy_for(cfg, out, resume=True).start(resuming)
    assert "train" not in sent and [r["round"] for r in read_log(out)] == [0, 1]
