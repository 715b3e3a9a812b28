import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedlora.answers import completion_for, is_correct
from fedlora.config import DataConfig, build_config
from fedlora.data import InstructionSplit, load_instructions, partition
from fedlora.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} not found")

COMMONSENSE_EVAL = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "winogrande": 1267, "ARC-Easy": 2376,
                    "ARC-Challenge": 1172, "openbookqa": 500}
COMMONSENSE_TRAIN = {"boolq": 9427, "ARC-Easy": 2251, "ARC-Challenge": 1119, "openbookqa": 4957, "social_i_qa": 33410}
ARITHMETIC_EVAL = {"AddSub": 395, "MultiArith": 600, "SingleEq": 508, "SVAMP": 1000, "AQuA": 254, "mawps": 238,
                   "gsm8k": 1319}
NUMBER = re.compile(r"-?\d+(\.\d+)?")


def preset(name, **kw):
    return load_instructions(DataConfig(name=name, root=str(SHARED_DATA), **kw))


@pytest.fixture(scope="module")
def gsm8k():
    return preset("gsm8k")


@pytest.fixture(scope="module")
def commonsense():
    return preset("commonsense")


@pytest.fixture(scope="module")
def arithmetic():
    return preset("arithmetic")


def assert_filled(split: InstructionSplit):
    columns = (split.prompts, split.targets, split.answers, split.tasks, split.options)
    assert all(len(column) == len(split) for column in columns)
    for column in (split.prompts, split.targets, split.answers, split.tasks):
        assert all(isinstance(text, str) and text.strip() for text in column)


# ---------------------------------------------------------------- presets on the shared data

@needs_shared
def test_gsm8k_preset(gsm8k):
    assert (len(gsm8k.train), len(gsm8k.eval)) == (7_473, 1_319)
    assert gsm8k.task_names == ["gsm8k"]
    for split in (gsm8k.train, gsm8k.eval):
        assert_filled(split)
        assert all(NUMBER.fullmatch(answer) for answer in split.answers)
        assert all(options is None for options in split.options)
        assert all(target.rsplit("#### ", 1)[1].replace(",", "") == answer
                   for target, answer in zip(split.targets, split.answers))
        assert all(is_correct("gsm8k", target, answer) for target, answer in zip(split.targets, split.answers))
    assert gsm8k.train.prompts[0].startswith("Natalia sold clips to 48 of her friends")
    assert gsm8k.train.answers[0] == "72"
    assert "1,080" not in gsm8k.train.answers and "1080" in gsm8k.train.answers  # commas removed


@needs_shared
def test_commonsense_preset_counts_and_options(commonsense):
    assert Counter(commonsense.eval.tasks) == COMMONSENSE_EVAL
    assert Counter(commonsense.train.tasks) == COMMONSENSE_TRAIN
    assert commonsense.task_names == sorted(COMMONSENSE_EVAL)
    option_sets = {}
    for split in (commonsense.train, commonsense.eval):
        assert_filled(split)
        for task, answer, options, target in zip(split.tasks, split.answers, split.options, split.targets):
            assert options is not None and answer in options
            assert target == completion_for(task, answer)
            option_sets.setdefault(task, set()).add(tuple(options))
    assert option_sets["boolq"] == {("true", "false")}
    assert option_sets["piqa"] == {("solution1", "solution2")}
    assert option_sets["winogrande"] == {("option1", "option2")}
    assert option_sets["social_i_qa"] == {("answer1", "answer2", "answer3")}
    assert option_sets["openbookqa"] == {("answer1", "answer2", "answer3", "answer4")}
    assert {len(options) for options in option_sets["ARC-Easy"]} == {3, 4, 5}


@needs_shared
def test_social_iqa_training_rows_have_the_llm_adapters_format():
    # the original dev split, converted, must equal LLM-Adapters' own social_i_qa/test.json
    data = load_instructions(DataConfig(name=None, path=str(SHARED_DATA / "social_i_qa" / "dev.jsonl"),
                                        eval_path=str(SHARED_DATA / "commonsense" / "social_i_qa" / "test.json")))
    converted, released = data.train, data.eval
    assert len(converted) == len(released) == 1_954
    assert converted.prompts == released.prompts
    assert converted.targets == released.targets
    assert converted.answers == released.answers
    assert converted.options == released.options
    assert data.task_names == ["social_i_qa"]


@needs_shared
def test_arithmetic_preset(arithmetic):
    assert Counter(arithmetic.eval.tasks) == ARITHMETIC_EVAL
    assert len(arithmetic.train) == 3_260 - 3  # three rows of math_data.json have no response
    assert set(arithmetic.train.tasks) == {"math_data"}
    for split in (arithmetic.train, arithmetic.eval):
        assert_filled(split)
        for answer, options in zip(split.answers, split.options):
            if options is None:
                assert NUMBER.fullmatch(answer)
            else:
                assert options == ["A", "B", "C", "D", "E"] and answer in options
    aqua = [options for task, options in zip(arithmetic.eval.tasks, arithmetic.eval.options) if task == "AQuA"]
    assert len(aqua) == 254 and all(options is not None for options in aqua)
    mawps = [(target, answer) for task, target, answer
             in zip(arithmetic.eval.tasks, arithmetic.eval.targets, arithmetic.eval.answers) if task == "mawps"]
    assert mawps[0] == ("The answer is 1.8333333333333335.", "1.8333333333333335")  # the file has no outputs


@needs_shared
def test_tasks_filter():
    data = preset("commonsense", tasks=["boolq", "ARC-Easy"])
    assert Counter(data.train.tasks) == {"boolq": 9427, "ARC-Easy": 2251}
    assert Counter(data.eval.tasks) == {"boolq": 3270, "ARC-Easy": 2376}
    data = preset("arithmetic", tasks=["math_data", "AQuA"])
    assert data.task_names == ["AQuA", "math_data"] and len(data.eval) == 254
    with pytest.raises(ConfigError, match=r"'data.tasks': unknown task 'hellaswag' \(known tasks: ARC-Challenge, "
                                          r"ARC-Easy, boolq, openbookqa, piqa, social_i_qa, winogrande\)"):
        preset("commonsense", tasks=["boolq", "hellaswag"])
    with pytest.raises(ConfigError, match=r"'data.tasks': piqa leaves no training data \(tasks with training "
                                          r"data: ARC-Challenge, ARC-Easy, boolq, openbookqa, social_i_qa\)"):
        preset("commonsense", tasks=["piqa"])
    with pytest.raises(ConfigError, match="leaves no evaluation data"):
        preset("arithmetic", tasks=["math_data"])


@needs_shared
def test_max_train_examples_is_a_fixed_subset_in_file_order(commonsense):
    small = preset("commonsense", max_train_examples=500)
    again = preset("commonsense", max_train_examples=500)
    assert len(small.train) == 500 and small.train == again.train
    assert len(small.eval) == len(commonsense.eval)
    positions = [commonsense.train.prompts.index(prompt) for prompt in small.train.prompts[:20]]
    assert positions == sorted(positions)
    assert len(set(small.train.tasks)) == 5  # spread over the tasks, not the first 500 rows (all boolq)
    assert len(preset("gsm8k", max_train_examples=10_000).train) == 7_473


@needs_shared
def test_missing_local_file_names_it(tmp_path):
    (tmp_path / "commonsense" / "boolq").mkdir(parents=True)
    with pytest.raises(DataError, match=r"commonsense/boolq/train.json not found: set data.root"):
        load_instructions(DataConfig(name="commonsense", root=str(tmp_path)))


# ---------------------------------------------------------------- preset sources and config errors

def test_preset_config_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDLORA_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match=r"'data.name': unknown instruction data set 'sst2' \(presets: gsm8k, "
                                          r"commonsense, arithmetic"):
        load_instructions(DataConfig(name="sst2"))
    with pytest.raises(ConfigError, match=r"'data.eval_split': preset 'gsm8k' has no split 'dev' \(available: test\)"):
        load_instructions(DataConfig(name="gsm8k", eval_split="dev"))
    with pytest.raises(ConfigError, match=r"'data.source' is 'local' but no data root is set"):
        load_instructions(DataConfig(name="gsm8k", source="local"))
    with pytest.raises(DataError, match=r"preset 'commonsense' is read from local files only"):
        load_instructions(DataConfig(name="commonsense", root=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"no data given"):
        load_instructions(DataConfig(name=None))
    with pytest.raises(ConfigError, match=r"config key 'data.tasks'"):
        build_config({"data": {"tasks": []}})
    assert build_config({"data": {"partition": "task", "tasks": ["boolq"]}}).data.tasks == ["boolq"]


@pytest.fixture
def fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(hub_id, subset=None, split=None):
        calls.append((hub_id, subset, split))
        if split == "broken":
            raise ConnectionError("no network\nmore detail")
        return datasets.Dataset.from_dict({"question": ["1 + 1?", "2 * 3?"], "answer": ["1+1=2\n#### 2", "#### 6"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("FEDLORA_DATA_DIR", raising=False)
    return calls


def test_gsm8k_from_the_hub_without_a_local_copy(fake_hub):
    data = load_instructions(DataConfig(name="gsm8k"))
    assert fake_hub == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert data.train.answers == ["2", "6"] and data.eval.tasks == ["gsm8k", "gsm8k"]
    data = load_instructions(DataConfig(name=None, hub_id="me/sums", eval_split="validation"))
    assert fake_hub[-1] == ("me/sums", None, "validation") and data.task_names == ["sums"]
    with pytest.raises(DataError, match=r"^could not load split 'broken' of 'me/sums'.*: no network \(set data.root"):
        load_instructions(DataConfig(name=None, hub_id="me/sums", eval_split="broken"))


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.delenv("FEDLORA_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"'openai/gsm8k/main' .* pip install 'fedlora\[hub\]'"):
        load_instructions(DataConfig(name="gsm8k", source="hub"))


# ---------------------------------------------------------------- plain files

LLM_ADAPTERS_ROWS = [
    {"instruction": "Please answer the following question with true or false, question: is the sky blue?"
                    "\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true",
     "answer": "true"},
    {"instruction": "Add the numbers.", "input": "3 and 4", "output": "3 + 4 = 7. The answer is 7.", "answer": 7},
    {"instruction": "Pick one. Answer Choices: (A) 1 (B) 2 (C) 3", "output": "The answer is (B).", "answer": "B",
     "task": "choices"},
]


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def files(train: Path, evaluation: Path, **kw) -> DataConfig:
    return DataConfig(name=None, path=str(train), eval_path=str(evaluation), **kw)


def test_plain_files_in_both_formats(tmp_path):
    train = write_json(tmp_path / "mixed.json", LLM_ADAPTERS_ROWS)
    (tmp_path / "sums").mkdir()
    evaluation = write_jsonl(tmp_path / "sums" / "test.jsonl", [
        {"question": "How much is 600 + 600?", "answer": "600 + 600 = 1,200\n#### 1,200"},
        {"question": "How much is 2 - 5?", "answer": "#### -3"},
    ])
    data = load_instructions(files(train, evaluation))
    assert data.name == "mixed" and data.task_names == ["choices", "mixed", "sums"]
    assert data.train.prompts[1] == "Add the numbers.\n\n3 and 4"
    assert data.train.prompts[0] == LLM_ADAPTERS_ROWS[0]["instruction"]
    assert data.train.answers == ["true", "7", "B"]
    assert data.train.options == [["true", "false"], None, ["A", "B", "C"]]
    assert data.train.tasks == ["mixed", "mixed", "choices"]
    assert data.eval.prompts[0] == "How much is 600 + 600?"
    assert data.eval.targets[1] == "#### -3"
    assert data.eval.answers == ["1200", "-3"] and data.eval.options == [None, None]
    assert data.eval.tasks == ["sums", "sums"]  # a file named after its split takes its folder's name
    only = load_instructions(files(train, evaluation, tasks=["mixed", "sums"]))
    assert only.train.tasks == ["mixed", "mixed"] and len(only.eval) == 2
    with pytest.raises(ConfigError, match=r"unknown task 'boolq' \(known tasks: choices, mixed, sums\)"):
        load_instructions(files(train, evaluation, tasks=["boolq"]))


def test_empty_evaluation_responses_get_the_answer_response(tmp_path):
    train = write_json(tmp_path / "train.json", LLM_ADAPTERS_ROWS)
    evaluation = write_json(tmp_path / "extra.json", [
        {"instruction": "What is 2 - 17?", "input": "", "output": "", "answer": "-15.0"},
        {"instruction": "Is ice cold?\n\nAnswer format: true/false", "output": " ", "answer": "true"},
    ])
    data = load_instructions(files(train, evaluation))
    assert data.eval.targets == ["The answer is -15.0.", "the correct answer is true"]


def test_max_train_examples_on_plain_files(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(50)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    evaluation = write_jsonl(tmp_path / "test.jsonl", rows[:3])
    small = load_instructions(files(train, evaluation, max_train_examples=10))
    assert small.train == load_instructions(files(train, evaluation, max_train_examples=10)).train
    picked = [int(answer) for answer in small.train.answers]
    assert len(picked) == 10 and picked == sorted(picked) and picked != list(range(10))


def test_holdout_on_instruction_files(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(50)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    tuned = load_instructions(DataConfig(name=None, path=str(train), holdout_fraction=0.2))
    held, kept = [int(a) for a in tuned.eval.answers], [int(a) for a in tuned.train.answers]
    assert len(held) == 10 and len(kept) == 40 and sorted(held + kept) == list(range(50))


GOOD = {"instruction": "Add 1 and 2.", "input": "", "output": "The answer is 3.", "answer": "3"}


@pytest.mark.parametrize("text, message", [
    ('[{"instruction": "x",\n "answer": }]', r"bad.json line 2: invalid JSON"),
    ('{"instruction": "x"}', r"bad.json: expected a JSON list of objects, got dict"),
    ("  \n", r"bad.json: file is empty"),
    ("[]", r"bad.json: no data rows"),
    (json.dumps([GOOD, "text"]), r"bad.json item 2: expected a JSON object, got str"),
    (json.dumps([{"prompt": "x", "completion": "y"}]),
     r"bad.json item 1: neither the LLM-Adapters format .* nor the GSM8K format .*columns: prompt, completion"),
    (json.dumps([GOOD, {**GOOD, "output": ""}]), r"bad.json item 2: empty field 'output'"),
    (json.dumps([GOOD, {k: v for k, v in GOOD.items() if k != "answer"}]), r"bad.json item 2: missing field 'answer'"),
    (json.dumps([GOOD, {k: v for k, v in GOOD.items() if k != "output"}]), r"bad.json item 2: missing field 'output'"),
    (json.dumps([GOOD, {**GOOD, "instruction": "  "}]), r"bad.json item 2: empty field 'instruction'"),
    (json.dumps([GOOD, {**GOOD, "answer": ""}]), r"bad.json item 2: empty field 'answer'"),
    (json.dumps([GOOD, {**GOOD, "answer": "three"}]), r"bad.json item 2: answer 'three' is not a number"),
    (json.dumps([{**GOOD, "instruction": "Yes?\n\nAnswer format: true/false", "answer": "yes"}]),
     r"bad.json item 1: answer 'yes' is not one of the options true/false"),
    (json.dumps([GOOD, {"question": "q"}]), r"bad.json item 2: missing field 'instruction'"),
    (json.dumps([{"question": "q", "answer": "it is 4"}]), r"bad.json item 1: field 'answer' has no final answer"),
    (json.dumps([{"question": "q", "answer": "#### four"}]), r"bad.json item 1: final answer 'four' .* not a number"),
    (json.dumps([{**GOOD, "task": 3}]), r"bad.json item 1: field 'task' must be a non-empty string"),
])
def test_bad_training_file(tmp_path, text, message):
    bad = tmp_path / "bad.json"
    bad.write_text(text, encoding="utf-8")
    good = write_json(tmp_path / "good.json", [GOOD])
    with pytest.raises(DataError, match=message):
        load_instructions(files(bad, good))


def test_bad_jsonl_and_paths(tmp_path):
    good = write_json(tmp_path / "good.json", [GOOD])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl line 3: invalid JSON"):
        load_instructions(files(bad, good))
    with pytest.raises(DataError, match=r"'data.eval_path': file not found: .*missing.json"):
        load_instructions(files(good, tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"'data.eval_path' is required with data.path"):
        load_instructions(DataConfig(name=None, path=str(good)))
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rows.tsv: unsupported file type '.tsv'"):
        load_instructions(files(good, tsv))


def test_social_iqa_labels_file_errors(tmp_path):
    good = write_json(tmp_path / "good.json", [GOOD])
    row = {"context": "Sam lost.", "question": "How does Sam feel?", "answerA": "sad", "answerB": "glad",
           "answerC": "tall"}
    siqa = write_jsonl(tmp_path / "siqa.jsonl", [row, row])
    (tmp_path / "siqa-labels.lst").write_text("1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"siqa-labels.lst: 1 labels for the 2 rows"):
        load_instructions(files(siqa, good))
    (tmp_path / "siqa-labels.lst").write_text("1\n4\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"siqa-labels.lst line 2: label '4' is not 1, 2 or 3"):
        load_instructions(files(siqa, good))
    (tmp_path / "siqa-labels.lst").unlink()
    with pytest.raises(DataError, match=r"siqa.jsonl line 1: no label"):
        load_instructions(files(siqa, good))
    write_jsonl(siqa, [{**row, "label": "2"}])
    data = load_instructions(files(siqa, good))
    assert data.train.answers == ["answer2"] and data.train.targets == ["the correct answer is answer2"]


# ---------------------------------------------------------------- partition by task

def test_task_partition_gives_each_client_one_task():
    groups = np.repeat([0, 1, 2], [100, 40, 7])
    parts = partition(groups, 7, "task", seed=5)
    joined = np.concatenate(parts)
    assert len(joined) == len(groups) and np.array_equal(np.sort(joined), np.arange(len(groups)))
    held = [set(groups[p].tolist()) for p in parts]
    assert all(len(h) == 1 for h in held)
    clients_per_group = Counter(next(iter(h)) for h in held)
    assert sorted(clients_per_group.values()) == [2, 2, 3]  # round robin: 7 clients over 3 tasks
    for group, clients in clients_per_group.items():
        sizes = [len(p) for p, h in zip(parts, held) if group in h]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == np.sum(groups == group)
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def test_task_partition_is_deterministic_by_seed():
    groups = np.random.default_rng(0).integers(0, 4, 400)
    first = partition(groups, 8, "task", seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, partition(groups, 8, "task", seed=1)))
    others = [partition(groups, 8, "task", seed=s) for s in range(2, 6)]
    assert any(not all(np.array_equal(a, b) for a, b in zip(first, other)) for other in others)


def test_task_partition_errors():
    groups = np.repeat([0, 1, 2, 3], 10)
    with pytest.raises(ConfigError, match=r"'federation.num_clients'.*at least 4 clients for the 4 tasks, got 3"):
        partition(groups, 3, "task", seed=0)
    with pytest.raises(DataError, match=r"'data.min_client_examples'"):
        partition(np.array([0] * 30 + [1] * 3), 4, "task", seed=0, min_client_examples=2)
