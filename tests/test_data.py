import re
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from fedlora.config import DataConfig
from fedlora.data import (
    ClassificationSplit,
    load_classification,
    load_hub,
    partition,
    read_classification_files,
    read_table,
)
from fedlora.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def files_config(train: Path, evaluation: Path, **kw) -> DataConfig:
    kw.setdefault("text_columns", ["text"])
    kw.setdefault("label_column", "label")
    return DataConfig(name=None, path=str(train), eval_path=str(evaluation), **kw)


# ---------------------------------------------------------------- readers

def test_tsv_keeps_quotes_and_skips_blank_lines(tmp_path):
    path = write(tmp_path / "t.tsv", 'sentence\tlabel\n"great , he said\t1\nbad , "really\t0\n\n')
    text_a, text_b, labels = read_table(path, ["sentence"], "label")
    assert text_a == ['"great , he said', 'bad , "really']
    assert text_b is None
    assert labels == ["1", "0"]


def test_tsv_two_text_columns_in_any_order(tmp_path):
    path = write(tmp_path / "rte.tsv", "idx\tsentence2\tlabel\tsentence1\n0\tB one\tx\tA one\n1\tB two\ty\tA two\n")
    text_a, text_b, labels = read_table(path, ["sentence1", "sentence2"], "label")
    assert text_a == ["A one", "A two"]
    assert text_b == ["B one", "B two"]
    assert labels == ["x", "y"]


def test_csv_with_quoted_commas(tmp_path):
    path = write(tmp_path / "t.csv", 'text,label\n"good, very good",1\nbad,0\n')
    assert read_table(path, ["text"], "label") == (["good, very good", "bad"], None, ["1", "0"])


def test_jsonl_and_json(tmp_path):
    jsonl = write(tmp_path / "t.jsonl", '{"text": "a\u2028b", "label": 1, "extra": 5}\n\n{"text": "c", "label": 0}\n')
    assert read_table(jsonl, ["text"], "label") == (["a\u2028b", "c"], None, [1, 0])
    js = write(tmp_path / "t.json", '[{"q": "x", "p": "y", "answer": "yes"}, {"q": "z", "p": "w", "answer": "no"}]')
    assert read_table(js, ["q", "p"], "answer") == (["x", "z"], ["y", "w"], ["yes", "no"])


def test_utf8_bom_is_ignored(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_bytes(b"\xef\xbb\xbfsentence\tlabel\nhello\t1\n")
    assert read_table(path, ["sentence"], "label")[0] == ["hello"]


# ---------------------------------------------------------------- reader errors

def read_error(path: Path, text_columns=("sentence",), label_column="label") -> str:
    with pytest.raises(DataError) as info:
        read_table(path, list(text_columns), label_column)
    return str(info.value)


def test_missing_file(tmp_path):
    assert read_error(tmp_path / "nope.tsv") == f"{tmp_path / 'nope.tsv'}: file not found"


def test_unsupported_suffix(tmp_path):
    message = read_error(write(tmp_path / "t.txt", "x"))
    assert "t.txt" in message and ".tsv" in message and ".jsonl" in message


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_bytes(b"sentence\tlabel\nok\t1\nbad \xff byte\t0\n")
    assert read_error(path).startswith(f"{path} line 3: not valid UTF-8")


def test_missing_column_lists_available(tmp_path):
    message = read_error(write(tmp_path / "t.tsv", "text\ttarget\nhi\t1\n"))
    assert message.startswith(f"{tmp_path / 't.tsv'} line 1: no column 'sentence', 'label'")
    assert "available: text, target" in message


def test_field_count(tmp_path):
    path = write(tmp_path / "t.tsv", "sentence\tlabel\nok\t1\na\tb\t0\n")
    assert read_error(path) == f"{path} line 3: expected 2 tab-separated fields, got 3"


def test_empty_file_and_header_only(tmp_path):
    assert read_error(write(tmp_path / "e.tsv", "")).endswith("e.tsv: file is empty")
    assert read_error(write(tmp_path / "e.jsonl", "\n\n")).endswith("e.jsonl: file is empty")
    assert read_error(write(tmp_path / "h.tsv", "sentence\tlabel\n")).endswith("h.tsv: no data rows")


def test_empty_text_and_missing_label(tmp_path):
    path = write(tmp_path / "t.tsv", "sentence\tlabel\nok\t1\n  \t0\n")
    assert read_error(path) == f"{path} line 3: empty text"
    path = write(tmp_path / "u.tsv", "sentence\tlabel\nok\t1\nfine\t\n")
    assert read_error(path) == f"{path} line 3: missing label"
    path = write(tmp_path / "n.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": null}\n')
    assert read_error(path) == f"{path} line 2: missing label"
    path = write(tmp_path / "f.jsonl", '{"sentence": "a", "label": 0.5}\n')
    assert read_error(path).startswith(f"{path} line 1: label must be an integer or a string")


def test_jsonl_errors_name_the_line(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"sentence": "a", "label": 1}\n\n{"sentence": "b", "label": 1\n')
    assert read_error(path).startswith(f"{path} line 3: invalid JSON")
    path = write(tmp_path / "l.jsonl", '{"sentence": "a", "label": 1}\n[1, 2]\n')
    assert read_error(path) == f"{path} line 2: expected a JSON object, got list"
    path = write(tmp_path / "k.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", "y": 1}\n')
    message = read_error(path)
    assert message.startswith(f"{path} line 2: no column 'label'") and "available: sentence, y" in message
    path = write(tmp_path / "s.jsonl", '{"sentence": 3, "label": 1}\n')
    assert read_error(path) == f"{path} line 1: text must be a string, got int"


def test_json_errors(tmp_path):
    path = write(tmp_path / "t.json", '[\n{"sentence": "a", "label": 1},\n{"sentence": "b" "label": 1}\n]')
    assert read_error(path).startswith(f"{path} line 3: invalid JSON")
    path = write(tmp_path / "o.json", '{"sentence": "a", "label": 1}')
    assert read_error(path) == f"{path}: expected a JSON list of objects, got dict"
    path = write(tmp_path / "i.json", '[{"sentence": "a", "label": 1}, {"sentence": "", "label": 1}]')
    assert read_error(path) == f"{path} item 2: empty text"


# ---------------------------------------------------------------- labels

def test_string_labels_use_sorted_train_vocabulary(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\na\tpos\nb\tneg\nc\tneutral\nd\tpos\n")
    dev = write(tmp_path / "dev.tsv", "text\tlabel\ne\tneutral\nf\tneg\n")
    data = read_classification_files(train, dev, ["text"], "label")
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.num_labels == 3
    assert data.train.labels == [2, 0, 1, 2]
    assert data.eval.labels == [1, 0]
    assert data.train.source == str(train) and len(data.eval) == 2


def test_integer_string_labels_are_converted(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,2\nb,0\nc,2\nd,1\n")
    dev = write(tmp_path / "dev.jsonl", '{"text": "d", "label": 1}\n{"text": "e", "label": "0"}\n')
    data = read_classification_files(train, dev, ["text"], "label")
    assert data.train.labels == [2, 0, 2, 1] and data.eval.labels == [1, 0]
    assert data.num_labels == 3 and data.label_names == ["0", "1", "2"]


def test_integer_labels_map_to_contiguous_ids(tmp_path):
    # labels 1..4 (as AG News ships them) are four classes, ids 0..3, in numeric order (10 after 9)
    train = write(tmp_path / "train.csv", "text,label\na,4\nb,1\nc,10\nd,2\ne,01\n")
    dev = write(tmp_path / "dev.jsonl", '{"text": "f", "label": 10}\n{"text": "g", "label": "2"}\n')
    data = read_classification_files(train, dev, ["text"], "label")
    assert data.label_names == ["1", "2", "4", "10"] and data.num_labels == 4
    assert data.train.labels == [2, 0, 3, 1, 0] and data.eval.labels == [3, 1]
    dev = write(tmp_path / "dev3.csv", "text,label\nf,1\ng,3\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(dev))} line 3: label 3 does not occur in the training "
                                        rf"data {re.escape(str(train))} \(labels: 1, 2, 4, 10\)"):
        read_classification_files(train, dev, ["text"], "label")


def test_a_label_that_is_not_a_class_is_refused(tmp_path):
    # 0.5 or a typo among integer labels would add a class without a word: refused with its line
    for typo in ("0.5", "l", "2x"):
        train = write(tmp_path / "train.csv", f"text,label\na,1\nb,2\nc,{typo}\nd,1\n")
        with pytest.raises(DataError, match=rf"^{re.escape(str(train))} line 4: label '{re.escape(typo)}' is not "
                                            rf"an integer, but 3 of the 4 training labels are"):
            read_classification_files(train, train, ["text"], "label")
    train = write(tmp_path / "train.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(train))} line 2: label must be an integer or a string"):
        read_classification_files(train, train, ["text"], "label")
    train = write(tmp_path / "names.csv", "text,label\na,pos\nb,neg\nc,7\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(train))} line 4: label 7 is an integer, but 2 of the 3 "):
        read_classification_files(train, train, ["text"], "label")


def test_headerless_csv_with_column_numbers(tmp_path):
    train = write(tmp_path / "train.csv", '3,"Wall St. rises","Stocks, bonds"\n1,"Cup final",x\n')
    data = load_classification(DataConfig(name=None, path=str(train), header=False, text_columns=[1, 2],
                                          label_column=0, holdout_fraction=0.5))
    assert sorted(data.train.text_a + data.eval.text_a) == ["Cup final", "Wall St. rises"]
    assert data.label_names == ["1", "3"]
    text_a, text_b, labels = read_table(train, [1], 0, header=False)
    assert (text_a, text_b, labels) == (["Wall St. rises", "Cup final"], None, ["3", "1"])
    with pytest.raises(DataError, match=rf"^{re.escape(str(train))} line 1: no column 3 \(a row has 3 fields: "
                                        rf"columns 0..2\)"):
        read_table(train, [3], 0, header=False)
    ragged = write(tmp_path / "ragged.tsv", "1\ta\n2\tb\textra\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(ragged))} line 2: expected 2 tab-separated fields, got 3"):
        read_table(ragged, [1], 0, header=False)
    jsonl = write(tmp_path / "x.jsonl", '{"a": "t", "b": 1}\n')
    with pytest.raises(DataError, match="column numbers are for CSV/TSV"):
        read_table(jsonl, [0], 1, header=False)


@pytest.mark.parametrize("data, message", [
    (dict(text_columns=[1], label_column=0), "data.text_columns: column numbers .*need data.header = false"),
    (dict(header=False, text_columns=["text"], label_column=0), "data.text_columns: with data.header = false"),
    (dict(header=False, text_columns=[1], label_column="label"), "data.label_column: with data.header = false"),
    (dict(header=False, text_columns=[-1], label_column=0), "data.text_columns.0.*greater than or equal to 0"),
])
def test_column_numbers_go_with_header_false(data, message):
    from fedlora.config import build_config
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        build_config({"data": {"name": "none", **data}})


def test_eval_label_unseen_in_train(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\na\tpos\nb\tneg\n")
    dev = write(tmp_path / "dev.tsv", "text\tlabel\nc\tneg\nd\tmaybe\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(dev))} line 3: label 'maybe' does not occur in the training data"):
        read_classification_files(train, dev, ["text"], "label")
    train = write(tmp_path / "train.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    dev = write(tmp_path / "dev.jsonl", '{"text": "a", "label": 2}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(dev))} line 1: label 2 does not occur in the training data"):
        read_classification_files(train, dev, ["text"], "label")
    dev = write(tmp_path / "dev2.jsonl", '{"text": "a", "label": "pos"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(dev))} line 1: label 'pos' does not occur"):
        read_classification_files(train, dev, ["text"], "label")


def test_negative_label(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\na\t0\nb\t-1\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(train))} line 3: label -1 is negative"):
        read_classification_files(train, train, ["text"], "label")


# ---------------------------------------------------------------- load_classification

def test_plain_files_need_columns_and_eval_path(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\na\t0\nb\t1\n")
    with pytest.raises(DataError, match="data.text_columns"):
        load_classification(DataConfig(name=None, path=str(train), eval_path=str(train), label_column="label"))
    with pytest.raises(DataError, match="data.label_column"):
        load_classification(DataConfig(name=None, path=str(train), eval_path=str(train), text_columns=["text"]))
    with pytest.raises(DataError, match="data.eval_path.*or set data.holdout_fraction"):
        load_classification(DataConfig(name=None, path=str(train), text_columns=["text"], label_column="label"))
    with pytest.raises(DataError, match=rf"data.path.*{re.escape(str(tmp_path / 'missing.tsv'))}"):
        load_classification(files_config(tmp_path / "missing.tsv", train))
    with pytest.raises(DataError, match=rf"data.eval_path.*{re.escape(str(tmp_path / 'missing.tsv'))}"):
        load_classification(files_config(train, tmp_path / "missing.tsv"))
    data = load_classification(files_config(train, train))
    assert data.train.labels == [0, 1] and data.train.text_a == ["a", "b"]


def test_path_with_preset_finds_eval_file_next_to_it(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    write(tmp_path / "dev.tsv", "sentence\tlabel\nc\t1\n")
    data = load_classification(DataConfig(name="sst2", path=str(train)))
    assert data.eval.text_a == ["c"] and data.label_names == ["negative", "positive"]
    with pytest.raises(DataError, match="test.tsv not found"):
        load_classification(DataConfig(name="sst2", path=str(train), eval_split="test"))
    with pytest.raises(DataError, match="no column 'sentence'.*data.text_columns"):
        load_classification(DataConfig(name="sst2", path=str(write(tmp_path / "x.tsv", "text\tlabel\na\t0\n"))))


def test_unknown_preset_names_key():
    with pytest.raises(DataError, match=r"'data.name'.*'sst3'.*sst2, rte, imdb"):
        load_classification(DataConfig(name="sst3"))


def test_local_source_needs_root(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDLORA_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="data.root or FEDLORA_DATA_DIR"):
        load_classification(DataConfig(name="sst2", source="local"))
    (tmp_path / "rte").mkdir()
    write(tmp_path / "rte" / "train.tsv", "sentence1\tsentence2\tlabel\tidx\na\tb\t0\t0\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'rte' / 'dev.tsv'))} not found: set data.root or FEDLORA"):
        load_classification(DataConfig(name="rte", root=str(tmp_path)))


def test_unknown_eval_split_lists_available(tmp_path):
    (tmp_path / "rte").mkdir()
    with pytest.raises(DataError, match=r"'data.eval_split'.*'test'.*available: train, dev"):
        load_classification(DataConfig(name="rte", root=str(tmp_path), eval_split="test"))


def test_max_train_examples_is_a_fixed_random_subset(tmp_path):
    rows = "".join(f"t{i}\t{int(i >= 100)}\n" for i in range(200))  # sorted by label
    train = write(tmp_path / "train.tsv", "text\tlabel\n" + rows)
    full = load_classification(files_config(train, train))
    small = load_classification(files_config(train, train, max_train_examples=20))
    again = load_classification(files_config(train, train, max_train_examples=20))
    assert len(small.train) == 20 and small.train.text_a == again.train.text_a
    assert set(small.train.text_a) <= set(full.train.text_a)
    assert 5 <= sum(small.train.labels) <= 15  # both classes, unlike the first 20 rows
    assert len(small.eval) == 200 and small.num_labels == 2


def test_holdout_evaluates_on_held_out_training_rows(tmp_path):
    rows = "".join(f"t{i}\t{i % 2}\n" for i in range(200))
    train = write(tmp_path / "train.tsv", "text\tlabel\n" + rows)

    def held_out(**keys):
        return DataConfig(name=None, path=str(train), text_columns=["text"], label_column="label", **keys)

    tuned = load_classification(held_out(holdout_fraction=0.1))
    again = load_classification(held_out(holdout_fraction=0.1))
    assert len(tuned.eval) == 20 and len(tuned.train) == 180 and tuned.eval.text_a == again.eval.text_a
    assert not set(tuned.eval.text_a) & set(tuned.train.text_a)  # held out, never trained on
    assert set(tuned.eval.text_a) | set(tuned.train.text_a) == {f"t{i}" for i in range(200)}
    assert tuned.eval.text_a != [f"t{i}" for i in range(20)]  # a random draw, not the first rows
    assert all(int(t[1:]) % 2 == label for t, label in zip(tuned.eval.text_a, tuned.eval.labels))
    smaller = load_classification(held_out(holdout_fraction=0.1, max_train_examples=50))
    assert smaller.eval.text_a == tuned.eval.text_a and set(smaller.train.text_a) <= set(tuned.train.text_a)
    tiny = write(tmp_path / "tiny.tsv", "text\tlabel\nx\t0\n")
    with pytest.raises(DataError, match="data.holdout_fraction"):
        load_classification(DataConfig(name=None, path=str(tiny), text_columns=["text"], label_column="label",
                                       holdout_fraction=0.5))
    # two sources of evaluation data are refused, naming both keys
    dev = write(tmp_path / "dev.tsv", "text\tlabel\nd0\t0\nd1\t1\n")
    for key, value in (("eval_path", str(dev)), ("eval_split", "validation")):
        with pytest.raises(ValidationError, match=f"data.{key} and data.holdout_fraction"):
            held_out(holdout_fraction=0.1, **{key: value})


# ---------------------------------------------------------------- hub (datasets.load_dataset replaced)

@pytest.fixture
def fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(hub_id, subset=None, split=None):
        calls.append((hub_id, subset, split))
        if split == "broken":
            raise ConnectionError("no network\nmore detail")
        return datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1], "idx": [0, 1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("FEDLORA_DATA_DIR", raising=False)
    return calls


def test_auto_without_local_copy_uses_hub(fake_hub):
    data = load_classification(DataConfig(name="sst2"))
    assert fake_hub == [("nyu-mll/glue", "sst2", "train"), ("nyu-mll/glue", "sst2", "validation")]
    assert data.train.labels == [1, 0, 1] and data.eval.source == "nyu-mll/glue/sst2[validation]"
    with pytest.raises(DataError, match=r"'data.eval_split'.*'test' on the hub \(available: train, dev\)"):
        load_classification(DataConfig(name="sst2", source="hub", eval_split="test"))


def test_hub_errors(fake_hub):
    with pytest.raises(DataError, match=r"^could not load split 'broken' of 'x/y'.*: no network \(set data.root"):
        load_hub("x/y", None, "broken", ["sentence"], "label")
    with pytest.raises(DataError, match=r"^x/y\[train\]: no column 'text'.*available: sentence, label, idx"):
        load_hub("x/y", None, "train", ["text"], "label")
    assert load_hub("x/y", None, "train", ["sentence"], "label") == (["good", "bad", "fine"], None, [1, 0, 1])


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install 'fedlora\[hub\]'"):
        load_hub("nyu-mll/glue", "sst2", "train", ["sentence"], "label")


# ---------------------------------------------------------------- presets on the shared data

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} not found")


@pytest.fixture
def shared_root(monkeypatch):
    monkeypatch.setenv("FEDLORA_DATA_DIR", str(SHARED_DATA))


@needs_shared
def test_sst2_preset(shared_root):
    data = load_classification(DataConfig(name="sst2", source="local"))
    assert (len(data.train), len(data.eval), data.num_labels) == (67_349, 872, 2)
    assert data.train.text_b is None and set(data.train.labels) == {0, 1}
    assert data.eval.source.endswith("sst2/dev.tsv")
    assert len(load_classification(DataConfig(name="sst2", eval_split="test")).eval) == 1_821


@needs_shared
def test_rte_preset(shared_root):
    data = load_classification(DataConfig(name="rte"))
    assert (len(data.train), len(data.eval), data.num_labels) == (2_490, 277, 2)
    assert len(data.train.text_b) == 2_490 and data.label_names == ["entailment", "not_entailment"]


@needs_shared
def test_imdb_preset(shared_root):
    data = load_classification(DataConfig(name="imdb"))
    assert (len(data.train), len(data.eval), data.num_labels) == (25_000, 25_000, 2)
    assert data.eval.source.endswith("imdb/test.jsonl")
    assert sum(data.train.labels) == 12_500


# ---------------------------------------------------------------- partition

def class_labels(n=2000, num_labels=4, seed=1):
    return np.random.default_rng(seed).integers(0, num_labels, n)


def assert_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def test_iid_near_equal_disjoint_cover():
    parts = partition(class_labels(1003), 10, "iid", seed=0)
    assert_disjoint_cover(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_seeded_determinism(scheme):
    labels = class_labels()
    a = partition(labels, 8, scheme, seed=3)
    b = partition(labels, 8, scheme, seed=3)
    c = partition(labels, 8, scheme, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_cover_and_minimum():
    labels = class_labels()
    parts = partition(labels, 10, "dirichlet", seed=0, dirichlet_alpha=0.1, min_client_examples=20)
    assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 20


def label_skew(labels, parts, num_labels=4):
    """Mean total-variation distance between each client's label distribution and the global one."""
    overall = np.bincount(labels, minlength=num_labels) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=num_labels) / len(p) - overall).sum()
                    for p in parts])


def test_small_alpha_is_more_skewed():
    labels = class_labels()
    skewed = partition(labels, 10, "dirichlet", seed=0, dirichlet_alpha=0.1)
    even = partition(labels, 10, "dirichlet", seed=0, dirichlet_alpha=100.0)
    assert label_skew(labels, skewed) > 0.4
    assert label_skew(labels, even) < 0.1


def test_dirichlet_impossible_minimum():
    with pytest.raises(DataError, match=r"'data.dirichlet_alpha' = 0.001.*at least 2 .*data.min_client_examples"):
        partition(class_labels(20), 10, "dirichlet", seed=0, dirichlet_alpha=0.001, min_client_examples=2)


@pytest.mark.parametrize("proportions", [
    [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]],
    [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9], [0.2, 0.3, 0.5]],
])
def test_label_proportion_compositions(proportions):
    num_labels = len(proportions[0])
    labels = np.random.default_rng(0).choice(num_labels, 3000, p=np.linspace(1, 2, num_labels) / np.linspace(1, 2, num_labels).sum())
    parts = partition(labels, len(proportions), "label_proportion", seed=0, label_proportions=proportions)
    sizes = {len(p) for p in parts}
    assert len(sizes) == 1
    size = sizes.pop()
    assert len(np.unique(np.concatenate(parts))) == size * len(parts)
    for part, row in zip(parts, proportions):
        counts = np.bincount(labels[part], minlength=num_labels)
        assert np.all(np.abs(counts - np.asarray(row) * size) < 1)
    # the size is the largest one that the scarcest label allows (up to rounding)
    demand = np.asarray(proportions).sum(axis=0)
    assert size >= np.min(np.bincount(labels) / demand) - len(proportions)


def test_label_proportion_ffa_example_uses_all_it_can():
    labels = np.array([0] * 300 + [1] * 700)
    parts = partition(labels, 3, "label_proportion", seed=0, label_proportions=[[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]])
    assert [len(p) for p in parts] == [200, 200, 200]
    assert [np.bincount(labels[p]).tolist() for p in parts] == [[20, 180], [180, 20], [100, 100]]


@pytest.mark.parametrize("rows, message", [
    ([[0.5, 0.5], [0.5, 0.5, 0.0]], r"row 1: 3 entries, but the data has 2 labels"),
    ([[0.5, 0.5], [1.5, -0.5]], r"row 1: entries must be non-negative"),
    ([[0.5, 0.6], [0.5, 0.5]], r"row 0: entries must sum to 1"),
    ([[0.5, 0.5]], r"1 rows for 2 clients"),
    (None, r"is required"),
])
def test_label_proportion_bad_rows(rows, message):
    with pytest.raises(DataError, match=r"'data.label_proportions'.*" + message):
        partition(class_labels(100, 2), 2, "label_proportion", seed=0, label_proportions=rows)


def test_partition_argument_errors():
    with pytest.raises(DataError, match="5 clients but only 4 training examples"):
        partition([0, 1, 0, 1], 5, "iid", seed=0)
    with pytest.raises(DataError, match="at least 1 client"):
        partition([0, 1], 0, "iid", seed=0)
    with pytest.raises(DataError, match=r"'data.partition'.*'shards'"):
        partition([0, 1], 1, "shards", seed=0)
    with pytest.raises(DataError, match=r"'data.min_client_examples'"):
        partition([0, 1, 0, 1], 2, "iid", seed=0, min_client_examples=3)


def test_split_select():
    split = ClassificationSplit(["a", "b", "c"], ["x", "y", "z"], [0, 1, 0], "mem")
    assert split.select(np.array([2, 0])) == ClassificationSplit(["c", "a"], ["z", "x"], [0, 0], "mem")


# ---------------------------------------------------------------- the evaluation sample and the label map

def test_eval_max_examples_is_a_fixed_stratified_sample():
    from fedlora.data.partition import stratified_sample

    labels = np.repeat([0, 1, 2], [600, 300, 100])  # sorted by label, as GLUE-like files can be
    chosen = stratified_sample(labels, 50, seed=2)
    assert len(chosen) == len(set(chosen)) == 50 and list(chosen) == sorted(chosen)
    assert np.bincount(labels[chosen]).tolist() == [30, 15, 5]  # the shares of the whole split
    assert (chosen == stratified_sample(labels, 50, seed=2)).all()
    assert not (chosen == stratified_sample(labels, 50, seed=3)).all()
    assert chosen.tolist() != list(range(50))
    # shares that are not whole numbers of examples: the largest remainders get the extra ones
    assert np.bincount(labels[stratified_sample(labels, 7, seed=0)]).tolist() == [4, 2, 1]
    assert stratified_sample(labels, 5000, seed=0).tolist() == list(range(1000))


def test_classification_eval_uses_the_stratified_sample(sim_config, tmp_path):
    from fedlora.simulator import Simulator

    sim = Simulator(sim_config(eval={"max_examples": 10}), tmp_path, progress=False)
    labels = np.array(sim.task.data.eval.labels)
    chosen = sim.task.eval_indices(10)
    assert len(chosen) == 10 and chosen.tolist() != list(range(10))
    expected = np.bincount(labels, minlength=2) * 10 / len(labels)
    assert np.abs(np.bincount(labels[chosen], minlength=2) - expected).max() < 1
    evaluated = sum(batch["labels"].shape[0] for batch in sim.task._eval_set(4, 10))
    assert evaluated == 10


def test_label_map_is_described_with_counts(tmp_path):
    from fedlora.data.sources import describe_labels

    train = write(tmp_path / "train.csv", "text,label\na,4\nb,1\nc,4\n")
    data = read_classification_files(train, train, ["text"], "label")
    assert describe_labels(data) == f"2 classes in {train} (label -> id (training rows)): '1' -> 0 (1), '4' -> 1 (2)"


def test_relabel_maps_other_data_onto_a_models_classes():
    from fedlora.data.presets import relabel

    split = ClassificationSplit(["a", "b", "c"], None, [0, 1, 0], "public.tsv")
    assert relabel(split, ["neg", "pos"], ["other", "pos", "neg"]).labels == [2, 1, 2]
    with pytest.raises(DataError, match=r"^public.tsv: label 'neg' is not one of the model's classes \(pos\)"):
        relabel(split, ["neg", "pos"], ["pos"])
