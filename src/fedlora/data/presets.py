"""Named data sets (sst2, rte, imdb) and `load_classification`, which picks local files or the hub."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError, FedloraError
from .sources import (ClassificationData, ClassificationSplit, _load_hub_table, _read_file, _Table, build_data,
                      empty_split, encode_split)

DATA_DIR_ENV = "FEDLORA_DATA_DIR"


@dataclass(frozen=True)
class Preset:
    name: str
    folder: str                     # folder under the data root
    files: dict[str, str]           # split -> file name in the folder
    text_columns: list[str]
    label_column: str
    eval_split: str                 # default evaluation split
    hub_id: str
    hub_subset: str | None
    hub_splits: dict[str, str]      # split -> hub split name (only labelled splits)
    label_names: list[str]


PRESETS: dict[str, Preset] = {
    "sst2": Preset(
        name="sst2", folder="sst2",
        files={"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
        text_columns=["sentence"], label_column="label", eval_split="dev",
        hub_id="nyu-mll/glue", hub_subset="sst2",
        hub_splits={"train": "train", "dev": "validation"},  # the hub's GLUE test split has no labels
        label_names=["negative", "positive"],
    ),
    "rte": Preset(
        name="rte", folder="rte",
        files={"train": "train.tsv", "dev": "dev.tsv"},
        text_columns=["sentence1", "sentence2"], label_column="label", eval_split="dev",
        hub_id="nyu-mll/glue", hub_subset="rte",
        hub_splits={"train": "train", "dev": "validation"},
        label_names=["entailment", "not_entailment"],
    ),
    "imdb": Preset(
        name="imdb", folder="imdb",
        files={"train": "train.jsonl", "test": "test.jsonl"},
        text_columns=["text"], label_column="label", eval_split="test",
        hub_id="stanfordnlp/imdb", hub_subset=None,
        hub_splits={"train": "train", "test": "test"},
        label_names=["negative", "positive"],
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise DataError(f"config key 'data.name': unknown data set preset '{name}' "
                        f"(presets: {', '.join(PRESETS)}; or set data.name = \"none\" and give data.path)")
    return PRESETS[name]


def data_root(cfg: DataConfig) -> Path | None:
    """`data.root`, else $FEDLORA_DATA_DIR, else None."""
    root = cfg.root or os.environ.get(DATA_DIR_ENV) or None
    return Path(root).expanduser() if root else None


def local_folder(cfg: DataConfig, name: str, error: type[FedloraError] = DataError) -> Path | None:
    """The preset's local folder when the data comes from local files (data.source), else None (the hub);
    `error` when local files are asked for but no data root is set."""
    root = data_root(cfg)
    folder = root / name if root is not None else None
    if cfg.source == "local" or (cfg.source == "auto" and folder is not None and folder.is_dir()):
        if folder is None:
            raise error(f"config key 'data.source' is 'local' but no data root is set: set data.root or "
                        f"{DATA_DIR_ENV} to the folder that holds '{name}/'")
        return folder
    return None


def load_classification(cfg: DataConfig) -> ClassificationData:
    """Load the training and evaluation splits described by `cfg`.

    Source order: `data.path` (plain files); else a preset from local files under the data root
    (`data.source` "local", or "auto" when root/<folder>/ exists); else the Hugging Face hub.
    """
    preset = get_preset(cfg.name) if cfg.name else None
    if cfg.client_paths:
        return _load_client_files(cfg, preset)
    if cfg.path:
        data = _load_from_paths(cfg, preset)
    elif preset is not None:
        data = _load_preset(cfg, preset)
    elif cfg.hub_id:
        text_columns, label_column = _columns(cfg, None)
        eval_split = cfg.eval_split or "validation"
        train = _load_hub_table(cfg.hub_id, None, "train", text_columns, label_column)
        data = build_data(train, train if cfg.holdout_fraction is not None
                          else _load_hub_table(cfg.hub_id, None, eval_split, text_columns, label_column))
    else:
        raise DataError("no data given: set data.name to a preset "
                        f"({', '.join(PRESETS)}), or data.path to a training file, or data.hub_id")
    return resize_training(data, cfg)


def load_evaluation(cfg: DataConfig, label_names: list[str]) -> ClassificationSplit:
    """The evaluation split `cfg` describes, its labels as ids of a trained classifier's classes
    `label_names`: data.eval_path read alone, else the evaluation split of load_classification."""
    if cfg.eval_path:
        return read_split(cfg, cfg.eval_path, "data.eval_path", label_names)
    data = load_classification(cfg)
    return relabel(data.eval, data.label_names, label_names)


def _read_table(cfg: DataConfig, path: str | Path, key: str) -> tuple[_Table, Preset | None]:
    """One file in the data's format (its columns and header, its preset's where it names one); `key` names
    where the path was given (a config key, a node's setting)."""
    preset = get_preset(cfg.name) if cfg.name else None
    text_columns, label_column = _columns(cfg, preset)
    return _read_file(_existing_file(path, key), text_columns, label_column, cfg.header), preset


def read_split(cfg: DataConfig, path: str, key: str, label_names: list[str]) -> ClassificationSplit:
    """One file in the data's format, its labels as ids of the classes `label_names`."""
    table, preset = _read_table(cfg, path, key)
    integer_ids = preset is not None and list(preset.label_names) == list(label_names)
    ids = encode_split(table, label_names, integer_ids, "of the trained model")
    return ClassificationSplit(table.text_a, table.text_b, ids, table.source)


def load_own_training_file(cfg: DataConfig, path: str, key: str) -> ClassificationData:
    """A party's own training file, all of it, validated as a run's files are; its classes as the data's
    format gives them (a preset's names, else the file's labels in sorted order). No evaluation rows: a
    party's evaluation file is read apart (read_split), so that a bad one leaves its training alone."""
    table, preset = _read_table(cfg, path, key)
    data = build_data(table, table, preset.label_names if preset else None)
    return replace(data, eval=empty_split(table))


def _load_client_files(cfg: DataConfig, preset: Preset | None) -> ClassificationData:
    """data.client_paths: every client's file, read into one training split (client i's rows the i-th run of
    it: plan.client_shards) whose classes are those of all the files; data.eval_path, when given, for the
    server's evaluation; data.client_eval_paths, each client's evaluation file. Every path is checked
    before any file is read."""
    text_columns, label_column = _columns(cfg, preset)
    train_paths = [_existing_file(p, f"data.client_paths[{i}]") for i, p in enumerate(cfg.client_paths)]
    eval_paths = [_existing_file(p, f"data.client_eval_paths[{i}]") if p else None
                  for i, p in enumerate(cfg.client_eval_paths or [])]
    server_eval = _existing_file(cfg.eval_path, "data.eval_path") if cfg.eval_path else None
    tables = [_read_file(p, text_columns, label_column, cfg.header) for p in train_paths]
    starts = np.cumsum([0] + [len(t.labels) for t in tables])

    def where(i: int) -> str:  # row i of the joined files: its own file and line
        k = int(np.searchsorted(starts, i, side="right")) - 1
        return f"({tables[k].source}) {tables[k].where(i - starts[k])}"

    if len({t.text_b is None for t in tables}) > 1:
        raise DataError("data.client_paths: some files have two text columns and some one")
    joined = _Table([x for t in tables for x in t.text_a],
                    None if tables[0].text_b is None else [x for t in tables for x in t.text_b],
                    [x for t in tables for x in t.labels], "data.client_paths", where)
    evaluation = _read_file(server_eval, text_columns, label_column, cfg.header) if server_eval else None
    data = build_data(joined, evaluation or joined, preset.label_names if preset else None)
    client_eval = [read_split(cfg, str(p), f"data.client_eval_paths[{i}]", data.label_names) if p else None
                   for i, p in enumerate(eval_paths)] if cfg.client_eval_paths else None
    return replace(data, eval=data.eval if evaluation else empty_split(joined),
                   train=replace(data.train, source=", ".join(t.source for t in tables)),
                   client_rows=[len(t.labels) for t in tables], client_eval=client_eval)


def relabel(split: ClassificationSplit, names: list[str], new_names: list[str]) -> ClassificationSplit:
    """`split` (ids into `names`) with ids into `new_names`; a class missing there is refused."""
    index = {name: k for k, name in enumerate(new_names)}
    missing = sorted({names[label] for label in split.labels} - set(index))
    if missing:
        raise DataError(f"{split.source}: label {missing[0]!r} is not one of the model's classes "
                        f"({', '.join(new_names)})")
    return replace(split, labels=[index[names[label]] for label in split.labels])


def resize_training(data, cfg: DataConfig):
    """Apply data.holdout_fraction, then data.max_train_examples, to classification or instruction data.

    Both draws are fixed (numpy default_rng(1) and (0)), whatever the experiment seed, so every run and
    method sees the same examples; subsets keep file order. A random subset rather than the first rows
    keeps the class balance representative (files such as GLUE's can be ordered by label).
    """
    if cfg.holdout_fraction is not None:
        # the held-out part becomes the evaluation split: hyperparameters chosen without the real one
        order = np.random.default_rng(1).permutation(len(data.train))
        held = max(1, round(cfg.holdout_fraction * len(order)))
        if held >= len(order):
            raise DataError(f"config key 'data.holdout_fraction': {len(order)} training examples are too few "
                            f"to hold out {cfg.holdout_fraction}")
        data = replace(data, train=data.train.select(np.sort(order[held:])),
                       eval=data.train.select(np.sort(order[:held])))
    if cfg.max_train_examples is not None and len(data.train) > cfg.max_train_examples:
        chosen = np.random.default_rng(0).permutation(len(data.train))[:cfg.max_train_examples]
        data = replace(data, train=data.train.select(np.sort(chosen)))
    return data


def _columns(cfg: DataConfig, preset: Preset | None) -> tuple[list[str | int], str | int]:
    text_columns = cfg.text_columns or (preset.text_columns if preset else None)
    label_column = cfg.label_column if cfg.label_column is not None else (preset.label_column if preset else None)
    if text_columns is None:
        raise DataError("config key 'data.text_columns' is required when data.name is not a preset "
                        "(e.g. text_columns = [\"sentence\"])")
    if label_column is None:
        raise DataError("config key 'data.label_column' is required when data.name is not a preset "
                        "(e.g. label_column = \"label\")")
    return list(text_columns), label_column


def _check_split(preset: Preset, split: str, available: dict[str, str], where: str) -> None:
    if split not in available:
        raise DataError(f"config key 'data.eval_split': preset '{preset.name}' has no split '{split}' "
                        f"{where} (available: {', '.join(available)})")


def _existing_file(path: str, key: str) -> Path:
    """`path` if it is a file; `key` says where it was given (a config key "data.x", or a node's setting)."""
    path, where = Path(path), f"config key '{key}'" if key.startswith(("data.", "fedsb.")) else key
    if path.is_dir():
        raise DataError(f"{where}: {path} is a folder, not a file")
    if not path.is_file():
        raise DataError(f"{where}: file not found: {path}")
    return path


def _load_from_paths(cfg: DataConfig, preset: Preset | None) -> ClassificationData:
    text_columns, label_column = _columns(cfg, preset)
    train_path = _existing_file(cfg.path, "data.path")
    if cfg.holdout_fraction is not None:
        eval_path = None  # resize_training holds out part of the training file; the evaluation file stays unread
    elif cfg.eval_path:
        eval_path = _existing_file(cfg.eval_path, "data.eval_path")
    elif preset is not None:
        # a copy of the preset's folder: the evaluation file sits next to the training file
        split = cfg.eval_split or preset.eval_split
        _check_split(preset, split, preset.files, "in local files")
        eval_path = train_path.parent / preset.files[split]
        if not eval_path.is_file():
            raise DataError(f"config key 'data.eval_path' is not set and the '{split}' file of preset "
                            f"'{preset.name}' is not next to data.path: {eval_path} not found")
    else:
        raise DataError("config key 'data.eval_path' is required with data.path when data.name is not a preset "
                        "(or set data.holdout_fraction to evaluate on held-out training rows)")
    train = _read_file(train_path, text_columns, label_column, cfg.header)
    evaluation = train if eval_path is None else _read_file(eval_path, text_columns, label_column, cfg.header)
    return build_data(train, evaluation, preset.label_names if preset else None)


def _load_preset(cfg: DataConfig, preset: Preset) -> ClassificationData:
    text_columns, label_column = _columns(cfg, preset)
    eval_split = cfg.eval_split or preset.eval_split
    # held-out training rows replace the evaluation split (resize_training), which is then never read
    splits = ["train"] if cfg.holdout_fraction is not None else ["train", eval_split]
    folder = local_folder(cfg, preset.folder)
    if folder is not None:
        _check_split(preset, eval_split, preset.files, "in local files")
        paths = [folder / preset.files[split] for split in splits]
        for path in paths:
            if not path.is_file():
                raise DataError(f"{path} not found: set data.root or {DATA_DIR_ENV} to the folder that holds "
                                f"'{preset.folder}/{path.name}'")
        tables = [_read_file(path, text_columns, label_column, cfg.header) for path in paths]
    else:
        _check_split(preset, eval_split, preset.hub_splits, "on the hub")
        hub_id = cfg.hub_id or preset.hub_id
        tables = [_load_hub_table(hub_id, preset.hub_subset, preset.hub_splits[split], text_columns, label_column)
                  for split in splits]
    return build_data(tables[0], tables[-1], label_names=preset.label_names)
