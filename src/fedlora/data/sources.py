"""Classification data from local files (TSV, CSV, JSONL, JSON) or the Hugging Face hub.

Every problem with the data raises DataError naming the file and line (or hub row) at fault.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError

SUPPORTED_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
# More classes than this means a mis-chosen label column (ids, free text), not a classifier to build.
MAX_LABELS = 100_000


@dataclass
class ClassificationSplit:
    text_a: list[str]
    text_b: list[str] | None
    labels: list[int]
    source: str  # file path or hub id, for messages

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices) -> ClassificationSplit:
        indices = [int(i) for i in indices]
        return ClassificationSplit(
            text_a=[self.text_a[i] for i in indices],
            text_b=None if self.text_b is None else [self.text_b[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            source=self.source,
        )


@dataclass
class ClassificationData:
    train: ClassificationSplit
    eval: ClassificationSplit  # the server's evaluation data (no rows: the server evaluates nothing)
    num_labels: int
    label_names: list[str]
    client_rows: list[int] | None = None  # data.client_paths: the training rows of each client's file, in order
    client_eval: list[ClassificationSplit | None] | None = None  # data.client_eval_paths: each client's own


def empty_split(like: ClassificationSplit | _Table, source: str = "no evaluation file") -> ClassificationSplit:
    return ClassificationSplit([], None if like.text_b is None else [], [], source)


@dataclass
class _Table:
    """Rows as read, before validation; `where(i)` names row i for messages ("line 57")."""
    text_a: list[Any]
    text_b: list[Any] | None
    labels: list[Any]
    source: str
    where: Callable[[int], str]

    def error(self, i: int, message: str) -> DataError:
        return DataError(f"{self.source} {self.where(i)}: {message}")


# ---------------------------------------------------------------- local files

Column = str | int  # a name, or a 0-based position in a CSV/TSV file without a header row


def read_table(path: str | Path, text_columns: list[Column], label_column: Column, header: bool = True
               ) -> tuple[list[str], list[str] | None, list[int | str]]:
    """Read one file into (text_a, text_b or None, raw labels).

    Raw labels are ints or stripped strings; `encode_labels` turns them into ids.
    """
    table = _read_file(Path(path), text_columns, label_column, header)
    return table.text_a, table.text_b, table.labels


def _read_file(path: Path, text_columns: list[Column], label_column: Column, header: bool = True) -> _Table:
    if not 1 <= len(text_columns) <= 2:
        raise DataError(f"{path}: expected 1 or 2 text columns, got {len(text_columns)}")
    if label_column in text_columns:
        raise DataError(f"{path}: column {label_column!r} cannot be both a text column and the label column")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}' (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = _decode_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    columns = [*text_columns, label_column]
    if suffix in (".tsv", ".csv"):
        rows, where = _read_delimited(path, text, columns, delimiter="\t" if suffix == ".tsv" else ",",
                                      header=header)
    elif not header or any(isinstance(c, int) for c in columns):
        raise DataError(f"{path}: data.header = false and column numbers are for CSV/TSV files; "
                        f"name the JSON keys in data.text_columns / data.label_column")
    elif suffix == ".jsonl":
        rows, where = _read_jsonl(path, text, columns)
    else:
        rows, where = _read_json(path, text, columns)
    if not rows:
        raise DataError(f"{path}: no data rows")
    table = _Table(
        text_a=[r[0] for r in rows],
        text_b=[r[1] for r in rows] if len(text_columns) == 2 else None,
        labels=[r[-1] for r in rows],
        source=str(path),
        where=where,
    )
    _validate(table)
    return table


def _decode_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: file is UTF-16; save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _missing_columns_error(path: Path, where: str, missing: list[str], available: list[str]) -> DataError:
    return DataError(
        f"{path}{where}: no column {', '.join(repr(c) for c in missing)} "
        f"(available: {', '.join(available) or 'none'}); set data.text_columns / data.label_column")


def _read_delimited(path: Path, text: str, columns: list[Column], delimiter: str, header: bool = True):
    # Long documents are one field; the csv module refuses fields over its (process-wide) limit.
    if csv.field_size_limit() < len(text):
        csv.field_size_limit(len(text))
    # GLUE TSV files contain unbalanced quotes inside sentences, so TSV is read without quoting.
    # CSV is read strictly: a stray quote is an error, not text silently merged into the next field.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting,
                        strict=delimiter != "\t")
    previous_end = 0  # last line of the previous record: an error lies in the record after it
    try:
        if header:
            names = [h.strip() for h in next(reader)]
            missing = [c for c in columns if c not in names]
            if missing:
                raise _missing_columns_error(path, " line 1", missing, names)
            repeated = [c for c in columns if names.count(c) > 1]
            if repeated:
                raise DataError(f"{path} line 1: column {repeated[0]!r} appears {names.count(repeated[0])} times")
            positions, width = [names.index(c) for c in columns], len(names)
        else:
            positions, width = columns, None  # the first row's width is every row's
        rows, lines = [], []
        previous_end = reader.line_num
        for fields in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if not fields:  # blank line
                continue
            if width is None:
                width = len(fields)
                beyond = [c for c in columns if c >= width]
                if beyond:
                    raise DataError(f"{path} line {start}: no column {beyond[0]} (a row has {width} fields: "
                                    f"columns 0..{width - 1}); set data.text_columns / data.label_column")
            if len(fields) != width:
                sep = "tab-separated" if delimiter == "\t" else "comma-separated"
                raise DataError(f"{path} line {start}: expected {width} {sep} fields, got {len(fields)}")
            rows.append([fields[p] for p in positions])
            lines.append(start)
    except csv.Error as err:
        raise DataError(f"{path} line {previous_end + 1}: {err}") from None
    return rows, lambda i: f"line {lines[i]}"


def _row_from_object(path: Path, where: str, obj: Any, columns: list[str]) -> list[Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{path} {where}: expected a JSON object, got {type(obj).__name__}")
    missing = [c for c in columns if c not in obj]
    if missing:
        raise _missing_columns_error(path, f" {where}", missing, list(obj))
    return [obj[c] for c in columns]


def _read_jsonl(path: Path, text: str, columns: list[str]):
    rows, lines = [], []
    # split on "\n" only: str.splitlines() also breaks at U+2028 and other characters inside strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = _parse_json(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: invalid JSON: {err.msg} (column {err.colno})") from None
        except ValueError as err:
            raise DataError(f"{path} line {number}: invalid JSON: {err}") from None
        rows.append(_row_from_object(path, f"line {number}", obj, columns))
        lines.append(number)
    return rows, lambda i: f"line {lines[i]}"


def _read_json(path: Path, text: str, columns: list[str]):
    try:
        items = _parse_json(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    except ValueError as err:
        raise DataError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(items).__name__}")
    rows = [_row_from_object(path, f"item {i + 1}", obj, columns) for i, obj in enumerate(items)]
    return rows, lambda i: f"item {i + 1}"


def _parse_json(text: str) -> Any:
    """json.loads; its failures without a position (deep nesting, huge numbers) become plain ValueError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise ValueError("arrays or objects nested too deeply") from None
    except ValueError:  # int() refuses numbers of thousands of digits
        raise ValueError("a number has too many digits") from None


# ---------------------------------------------------------------- validation and labels

_INTEGER = re.compile(r"[+-]?[0-9]+")
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON escapes can produce them; tokenizers cannot encode them


def _shorten(text: str, limit: int = 80) -> str:
    """`text` cut to about `limit` characters, for messages that must stay on one line."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _validate(table: _Table) -> None:
    """Check texts are non-empty strings and labels present; normalise labels to int or stripped str."""
    for texts in (table.text_a, table.text_b):
        for i, value in enumerate(texts or []):
            if value is None:
                raise table.error(i, "missing text")
            if not isinstance(value, str):
                raise table.error(i, f"text must be a string, got {type(value).__name__}")
            if not value.strip():
                raise table.error(i, "empty text")
            if _SURROGATE.search(value):
                raise table.error(i, "text contains an unpaired surrogate (an invalid \\ud800-\\udfff escape)")
    for i, value in enumerate(table.labels):
        if isinstance(value, str):
            value = value.strip()
            if not value:
                raise table.error(i, "missing label")
            if _SURROGATE.search(value):
                raise table.error(i, "label contains an unpaired surrogate (an invalid \\ud800-\\udfff escape)")
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        elif value is None:
            raise table.error(i, "missing label")
        elif isinstance(value, bool) or not isinstance(value, int):
            raise table.error(i, f"label must be an integer or a string, got {_shorten(repr(value))}")
        table.labels[i] = value


def _as_int(value: int | str) -> int | None:
    if isinstance(value, int):
        return value
    if not _INTEGER.fullmatch(value):
        return None
    # int() refuses thousands of digits; a number this long is out of every label range anyway
    if len(value.lstrip("+-").lstrip("0")) > 20:
        return -(10 ** 20) if value.startswith("-") else 10 ** 20
    return int(value)


def label_vocabulary(train: _Table, preset_names: list[str] | None = None) -> tuple[list[str], bool]:
    """The class names of a training split, id -> name, and whether its integer labels are the ids.

    Without a preset the names are the sorted distinct training labels (integers in numeric order), so
    labels 1..4 or "neg"/"pos" become ids 0..k-1. A preset's integer labels are ids into its names.
    Integer and non-integer labels mixed in one file are refused: one kind is a typo.
    """
    integers = [_as_int(v) for v in train.labels]
    odd = [i for i, n in enumerate(integers) if n is None]
    if odd and len(odd) < len(integers):
        if len(odd) <= len(integers) - len(odd):
            i = odd[0]
            raise train.error(i, f"label {_shorten(repr(train.labels[i]))} is not an integer, but "
                                 f"{len(integers) - len(odd)} of the {len(integers)} training labels are")
        i = next(i for i, n in enumerate(integers) if n is not None)
        raise train.error(i, f"label {_shorten(str(train.labels[i]))} is an integer, but {len(odd)} of the "
                             f"{len(integers)} training labels are names")
    if not odd:
        for i, n in enumerate(integers):
            if n < 0:
                raise train.error(i, f"label {_shorten(str(n))} is negative (unlabelled rows cannot be used)")
            if n >= 10 ** 20:
                raise train.error(i, f"label {_shorten(str(train.labels[i]))} has over 20 digits: not a class; "
                                     f"is data.label_column the right column?")
    if preset_names and (not odd or all(str(v) in preset_names for v in train.labels)):
        return list(preset_names), not odd
    names = [str(n) for n in sorted(set(integers))] if not odd else sorted({str(v) for v in train.labels})
    if len(names) > MAX_LABELS:
        raise DataError(f"{train.source}: {len(names)} different labels, more than {MAX_LABELS}; "
                        f"is data.label_column the right column?")
    return names, False


def encode_split(table: _Table, names: list[str], integer_ids: bool, train_source: str) -> list[int]:
    """The ids of a split's labels under a training split's names (see `label_vocabulary`); `train_source`
    completes "the training data ...": a file's path, or "of the trained model"."""
    index = {name: k for k, name in enumerate(names)}
    ids = []
    for i, value in enumerate(table.labels):
        number = _as_int(value)
        if number is not None and number < 0:
            raise table.error(i, f"label {_shorten(str(value))} is negative (unlabelled rows cannot be used)")
        if integer_ids and number is not None:
            if number >= len(names):
                named = ", ".join(f"{k} {name}" for k, name in enumerate(names))
                raise table.error(i, f"label {_shorten(str(value))} is out of range: this data set has "
                                     f"{len(names)} labels ({named})")
            ids.append(number)
            continue
        key = str(number) if number is not None else str(value)
        if key not in index:
            shown = str(value) if number is not None else repr(key)
            raise table.error(i, f"label {_shorten(shown)} does not occur in the training data {train_source} "
                                 f"(labels: {_shorten(', '.join(names), 200)})")
        ids.append(index[key])
    return ids


def describe_labels(data: ClassificationData) -> str:
    """One line that shows how the training labels became class ids, with their counts."""
    counts = [0] * data.num_labels
    for label in data.train.labels:
        counts[label] += 1
    pairs = ", ".join(f"{name!r} -> {k} ({n})" for k, (name, n) in enumerate(zip(data.label_names, counts)))
    return f"{data.num_labels} classes in {data.train.source} (label -> id (training rows)): {_shorten(pairs, 400)}"


def check_classes(data: ClassificationData) -> None:
    """Refuse training data of fewer than two classes: a classifier learns nothing from it, and its accuracy
    (against a chance level of 1) would look perfect."""
    present = sorted(set(data.train.labels))
    if len(present) < 2:
        found = (f"only class {data.label_names[present[0]]!r} ({len(data.train):,} rows)" if present
                 else "no class")
        raise DataError(f"{data.train.source}: the training data has {found}; a classifier needs at least two "
                        "(is data.label_column the right column?)")


def encode_labels(train: _Table, evaluation: _Table,
                  label_names: list[str] | None = None) -> tuple[list[int], list[int], int, list[str]]:
    """Map raw labels to ids: (train ids, eval ids, num_labels, label names); see `label_vocabulary`."""
    names, integer_ids = label_vocabulary(train, label_names)
    return (encode_split(train, names, integer_ids, train.source),
            encode_split(evaluation, names, integer_ids, train.source), len(names), names)


def build_data(train: _Table, evaluation: _Table, label_names: list[str] | None = None) -> ClassificationData:
    train_ids, eval_ids, num_labels, names = encode_labels(train, evaluation, label_names)
    return ClassificationData(
        train=ClassificationSplit(train.text_a, train.text_b, train_ids, train.source),
        eval=ClassificationSplit(evaluation.text_a, evaluation.text_b, eval_ids, evaluation.source),
        num_labels=num_labels,
        label_names=names,
    )


def read_classification_files(train_path: str | Path, eval_path: str | Path, text_columns: list[Column],
                              label_column: Column, label_names: list[str] | None = None,
                              header: bool = True) -> ClassificationData:
    """Read a training and an evaluation file and encode their labels together."""
    return build_data(_read_file(Path(train_path), text_columns, label_column, header),
                      _read_file(Path(eval_path), text_columns, label_column, header), label_names)


# ---------------------------------------------------------------- Hugging Face hub

def load_hub(hub_id: str, subset: str | None, split: str, text_columns: list[str], label_column: str
             ) -> tuple[list[str], list[str] | None, list[int | str]]:
    """Load one split from the hub into (text_a, text_b or None, raw labels)."""
    table = _load_hub_table(hub_id, subset, split, text_columns, label_column)
    return table.text_a, table.text_b, table.labels


def load_hub_dataset(hub_id: str, subset: str | None, split: str):
    """(a `datasets` split, its name for messages) from the Hugging Face hub, with one-line errors."""
    name = f"{hub_id}/{subset}" if subset else hub_id
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading '{name}' from the Hugging Face hub needs the datasets package: "
                        f"pip install 'fedlora[hub]' (or set data.root / FEDLORA_DATA_DIR to a local copy)") from None
    try:
        dataset = datasets.load_dataset(hub_id, subset, split=split)
    except Exception as err:  # network, missing data set or split: many exception types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not load split '{split}' of '{name}' from the Hugging Face hub: {reason} "
                        f"(set data.root or FEDLORA_DATA_DIR to use a local copy)") from None
    return dataset, f"{name}[{split}]"


def _load_hub_table(hub_id: str, subset: str | None, split: str, text_columns: list[str],
                    label_column: str) -> _Table:
    dataset, source = load_hub_dataset(hub_id, subset, split)
    missing = [c for c in [*text_columns, label_column] if c not in dataset.column_names]
    if missing:
        raise DataError(f"{source}: no column {', '.join(repr(c) for c in missing)} "
                        f"(available: {', '.join(dataset.column_names)}); set data.text_columns / data.label_column")
    if len(dataset) == 0:
        raise DataError(f"{source}: no data rows")
    table = _Table(
        text_a=list(dataset[text_columns[0]]),
        text_b=list(dataset[text_columns[1]]) if len(text_columns) == 2 else None,
        labels=list(dataset[label_column]),
        source=source,
        where=lambda i: f"row {i}",
    )
    _validate(table)
    return table
