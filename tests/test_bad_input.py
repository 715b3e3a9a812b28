"""Bad input of every kind ends in a ConfigError or DataError whose one-line message names the file
(and line) or the config key: never a traceback from inside a library, never a silently wrong result."""
import csv
import json
import math
import re
import types
import typing
from pathlib import Path

import annotated_types
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fedlora.api import load_config, make_config as build_config
from fedlora.config import Config, DataConfig, MethodConfig, apply_overrides, parse_override
from fedlora.methods import METHODS
from fedlora.data import load_classification, read_classification_files, read_table
from fedlora.errors import ConfigError, DataError

# Bounded and reproducible: the same examples on every run, a few seconds in all.
bounded = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def one_line(message: str) -> str:
    assert "\n" not in message and "\r" not in message, message
    return message


def config_error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return one_line(str(info.value))


def write(path: Path, content) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# ================================================================ config files

def test_invalid_toml_names_file_line_and_column(tmp_path):
    path = write(tmp_path / "c.toml", "[train\nlr = 1\n")
    assert config_error(path) == (f"{path}: invalid TOML: Expected ']' at the end of a table declaration "
                                  f"(at line 1, column 7)")


def test_non_utf8_config_names_the_line(tmp_path):
    path = write(tmp_path / "c.toml", b"[train]\nlr = 0.1\n# caf\xe9\n")
    assert config_error(path) == f"{path} line 3: not valid UTF-8 (invalid continuation byte at byte 22)"


def test_config_folder_and_missing_file(tmp_path):
    assert config_error(tmp_path) == f"{tmp_path}: is a folder, not a config file"
    assert config_error(tmp_path / "none.toml") == f"config file not found: {tmp_path / 'none.toml'}"


def test_deeply_nested_toml(tmp_path):
    path = write(tmp_path / "c.toml", "seed = " + "[" * 5000 + "]" * 5000 + "\n")
    assert config_error(path) == f"{path}: invalid TOML: arrays or tables nested too deeply"


def test_config_with_bom_and_windows_line_endings_reads(tmp_path):
    path = write(tmp_path / "c.toml", b"\xef\xbb\xbf[train]\r\nlr = 0.5\r\n[adapter]\r\nrank = 4\r\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.adapter.rank) == (0.5, 4)


@pytest.mark.parametrize("toml, message", [
    ("federation = 3", "config key 'federation': expected a table of settings (got 3)"),
    ("[train]\nlr = 'fast'",
     "config key 'train.lr': Input should be a valid number, unable to parse string as a number (got 'fast')"),
    ("[adapter]\nrank = -1", "config key 'adapter.rank': Input should be greater than 0 (got -1)"),
    ("[adapter]\nrank = 2.5",
     "config key 'adapter.rank': Input should be a valid integer, got a number with a fractional part (got 2.5)"),
    ("[adapter]\nrank = [8]", "config key 'adapter.rank': Input should be a valid integer (got [8])"),
    ("[adapter]\nrank = {value = 8}", "config key 'adapter.rank': Input should be a valid integer (got {'value': 8})"),
    ("[adapter.rank]\nvalue = 8", "config key 'adapter.rank': Input should be a valid integer (got {'value': 8})"),
    ("[model]\nname = 3", "config key 'model.name': Input should be a valid string (got 3)"),
    ("[data]\ntext_columns = 'sentence'", "config key 'data.text_columns': Input should be a valid list (got 'sentence')"),
    ("[data]\nlabel_proportions = [1, 2]", "config key 'data.label_proportions.0': Input should be a valid list (got 1)"),
    ("[train]\nlr = 1979-05-27",
     "config key 'train.lr': Input should be a valid number (got datetime.date(1979, 5, 27))"),
    ("[fedsb]\npublic_data = [1]", "config key 'fedsb.public_data': expected a table of settings (got [1])"),
    ("[federation]\nparallel_clients = 'many'",
     "config key 'federation.parallel_clients': should be an integer >= 1 or 'auto' (got 'many')"),
    # booleans are not numbers, though pydantic would read true as 1
    ("[adapter]\nrank = true", "config key 'adapter.rank': expected a number, got a boolean (true)"),
    ("[train]\nweight_decay = false", "config key 'train.weight_decay': expected a number, got a boolean (false)"),
    # enormous integers: TOML integers are 64-bit
    ("seed = 99999999999999999999", "config key 'seed': 99999999999999999999 is out of range (64-bit integers)"),
    ("[adapter]\nrank = 9223372036854775808",
     "config key 'adapter.rank': 9223372036854775808 is out of range (64-bit integers)"),
    ("seed = -1", "config key 'seed': Input should be greater than or equal to 0 (got -1)"),
    # nan fails every comparison, so pydantic rejects it wherever there is a bound; inf needs our check
    ("[train]\nlr = nan", "config key 'train.lr': Input should be greater than 0 (got nan)"),
    ("[train]\nweight_decay = nan", "config key 'train.weight_decay': Input should be greater than or equal to 0 (got nan)"),
    ("[adapter]\nrank = nan", "config key 'adapter.rank': Input should be a finite number (got nan)"),
    ("[train]\nlr = inf", "config key 'train.lr': expected a finite number, got inf"),
    ("[train]\nlr = 1e999", "config key 'train.lr': expected a finite number, got inf"),
    ("[train]\nmax_grad_norm = inf", "config key 'train.max_grad_norm': expected a finite number, got inf"),
    ("[adapter]\nalpha = inf", "config key 'adapter.alpha': expected a finite number, got inf"),
    ("[federation]\nclient_timeout = -inf", "config key 'federation.client_timeout': Input should be greater than 0 (got -inf)"),
    ("[privacy]\nepsilon = 'inf'", "config key 'privacy.epsilon': expected a finite number, got inf"),
    ("[data]\nlabel_proportions = [[0.5, nan]]",
     "config key 'data.label_proportions.0.1': expected a finite number, got nan"),
    # unknown keys at every depth
    ("colour = 'blue'", "unknown config key 'colour'"),
    ("[train]\nlerning_rate = 0.1", "unknown config key 'train.lerning_rate'"),
    ("[fedsb.public_data]\nnme = 'x'", "unknown config key 'fedsb.public_data.nme'"),
    ('"a\\nb" = 1', "unknown config key 'a\\nb'"),
])
def test_bad_config_values_name_the_key(tmp_path, toml, message):
    assert config_error(write(tmp_path / "c.toml", toml)) == message


def test_long_bad_value_is_shortened(tmp_path):
    path = write(tmp_path / "c.toml", f"[train]\nlr = '{'x' * 10_000}'\n")
    message = config_error(path)
    assert message.startswith("config key 'train.lr': Input should be a valid number")
    assert message.endswith("... (10002 characters))") and len(message) < 250


@pytest.mark.parametrize("overrides, message", [
    (["train.lr.x=1"], "--set 'train.lr.x=1': 'train.lr' is a value, not a section"),
    (["seed.x=1"], "--set 'seed.x=1': 'seed' is a value, not a section"),
    (["fedsb.public_data.path.x=1"], "--set 'fedsb.public_data.path.x=1': 'fedsb.public_data.path' is a value, not a section"),
    (["adapter.target_modules.x=1"], "--set 'adapter.target_modules.x=1': 'adapter.target_modules' is a value, not a section"),
    (["=1"], "--set '=1': empty key name in ''"),
    (["train..lr=1"], "--set 'train..lr=1': empty key name in 'train..lr'"),
    (["train.=0.1"], "--set 'train.=0.1': empty key name in 'train.'"),
    (["train.lr"], "--set expects key=value, got 'train.lr'"),
    (["train=1"], "config key 'train': expected a table of settings (got 1)"),
    (["nosuch.key=1"], "unknown config key 'nosuch'"),
    (["train.lr=fast"],
     "config key 'train.lr': Input should be a valid number, unable to parse string as a number (got 'fast')"),
    (["train.lr=inf"], "config key 'train.lr': expected a finite number, got inf"),
    (["adapter.rank=true"], "config key 'adapter.rank': expected a number, got a boolean (true)"),
    # a second TOML statement in the value is not silently dropped: the value is the whole text
    (["train.lr=0.1\nseed=3"],
     "config key 'train.lr': Input should be a valid number, unable to parse string as a number (got '0.1\\nseed=3')"),
])
def test_bad_overrides(overrides, message):
    assert config_error(None, overrides) == message


def test_override_through_a_value_set_in_the_file():
    with pytest.raises(ConfigError, match=r"^--set 'train.lr=1': 'train' is not a section$"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_override_of_deeply_nested_value_is_kept_as_text():
    message = config_error(None, ["adapter.rank=" + "[" * 5000])
    assert message.startswith("config key 'adapter.rank': Input should be a valid integer") and len(message) < 250


def test_overrides_that_are_fine():
    cfg = load_config(None, ["device=cuda:0", "model.name=\"123\"", " train . lr = 2e-4 ", "data.name=",
                             "fedsb.public_data.name=rte", "seed=9223372036854775807"])
    assert (cfg.device, cfg.model.name, cfg.train.lr, cfg.data.name) == ("cuda:0", "123", 2e-4, None)
    assert cfg.fedsb.public_data.name == "rte" and cfg.seed == 2 ** 63 - 1


# ================================================================ data files

def data_error(path, text_columns=("text",), label_column="label") -> str:
    with pytest.raises(DataError) as info:
        read_table(path, list(text_columns), label_column)
    return one_line(str(info.value))


def files_error(train, evaluation, label_names=None) -> str:
    with pytest.raises(DataError) as info:
        read_classification_files(train, evaluation, ["text"], "label", label_names)
    return one_line(str(info.value))


def test_missing_file_and_folder(tmp_path):
    assert data_error(tmp_path / "none.tsv") == f"{tmp_path / 'none.tsv'}: file not found"
    (tmp_path / "d.jsonl").mkdir()
    assert data_error(tmp_path / "d.jsonl") == f"{tmp_path / 'd.jsonl'}: is a folder, not a file"


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".json"])
def test_empty_file(tmp_path, suffix):
    path = write(tmp_path / f"e{suffix}", b"")
    assert data_error(path) == f"{path}: file is empty"


@pytest.mark.parametrize("name, content", [
    ("h.tsv", "text\tlabel\n"), ("h.csv", "text,label\r\n\r\n"), ("h.json", "[]"), ("h.jsonl", "\n \n"),
])
def test_header_only_or_no_rows(tmp_path, name, content):
    path = write(tmp_path / name, content)
    expected = "file is empty" if name.endswith(".jsonl") else "no data rows"
    assert data_error(path) == f"{path}: {expected}"


def test_missing_columns_list_the_available_ones(tmp_path):
    path = write(tmp_path / "t.csv", "sentence,target\nhi,1\n")
    assert data_error(path) == (f"{path} line 1: no column 'text', 'label' (available: sentence, target); "
                                f"set data.text_columns / data.label_column")
    path = write(tmp_path / "t.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "y": 0}\n')
    assert data_error(path) == (f"{path} line 2: no column 'label' (available: text, y); "
                                f"set data.text_columns / data.label_column")
    path = write(tmp_path / "t.json", '[{"text": "a", "label": 1}, {}]')
    assert data_error(path) == (f"{path} item 2: no column 'text', 'label' (available: none); "
                                f"set data.text_columns / data.label_column")


def test_ambiguous_columns(tmp_path):
    path = write(tmp_path / "t.tsv", "text\tlabel\ttext\na\t1\tb\n")
    assert data_error(path) == f"{path} line 1: column 'text' appears 2 times"
    path = write(tmp_path / "u.tsv", "text\tlabel\na\t1\n")
    assert data_error(path, ["text"], "text") == (
        f"{path}: column 'text' cannot be both a text column and the label column")


@pytest.mark.parametrize("content, message", [
    ("text\tlabel\nok\t1\nno label\t\n", "line 3: missing label"),
    ("text\tlabel\nok\t1\n  \t0\n", "line 3: empty text"),
    ("text\tlabel\nok\t1\na\tb\t0\n", "line 3: expected 2 tab-separated fields, got 3"),
    ("text\tlabel\nok\t1\njust text\n", "line 3: expected 2 tab-separated fields, got 1"),
])
def test_tsv_rows(tmp_path, content, message):
    path = write(tmp_path / "t.tsv", content)
    assert data_error(path) == f"{path} {message}"


@pytest.mark.parametrize("content, message", [
    ('text,label\nok,1\n"a"b,0\n', "line 3: ',' expected after '\"'"),
    ('text,label\nok,1\n"never closed,0\nmore\n', "line 3: unexpected end of data"),
    ('text,label\n"two\nlines"x,1\n', "line 2: ',' expected after '\"'"),
    ("text,label\nok,1\na,b,0\n", "line 3: expected 2 comma-separated fields, got 3"),
])
def test_csv_rows(tmp_path, content, message):
    path = write(tmp_path / "t.csv", content)
    assert data_error(path) == f"{path} {message}"


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": 1}\n\n{"text": "b" "label": 1}\n',
     "line 3: invalid JSON: Expecting ',' delimiter (column 14)"),
    ('{"text": "a", "label": 1}\n[1, 2]\n', "line 2: expected a JSON object, got list"),
    ('{"text": "a", "label": 1}\n"row"\n', "line 2: expected a JSON object, got str"),
    ('{"text": 5, "label": 1}\n', "line 1: text must be a string, got int"),
    ('{"text": ["a"], "label": 1}\n', "line 1: text must be a string, got list"),
    ('{"text": {"a": 1}, "label": 1}\n', "line 1: text must be a string, got dict"),
    ('{"text": null, "label": 1}\n', "line 1: missing text"),
    ('{"text": "a", "label": null}\n', "line 1: missing label"),
    ('{"text": "a", "label": "  "}\n', "line 1: missing label"),
    ('{"text": "a", "label": true}\n', "line 1: label must be an integer or a string, got True"),
    ('{"text": "a", "label": 0.5}\n', "line 1: label must be an integer or a string, got 0.5"),
    ('{"text": "a", "label": NaN}\n', "line 1: label must be an integer or a string, got nan"),
    ('{"text": "a", "label": 1e999}\n', "line 1: label must be an integer or a string, got inf"),
    ('{"text": "a", "label": [1]}\n', "line 1: label must be an integer or a string, got [1]"),
    ('{"text": "a\\ud800", "label": 1}\n',
     "line 1: text contains an unpaired surrogate (an invalid \\ud800-\\udfff escape)"),
    ('{"text": "a", "label": 1}\n{"text": "a", "label": ' + "9" * 5000 + "}\n",
     "line 2: invalid JSON: a number has too many digits"),
    ('{"text": "a", "label": 1}\n{"text": "a", "label": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     "line 2: invalid JSON: arrays or objects nested too deeply"),
])
def test_jsonl_rows(tmp_path, content, message):
    path = write(tmp_path / "t.jsonl", content)
    assert data_error(path) == f"{path} {message}"


@pytest.mark.parametrize("content, message", [
    ('[\n{"text": "a", "label": 1},\n{"text": "b" "label": 1}\n]', " line 3: invalid JSON: Expecting ',' delimiter (column 14)"),
    ('{"text": "a", "label": 1}', ": expected a JSON list of objects, got dict"),
    ('"rows"', ": expected a JSON list of objects, got str"),
    ('[{"text": "a", "label": 1}, 2]', " item 2: expected a JSON object, got int"),
    ('[{"text": "a", "label": 1}, {"text": 2, "label": 1}]', " item 2: text must be a string, got int"),
    ("[" * 100_000 + "]" * 100_000, ": invalid JSON: arrays or objects nested too deeply"),
])
def test_json_rows(tmp_path, content, message):
    path = write(tmp_path / "t.json", content)
    assert data_error(path) == f"{path}{message}"


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "t.jsonl", b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    assert data_error(path) == f"{path} line 2: not valid UTF-8 (invalid continuation byte at byte 40)"
    path = write(tmp_path / "t.tsv", "text\tlabel\nhello\t1\n".encode("utf-16"))
    assert data_error(path) == f"{path}: file is UTF-16; save it as UTF-8"


@pytest.mark.parametrize("name, content", [
    ("t.tsv", b"\xef\xbb\xbftext\tlabel\r\nfirst one\t1\r\n\r\nsecond\t0\r\n"),
    ("t.csv", b'\xef\xbb\xbftext,label\r\n"first one",1\r\nsecond,0\r\n'),
    ("t.jsonl", b'\xef\xbb\xbf{"text": "first one", "label": "1"}\r\n{"text": "second", "label": "0"}\r\n'),
    ("t.json", b'\xef\xbb\xbf[\r\n{"text": "first one", "label": "1"},\r\n{"text": "second", "label": "0"}\r\n]\r\n'),
])
def test_bom_and_windows_line_endings_read_correctly(tmp_path, name, content):
    assert read_table(write(tmp_path / name, content), ["text"], "label") == (["first one", "second"], None, ["1", "0"])


def test_gigantic_lines_read_correctly(tmp_path):
    document = "a long, long document\nwith \"quotes\", commas and lines " * 1_000_000  # 54 MB
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["text", "label"], [document, "1"], ["short", "0"]])
    assert read_table(path, ["text"], "label") == ([document, "short"], None, ["1", "0"])
    line = "word " * 200_000  # beyond csv's default field limit of 131072 characters
    path = write(tmp_path / "big.tsv", f"label\ttext\n1\t{line}\n0\tshort\n")
    assert read_table(path, ["text"], "label") == ([line, "short"], None, ["1", "0"])
    path = write(tmp_path / "big.jsonl", json.dumps({"text": line, "label": 1}) + "\n")
    assert read_table(path, ["text"], "label") == ([line], None, [1])


# ---------------------------------------------------------------- labels

def test_eval_label_never_seen_in_training(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\na\tpos\nb\tneg\n")
    dev = write(tmp_path / "dev.tsv", "text\tlabel\nc\tneg\nd\tmaybe\n")
    assert files_error(train, dev) == (f"{dev} line 3: label 'maybe' does not occur in the training data "
                                       f"{train} (labels: neg, pos)")
    train = write(tmp_path / "train.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    dev = write(tmp_path / "dev.jsonl", '{"text": "c", "label": 1}\n{"text": "d", "label": 2}\n')
    assert files_error(train, dev) == (f"{dev} line 2: label 2 does not occur in the training data "
                                       f"{train} (labels: 0, 1)")


def test_labels_that_are_not_class_ids(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\na\t0\nb\t1\n")
    dev = write(tmp_path / "dev.tsv", "text\tlabel\nc\t1\nd\tpos\n")
    assert files_error(train, dev) == (f"{dev} line 3: label 'pos' does not occur in the training data {train} "
                                       f"(labels: 0, 1)")
    dev = write(tmp_path / "dev.tsv", "text\tlabel\nc\t-1\n")
    assert files_error(train, dev) == f"{dev} line 2: label -1 is negative (unlabelled rows cannot be used)"
    huge = write(tmp_path / "huge.tsv", "text\tlabel\na\t0\nb\t" + "1" * 21 + "\n")
    assert files_error(huge, dev) == (f"{huge} line 3: label {'1' * 21} has over 20 digits: not a class; "
                                      f"is data.label_column the right column?")
    digits = write(tmp_path / "digits.tsv", "text\tlabel\na\t0\nb\t" + "9" * 5000 + "\n")
    assert files_error(digits, dev).startswith(f"{digits} line 3: label {'9' * 80}... (5000 characters) has over")


def test_preset_labels_must_be_in_range(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\t0\nb\t2\n")
    with pytest.raises(DataError) as info:
        load_classification(DataConfig(name="sst2", path=str(train), eval_path=str(train)))
    assert one_line(str(info.value)) == (f"{train} line 3: label 2 is out of range: this data set has 2 labels "
                                         f"(0 negative, 1 positive)")


def test_preset_label_names_fix_the_ids(tmp_path):
    # only one class in the training file: its id is still the preset's, not 0
    train = write(tmp_path / "train.tsv", "sentence1\tsentence2\tlabel\na\tb\tnot_entailment\nc\td\tnot_entailment\n")
    dev = write(tmp_path / "dev.tsv", "sentence1\tsentence2\tlabel\ne\tf\tentailment\n")
    data = load_classification(DataConfig(name="rte", path=str(train), eval_path=str(dev)))
    assert (data.train.labels, data.eval.labels, data.num_labels) == ([1, 1], [0], 2)
    assert data.label_names == ["entailment", "not_entailment"]
    train = write(tmp_path / "ints.tsv", "sentence1\tsentence2\tlabel\na\tb\t0\n")
    data = load_classification(DataConfig(name="rte", path=str(train), eval_path=str(train)))
    assert (data.num_labels, data.label_names) == (2, ["entailment", "not_entailment"])


def test_too_many_string_labels(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\n" + "".join(f"t\tl{i}\n" for i in range(100_001)))
    assert files_error(train, train) == (f"{train}: 100001 different labels, more than 100000; "
                                         f"is data.label_column the right column?")


def test_load_classification_with_plain_files(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\na\t0\nb\t1\n")

    def error(**paths) -> str:
        cfg = DataConfig(name=None, text_columns=["text"], label_column="label", **paths)
        with pytest.raises(DataError) as info:
            load_classification(cfg)
        return one_line(str(info.value))

    assert error(path=str(tmp_path), eval_path=str(train)) == f"config key 'data.path': {tmp_path} is a folder, not a file"
    assert error(path=str(train), eval_path=str(tmp_path / "dev.tsv")) == (
        f"config key 'data.eval_path': file not found: {tmp_path / 'dev.tsv'}")
    dev = write(tmp_path / "dev.csv", "text,label\n\"x\"y,1\n")
    assert error(path=str(train), eval_path=str(dev)) == f"{dev} line 2: ',' expected after '\"'"


# ================================================================ properties: configs

def section_class(annotation) -> type[BaseModel] | None:
    for kind in (annotation, *typing.get_args(annotation)):
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            return kind
    return None


def numeric_bounds(metadata):
    low = high = None
    low_open = high_open = False
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            low, low_open = item.gt, True
        elif isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Lt):
            high, high_open = item.lt, True
        elif isinstance(item, annotated_types.Le):
            high = item.le
    return low, low_open, high, high_open


def length_bounds(metadata):
    low = next((m.min_length for m in metadata if isinstance(m, annotated_types.MinLen)), 0)
    high = next((m.max_length for m in metadata if isinstance(m, annotated_types.MaxLen)), None)
    return low, high


INT64 = (-2 ** 63, 2 ** 63 - 1)
NOT_A_NUMBER = st.sampled_from(["fast", "", [1], {"a": 1}])
BOOLEAN = st.booleans()  # pydantic alone would read true as 1
NOT_A_STRING = st.sampled_from([3, 2.5, True, ["a"], {"a": "b"}])
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def value_strategies(annotation, metadata=(), allow_none=True):
    """(valid values, invalid values) for one config field's type and constraints."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return (st.none() if allow_none else st.nothing()), st.nothing()
    if origin is typing.Annotated:  # constraints on one arm of a union
        return value_strategies(args[0], tuple(metadata) + args[1:], allow_none)
    if origin in (typing.Union, types.UnionType):
        arms = [value_strategies(a, metadata, allow_none) for a in args]
        invalid = st.one_of(*(i for _, i in arms))
        if len([a for a in args if a is not type(None)]) > 1:  # one arm's invalid value may be another's valid one
            accepts = pydantic.TypeAdapter(annotation)

            def refused(x):
                try:
                    accepts.validate_python(x)
                except pydantic.ValidationError:
                    return True
                return isinstance(x, bool) or (isinstance(x, float) and not math.isfinite(x))

            invalid = invalid.filter(refused)
        return st.one_of(*(v for v, _ in arms)), invalid
    if origin is typing.Literal:
        return st.sampled_from(args), st.one_of(st.text(max_size=8).filter(lambda s: s not in args), NOT_A_STRING)
    if annotation is bool:
        return st.booleans(), st.sampled_from(["maybe", 2, 2.5, [True], {"a": True}])
    if annotation is int:
        low, low_open, high, high_open = numeric_bounds(metadata)
        low = INT64[0] if low is None else low + low_open
        high = INT64[1] if high is None else high - high_open
        beyond_64_bits = st.one_of(st.integers(min_value=2 ** 63), st.integers(max_value=-2 ** 63 - 1))
        invalid = [NOT_A_NUMBER, BOOLEAN, NON_FINITE, st.just(2.5), beyond_64_bits]
        if low > INT64[0]:
            invalid.append(st.integers(max_value=low - 1))
        return st.integers(low, high), st.one_of(*invalid)
    if annotation is float:
        low, low_open, high, high_open = numeric_bounds(metadata)

        def in_bounds(x):  # hypothesis orders -0.0 below 0.0; Python and pydantic do not
            return ((low is None or (x > low if low_open else x >= low))
                    and (high is None or (x < high if high_open else x <= high)))

        valid = st.floats(low, high, exclude_min=low_open, exclude_max=high_open, allow_nan=False,
                          allow_infinity=False).filter(in_bounds)
        invalid = [NOT_A_NUMBER, BOOLEAN, NON_FINITE]
        if low is not None or high is not None:
            invalid.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not in_bounds(x)))
        return valid, st.one_of(*invalid)
    if annotation is str:
        # data.name "none" or "" means "no preset" and reads back as None
        return st.text(min_size=1, max_size=12).filter(lambda s: s.lower() != "none"), NOT_A_STRING
    if origin is list:
        item_valid, item_invalid = value_strategies(args[0], allow_none=False)
        low, high = length_bounds(metadata)
        valid = st.lists(item_valid, min_size=low, max_size=min(high or 3, 3))
        invalid = [st.sampled_from(["abc", 3, {"a": 1}]), st.lists(item_invalid, min_size=1, max_size=2)]
        if low > 0:
            invalid.append(st.just([]))
        if high is not None:
            invalid.append(st.lists(item_valid, min_size=high + 1, max_size=high + 1))
        return valid, st.one_of(*invalid)
    raise AssertionError(f"no strategy for config type {annotation!r}")


def leaf_fields(model=Config, prefix=""):
    """(section class, dotted key, field) for every plain value of the schema, sections within sections too."""
    for name, field in model.model_fields.items():
        section = section_class(field.annotation)
        if section is None:
            yield model, prefix + name, field
        else:
            yield from leaf_fields(section, f"{prefix}{name}.")


FIELD_VALUES = {(model, key.rsplit(".", 1)[-1]): value_strategies(field.annotation, field.metadata)
                for model, key, field in leaf_fields()}
# method.name is a string checked against the method registry, not a Literal of the type
FIELD_VALUES[MethodConfig, "name"] = (st.sampled_from(sorted(METHODS)),
                                      st.one_of(st.text(max_size=8).filter(lambda s: s not in METHODS), NOT_A_STRING))
NOT_A_SECTION = st.sampled_from([3, "x", [1], True])


@st.composite
def config_dicts(draw, model=Config, prefix="", mistakes=None):
    """A random config table for `model` and the dotted keys in it that are invalid.

    `mistakes` holds how many more values may be wrong: none in about a third of the tables, so that
    valid ones are checked too, and one or two in the others, so that a wrong value pydantic lets
    through is not hidden behind one it rejects.
    """
    if mistakes is None:
        mistakes = [draw(st.integers(0, 2))]

    def wrong(odds: int) -> bool:  # wrong with a chance of 1 in `odds` while mistakes are left
        if mistakes[0] and draw(st.integers(1, odds)) == 1:
            mistakes[0] -= 1
            return True
        return False

    raw, invalid_keys = {}, []
    for name, field in model.model_fields.items():
        if not draw(st.booleans()):
            continue
        key = prefix + name
        section = section_class(field.annotation)
        if wrong(32 if section else 6):
            raw[name] = draw(NOT_A_SECTION if section else FIELD_VALUES[model, name][1])
            invalid_keys.append(key)
        elif section is not None:
            if type(None) in typing.get_args(field.annotation) and draw(st.booleans()):
                raw[name] = None
            else:
                raw[name], inner = draw(config_dicts(section, key + ".", mistakes))
                invalid_keys += inner
        else:
            raw[name] = draw(FIELD_VALUES[model, name][0])
    if wrong(16):
        unknown = draw(st.text("abxyz_", min_size=1, max_size=6).filter(lambda k: k not in model.model_fields))
        raw[unknown] = draw(st.integers(0, 9))
        invalid_keys.append(prefix + unknown)
    return raw, invalid_keys


def key_of(message: str) -> str:
    """The dotted key a ConfigError names; '' for a check across sections."""
    found = re.match(r"^(?:unknown )?config key '([^']*)'", message)
    return found.group(1) if found else ""


def at(raw: dict, key: str):
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def assert_same_values(raw: dict, dumped: dict, prefix=""):
    for name, value in raw.items():
        if isinstance(value, dict):
            assert_same_values(value, dumped[name], f"{prefix}{name}.")
        else:
            assert dumped[name] == value and type(dumped[name]) is type(value), f"{prefix}{name}"


@settings(bounded, max_examples=1000)
@given(config_dicts())
def test_random_configs(drawn):
    raw, invalid_keys = drawn
    try:
        cfg = build_config(raw)
    except ConfigError as err:
        message = one_line(str(err))
        key = key_of(message)
        # the key named is a bad one or lies inside one, or it is a check across the fields of a section
        # (or of the whole config), which may fail even when every value is valid alone
        across_fields = key == "" or isinstance(at(raw, key), dict)
        assert across_fields or any(key == k or key.startswith(k + ".") for k in invalid_keys), message
    else:
        assert not invalid_keys, f"accepted invalid {invalid_keys}"
        assert_same_values(raw, cfg.model_dump())


# ================================================================ properties: --set

def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    escaped = "".join(c if c.isprintable() and c not in '"\\' else
                      (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}") for c in value)
    return f'"{escaped}"'


LEAVES = [(key, FIELD_VALUES[MethodConfig, "name"][0] if key == "method.name"
           else value_strategies(field.annotation, field.metadata, allow_none=False)[0])
          for _, key, field in leaf_fields()]


@st.composite
def overrides(draw):
    key, values = draw(st.sampled_from(LEAVES))
    return key, draw(values)


@bounded
@given(overrides(), st.sampled_from(["=", " = ", "= "]))
def test_valid_overrides_round_trip(override, equals):
    key, value = override
    item = f"{key}{equals}{toml_value(value)}"
    assert parse_override(item) == (key.split("."), value)
    try:
        cfg = build_config(apply_overrides({}, [item]))
    except ConfigError as err:
        # a valid value can only break a check across the fields of a section holding it (or of the
        # whole config), such as clients_per_round <= num_clients
        named = key_of(one_line(str(err)))
        assert named == "" or key.startswith(named + "."), str(err)
    else:
        assert at(cfg.model_dump(), key) == value


@bounded
@given(st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from([k for k, _ in LEAVES] + ["train", "x.y", "seed.a", "."]),
              st.text(max_size=20)),
))
def test_random_overrides(item):
    try:
        raw = apply_overrides({}, [item])
        build_config(raw)
    except ConfigError as err:
        one_line(str(err))
    else:
        keys, value = parse_override(item)
        assert all(keys) and at(raw, ".".join(keys)) == value


# ================================================================ properties: data files

TEXT = st.text(min_size=1, max_size=20).filter(str.strip)
LINE_TEXT = TEXT.filter(lambda s: not set(s) & set("\t\r\n"))  # TSV is read without quoting
LABEL = st.text(min_size=1, max_size=8).filter(lambda s: s == s.strip() and s)
LINE_LABEL = LABEL.filter(lambda s: not set(s) & set("\t\r\n"))
SUFFIXES = [".tsv", ".csv", ".jsonl", ".json"]


@st.composite
def tables(draw):
    """(suffix, file bytes, text columns, expected read_table result) for valid rows."""
    suffix = draw(st.sampled_from(SUFFIXES))
    delimited = suffix in (".tsv", ".csv")
    text = LINE_TEXT if suffix == ".tsv" else TEXT
    label = (LINE_LABEL if suffix == ".tsv" else LABEL) if delimited else st.one_of(LABEL, st.integers(-3, 10 ** 6))
    text_columns = ["text", "text_b"][:draw(st.integers(1, 2))]
    columns = draw(st.permutations([*text_columns, "label", "idx"]))
    rows = draw(st.lists(st.fixed_dictionaries({"text": text, "text_b": text, "label": label, "idx": st.integers(0, 9)}),
                         min_size=1, max_size=5))
    for row in rows:
        row["idx"] = str(row["idx"]) if delimited else row["idx"]
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    lines = [columns, *([row[c] for c in columns] for row in rows)]
    if suffix == ".tsv":
        content = "".join("\t".join(line) + newline for line in lines)
    elif suffix == ".csv":
        def quoted(field):
            return '"' + field.replace('"', '""') + '"' if set(field) & set(',"\r\n') else field
        content = "".join(",".join(map(quoted, line)) + newline for line in lines)
    else:
        objects = [{c: row[c] for c in columns} for row in rows]
        ascii_only = draw(st.booleans())
        if suffix == ".jsonl":
            content = newline.join(json.dumps(o, ensure_ascii=ascii_only) for o in objects) + newline
        else:
            content = json.dumps(objects, ensure_ascii=ascii_only, indent=draw(st.sampled_from([None, 1])))
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    expected = ([r["text"] for r in rows], [r["text_b"] for r in rows] if len(text_columns) == 2 else None,
                [r["label"] for r in rows])
    return suffix, bom + content.encode("utf-8"), text_columns, expected


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_input")


def read_or_error(path: Path, text_columns=("text",)):
    """read_table's result, or None after checking that its DataError is one line naming the file."""
    try:
        return read_table(path, list(text_columns), "label")
    except DataError as err:
        assert one_line(str(err)).startswith(str(path)), str(err)
        return None


@bounded
@given(tables())
def test_valid_rows_round_trip(scratch, table):
    suffix, content, text_columns, expected = table
    path = write(scratch / f"valid{suffix}", content)
    assert read_table(path, text_columns, "label") == expected


def assert_sane(result):
    if result is not None:
        text_a, text_b, labels = result
        assert len(text_a) == len(labels) >= 1 and text_b is None
        assert all(isinstance(t, str) and t.strip() for t in text_a)
        assert all(type(v) is int or (type(v) is str and v == v.strip() and v) for v in labels)


@bounded
@given(st.sampled_from(SUFFIXES), st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.builds(lambda head, body: (head + body).encode("utf-8"),
              st.sampled_from(["text\tlabel\n", "text,label\n", '{"text": ', '[{"text": "a", "label": ']),
              st.text(max_size=100)),
))
def test_random_bytes_never_crash(scratch, suffix, content):
    assert_sane(read_or_error(write(scratch / f"noise{suffix}", content)))


@bounded
@given(tables(), st.data())
def test_corrupted_files_never_crash(scratch, table, data):
    suffix, content, text_columns, _ = table
    at_byte = data.draw(st.integers(0, len(content)))
    noise = data.draw(st.one_of(st.binary(max_size=8), st.text(max_size=8).map(str.encode),
                                st.sampled_from([b'"', b"\t", b",", b"\n", b"{", b"]", b"\\u", b"\xff"]),
                                # deep nesting, a number int() refuses, a field over csv's default limit
                                st.sampled_from([b"[" * 50_000, b"9" * 5_000, b"x" * 200_000])))
    path = write(scratch / f"corrupt{suffix}", content[:at_byte] + noise + content[at_byte:])
    result = read_or_error(path, text_columns)
    if result is not None:
        text_a, text_b, labels = result
        assert len(text_a) == len(labels) and (text_b is None) == (len(text_columns) == 1)


RAW_LABEL = st.one_of(st.integers(-2, 4), st.just(10 ** 6), st.sampled_from(["a", "b", "1", " 2 ", "+3", "x y"]))


def integer_label(value):
    if isinstance(value, int):
        return value
    return int(value) if re.fullmatch(r"[+-]?[0-9]+", value.strip()) else None


@bounded
@given(st.lists(RAW_LABEL, min_size=1, max_size=6), st.lists(RAW_LABEL, min_size=1, max_size=4))
def test_label_encoding(scratch, train_labels, eval_labels):
    train = write(scratch / "train.jsonl", "".join(json.dumps({"text": "t", "label": v}) + "\n" for v in train_labels))
    dev = write(scratch / "dev.jsonl", "".join(json.dumps({"text": "t", "label": v}) + "\n" for v in eval_labels))
    train_ints = [integer_label(v) for v in train_labels]
    eval_ints = [integer_label(v) for v in eval_labels]
    if all(v is not None for v in train_ints):
        values = sorted(set(train_ints))  # the classes, in numeric order, become ids 0..k-1
        expected_ok = min(values) >= 0 and all(v in values for v in eval_ints)
        expected = ([values.index(v) for v in train_ints],
                    [values.index(v) for v in eval_ints] if expected_ok else None)
    elif any(v is not None for v in train_ints):
        expected_ok = False  # integers mixed with names: one kind is a typo
    else:
        names = sorted({str(v).strip() for v in train_labels})
        expected_ok = all(str(v).strip() in names for v in eval_labels)
        expected = ([names.index(str(v).strip()) for v in train_labels],
                    [names.index(str(v).strip()) for v in eval_labels] if expected_ok else None)
    try:
        data = read_classification_files(train, dev, ["text"], "label")
    except DataError as err:
        assert not expected_ok, str(err)
        assert one_line(str(err)).startswith((str(train), str(dev)))
    else:
        assert expected_ok
        assert (data.train.labels, data.eval.labels) == expected
        assert data.num_labels == len(data.label_names) > max(data.train.labels + data.eval.labels)


# ---------------------------------------------------------------- model folder and token limit

def test_model_folder_without_a_tokenizer_is_refused_before_its_weights(tmp_path, monkeypatch, sim_config):
    from transformers import AutoModelForSequenceClassification

    from conftest import tiny_bert
    from fedlora.simulator import Simulator

    folder = tmp_path / "no-tokenizer"
    tiny_bert().save_pretrained(folder)  # weights and config.json only: transformers would build a 5-token vocabulary

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_weights)
    with pytest.raises(ConfigError) as info:
        Simulator(sim_config(model={"path": str(folder)}), tmp_path / "run", progress=False)
    assert str(info.value).startswith(f"model: {folder} has no tokenizer (none of tokenizer.json, vocab.txt")


@pytest.mark.parametrize("max_length, message", [
    (1, "config key 'data.max_length': 1 is too small: an example needs at least 3 tokens (2 special tokens and "
        "one token of each of its 1 text)"),
    (2, "config key 'data.max_length': 2 is too small: an example needs at least 3 tokens"),
    (513, "config key 'data.max_length': 513 is more than the model takes (512 tokens)"),
])
def test_max_length_the_tokenizer_cannot_honour_is_refused(tmp_path, sim_config, max_length, message):
    from fedlora.simulator import Simulator

    with pytest.raises(ConfigError) as info:
        Simulator(sim_config(data={"max_length": max_length}), tmp_path, progress=False)
    assert str(info.value).startswith(message)


def test_max_length_is_honoured(tmp_path, sim_config):
    from fedlora.simulator import Simulator

    sim = Simulator(sim_config(data={"max_length": 3}), tmp_path, progress=False)
    assert sim.task.batch(range(8))["input_ids"].shape[1] == 3  # [CLS], one word, [SEP]


# ---------------------------------------------------------------- fewer than two classes

@pytest.mark.parametrize("preset", [None, "sst2"])
def test_single_class_training_data_is_refused_before_the_weights(tmp_path, monkeypatch, sim_config, preset):
    from transformers import AutoModelForSequenceClassification

    from fedlora.simulator import Simulator

    train = write(tmp_path / "train.tsv", "sentence\tlabel\n" + "".join(f"film {i}\t1\n" for i in range(40)))
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\n")

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_weights)
    cfg = sim_config(data={"name": preset, "path": str(train), "eval_path": str(dev)})
    with pytest.raises(DataError) as info:
        Simulator(cfg, tmp_path / "run", progress=False)
    name = "positive" if preset else "1"  # the preset names its class ids
    assert one_line(str(info.value)) == (f"{train}: the training data has only class '{name}' (40 rows); a "
                                         "classifier needs at least two (is data.label_column the right column?)")
    assert not (tmp_path / "run").exists()


def test_single_class_examples_in_memory_are_refused(tmp_path, sim_config):
    import fedlora

    rows = [{"sentence": f"film {i}", "label": "pos"} for i in range(12)]
    with pytest.raises(DataError, match=r"^train_data: the training data has only class 'pos' \(12 rows\)"):
        fedlora.run(sim_config().to_dict(), out=tmp_path, train_data=rows, eval_data=rows, progress=False)


def test_two_classes_are_enough(tmp_path, sim_config):
    from fedlora.simulator import Simulator

    train = write(tmp_path / "train.tsv", "sentence\tlabel\n" + "".join(f"film {i}\t{int(i == 7)}\n"
                                                                         for i in range(40)))
    cfg = sim_config(data={"path": str(train), "eval_path": str(train), "partition": "iid"})
    assert Simulator(cfg, tmp_path / "run", progress=False).task.data.num_labels == 2


def test_an_evaluation_label_the_trained_model_lacks_is_named_once(tmp_path):
    from fedlora.data.presets import load_evaluation

    dev = write(tmp_path / "dev.tsv", "text\tlabel\nc\tneg\nd\tmaybe\n")
    cfg = DataConfig(name=None, path=str(dev), eval_path=str(dev), text_columns=["text"], label_column="label")
    with pytest.raises(DataError) as info:
        load_evaluation(cfg, ["neg", "pos"])
    assert one_line(str(info.value)) == (f"{dev} line 3: label 'maybe' does not occur in the training data of the "
                                         "trained model (labels: neg, pos)")
