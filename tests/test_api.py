"""The Python API: the documented examples run as shown; data and models in memory; a user's own method."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fedlora
from fedlora.errors import ConfigError, DataError
from fedlora.methods import METHODS
from fedlora.simulator import Simulator

from conftest import NEGATIVE, POSITIVE, minilm_path, read_log, run_until_killed

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.fixture
def momentum_method():
    """The custom method of docs/python-api.md, registered by running the documented block as written; the
    registry is as it was after the test."""
    saved = dict(METHODS)
    block = next(b for b in python_blocks(DOC) if "register_method" in b)
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    yield namespace["FFAMomentum"]
    METHODS.clear()
    METHODS.update(saved)


@pytest.mark.docs
@pytest.mark.parametrize("doc", [DOC, DOC.parents[1] / "README.md"], ids=["docs", "README"])
def test_the_documented_example_runs_as_shown(doc, tmp_path, monkeypatch, capsys):
    minilm_path()  # skips without the model wheel
    monkeypatch.chdir(tmp_path)
    block = next(b for b in python_blocks(doc) if "fedlora.run(" in b)
    exec(compile(block, str(doc), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    accuracy, adapter = printed[0].split()
    assert 0 <= float(accuracy) <= 1 and Path(adapter) == Path("runs/python-api/adapter")
    assert printed[1].startswith("3 records,")  # round 0 and two rounds
    assert (tmp_path / "runs/python-api/adapter/adapter_model.safetensors").is_file()


def reviews(n: int, seed: int = 0) -> list[dict]:
    rnd = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        positive = bool(torch.randint(2, (1,), generator=rnd))
        rows.append({"review": (POSITIVE if positive else NEGATIVE)[i % 8], "stars": "five" if positive else "one"})
    return rows


def api_config(tiny_bert_dir, **sections):
    raw = {"seed": 2, "method": {"name": "ffa"}, "model": {"path": tiny_bert_dir}, "adapter": {"rank": 4},
           "data": {"text_columns": ["review"], "label_column": "stars", "max_length": 16},
           "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": 2},
           "train": {"local_steps": 2, "batch_size": 8, "lr": 0.01}, "eval": {"every": 1}}
    for section, values in sections.items():
        raw[section] = raw.get(section, {}) | values
    return raw


def test_records_a_dataset_and_a_dataframe_give_the_same_run(tiny_bert_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    train, evaluation = reviews(60), reviews(20, seed=1)
    cfg = api_config(tiny_bert_dir)
    a = fedlora.run(cfg, out=tmp_path / "list", train_data=train, eval_data=evaluation, progress=False)
    b = fedlora.run(cfg, out=tmp_path / "dataset", train_data=datasets.Dataset.from_list(train),
                    eval_data=datasets.Dataset.from_list(evaluation), progress=False)
    assert a.final_eval == b.final_eval
    assert [r["bytes_up"] for r in a.rounds] == [r["bytes_up"] for r in b.rounds]
    assert a.config.data.name is None  # the record says the data came from memory
    pandas = pytest.importorskip("pandas")
    c = fedlora.run(cfg, out=tmp_path / "frame", train_data=pandas.DataFrame(train),
                    eval_data=pandas.DataFrame(evaluation), progress=False)
    assert c.final_eval == a.final_eval


def test_a_model_object_and_string_labels(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    result = fedlora.run(api_config(tiny_bert_dir), out=tmp_path / "obj", train_data=reviews(40),
                         eval_data=reviews(12, seed=1), model=model, tokenizer=tokenizer, progress=False)
    assert result.rounds[-1]["round"] == 2 and 0 <= result.final_eval["accuracy"] <= 1
    three = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3, ignore_mismatched_sizes=True)
    with pytest.raises(ConfigError, match="num_labels=2"):
        fedlora.run(api_config(tiny_bert_dir), out=tmp_path / "bad", train_data=reviews(40),
                    eval_data=reviews(12), model=three, tokenizer=tokenizer, progress=False)
    with pytest.raises(ConfigError, match="tokenizer"):
        fedlora.run(api_config(tiny_bert_dir), out=tmp_path / "bad", train_data=reviews(40), model=model)


def test_bad_in_memory_data_names_the_row(tiny_bert_dir, tmp_path):
    rows = reviews(20)
    rows[7] = {"review": "fine"}
    with pytest.raises(DataError, match="train_data row 7: no column 'stars'"):
        fedlora.run(api_config(tiny_bert_dir), out=tmp_path, train_data=rows, eval_data=reviews(4))
    with pytest.raises(ConfigError, match="eval_data, or data.holdout_fraction"):
        fedlora.run(api_config(tiny_bert_dir), out=tmp_path, train_data=reviews(20))
    with pytest.raises(ConfigError, match="method.name"):
        fedlora.make_config({"method": {"name": "fedprox"}})
    held = fedlora.run(api_config(tiny_bert_dir, data={"holdout_fraction": 0.25}), out=tmp_path / "held",
                       train_data=reviews(40), progress=False)
    assert held.final_eval is not None


def test_a_registered_method_runs_and_with_beta_zero_is_ffa(sim_config, tmp_path, momentum_method):
    FFAMomentum = momentum_method
    assert METHODS["ffa-momentum"] is FFAMomentum
    ffa = fedlora.run(sim_config(method={"name": "ffa"}).to_dict(), out=tmp_path / "ffa", progress=False)
    FFAMomentum.beta = 0.0
    try:
        zero = fedlora.run(sim_config(method={"name": "ffa-momentum"}).to_dict(), out=tmp_path / "zero",
                           progress=False)
    finally:
        FFAMomentum.beta = 0.9
    assert zero.final_eval["accuracy"] == ffa.final_eval["accuracy"]
    assert abs(zero.final_eval["loss"] - ffa.final_eval["loss"]) < 1e-5
    with pytest.raises(ValueError, match="already registered"):
        fedlora.register_method(type("Other", (fedlora.Method,), {"name": "ffa-momentum"}))


def test_momentum_update_matches_a_hand_computation_and_resumes(sim_config, tmp_path, monkeypatch, momentum_method):
    FFAMomentum = momentum_method
    cfg = sim_config(method={"name": "ffa-momentum"}, federation={"rounds": 3})
    sim = Simulator(cfg, tmp_path / "whole", progress=False)
    method = sim.method
    seen = []
    real = FFAMomentum.aggregate

    def recording(self, payloads, weights, clients, round_):
        before = {k: v.clone() for k, v in self.global_state.items() if k in payloads[0]}
        mean = {k: sum(w * p[k] for w, p in zip(weights, payloads)) for k in payloads[0]}
        out = real(self, payloads, weights, clients, round_)
        seen.append((before, mean, {k: self.global_state[k].clone() for k in mean}))
        return out
    monkeypatch.setattr(FFAMomentum, "aggregate", recording)
    sim.run()
    velocity = {}
    for before, mean, after in seen:
        for k in mean:
            velocity[k] = 0.9 * velocity.get(k, 0) + (mean[k] - before[k])
            assert torch.allclose(after[k], before[k] + velocity[k], atol=1e-6)
    monkeypatch.setattr(FFAMomentum, "aggregate", real)
    whole = method.eval_state()

    run_until_killed(Simulator(cfg, tmp_path / "cut", progress=False), monkeypatch, after_round=1)
    resumed = Simulator(cfg, tmp_path / "cut", progress=False)
    resumed.run(resume=True)
    for k, v in whole.items():
        assert torch.equal(resumed.method.eval_state()[k], v), k
    assert len(read_log(tmp_path / "cut")) == 4
