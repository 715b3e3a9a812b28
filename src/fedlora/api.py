"""The Python API: run a federation from code, with data and a model held in memory, and read finished runs.

    import fedlora
    result = fedlora.run({"method": {"name": "ffa"}, "federation": {"rounds": 3}}, out="runs/api",
                         train_data=[{"text": "great film", "label": "pos"}, ...], eval_data=[...])
    result.final_eval, result.rounds, result.adapter_path
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import config as config_module
from .config import Config, _shorten, apply_overrides, build_config
from .errors import ConfigError, DataError
from .run_folder import ROUNDS_LOG, read_log, read_summary

ConfigLike = Config | Mapping[str, Any] | str | Path | None


@dataclass
class Run:
    """A finished run folder, read back (`load_run`; `inference.load_trained` adds its model)."""
    out: Path
    config: Config
    rounds: list[dict]  # rounds.jsonl, one record per round (round 0: the set-up)
    summary: dict  # summary.json

    @property
    def final_eval(self) -> dict:
        return self.summary["final_eval"]

    @property
    def adapter_path(self) -> Path | None:
        """The exported PEFT adapter (or, for full fine-tuning, the model folder)."""
        for name in ("adapter", "model"):
            if (self.out / name).is_dir():
                return self.out / name
        return None


def make_config(config: ConfigLike = None, overrides: list[str] | str | None = None) -> Config:
    """A validated Config from a Config, a nested dict of sections, a TOML file's path, or None (defaults);
    `overrides` are `section.key=value` strings as `fedlora run --set` takes them (one string is one
    override). The method checks it too (`methods.check_method`)."""
    from .methods import check_method

    overrides = override_list(overrides)

    if isinstance(config, (str, Path)) or config is None:
        cfg = config_module.load_config(config, overrides)
    else:
        if isinstance(config, Config):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise ConfigError(f"config: expected a Config, a dict of sections or a TOML file's path, "
                              f"got {type(config).__name__}")
        cfg = build_config(apply_overrides(json.loads(json.dumps(dict(config))), overrides))
    check_method(cfg)
    return cfg


def override_list(overrides) -> list[str]:
    """`overrides` as a list of `section.key=value` strings: a single string is one override."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, (list, tuple)) and all(isinstance(item, str) for item in overrides):
        return list(overrides)
    raise ConfigError(f"overrides: expected a list of 'section.key=value' strings, got {_shorten(repr(overrides))}")


def load_config(path: str | Path | None, overrides: list[str] | str | None = None) -> Config:
    """A validated Config from a TOML file (None: the defaults) and `section.key=value` overrides."""
    return make_config(path, overrides)


def run(config: ConfigLike = None, *, out: str | Path, train_data=None, eval_data=None, model=None,
        tokenizer=None, overrides: list[str] | str | None = None, resume: bool = False, progress: bool = True) -> Run:
    """Run a federation in-process and return the finished run.

    `train_data` / `eval_data`: classification examples in memory (a `datasets.Dataset`, a pandas DataFrame or
    a list of dicts) with the columns `data.text_columns` and `data.label_column` (default: "text", or
    "sentence1" and "sentence2", and "label"); they replace the config's data files, and are partitioned
    among the clients as files are. Without `eval_data`, `data.holdout_fraction` must say what to hold out.
    `model`: a Hugging Face model object (with `tokenizer`) or a hub id / local folder; default: the config's.
    """
    from .simulator import Simulator

    cfg = make_config(config, overrides)
    if isinstance(model, (str, Path)):
        key = "path" if Path(model).is_dir() else "name"
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={key: str(model)})})
        model = None
    if model is not None and tokenizer is None:
        raise ConfigError("run(model=...): a model object needs its tokenizer (tokenizer=...)")
    data = None
    if train_data is not None:
        train_data = _records(train_data, "train_data")
        data = classification_data(train_data, eval_data, cfg)
        text_columns, label = _columns(train_data, cfg)
        # the run's record says its data came from memory, not from the default preset, and in which columns
        # (a file evaluated on later is read with them)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
            "name": None, "path": None, "text_columns": text_columns, "label_column": label})})
    elif eval_data is not None:
        raise ConfigError("run(eval_data=...) needs train_data as well")
    Simulator(cfg, out, progress=progress, data=data, model=model, tokenizer=tokenizer).run(resume=resume)
    return load_run(out)


def load_run(out: str | Path) -> Run:
    """Read a run folder written by `fedlora run` or `run()`."""
    out = Path(out)
    summary = read_summary(out)
    return Run(out=out, config=make_config(summary["config"]), rounds=read_log(out / ROUNDS_LOG), summary=summary)


# -- data held in memory --------------------------------------------------------------------------
def _records(data, what: str) -> list[Mapping[str, Any]]:
    """A list of row dicts from a datasets.Dataset, a pandas DataFrame or any iterable of dicts."""
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas
        data = data.to_dict("records")
    elif hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        data = data.to_list()
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, Mapping)):
        raise DataError(f"{what}: expected a list of dicts, a datasets.Dataset or a pandas DataFrame, "
                        f"got {type(data).__name__}")
    rows = list(data)
    if not rows:
        raise DataError(f"{what}: no examples")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{what} row {i}: expected a dict of columns, got {type(row).__name__}")
    return rows


def _columns(rows: list[Mapping[str, Any]], cfg: Config) -> tuple[list[str], str]:
    text_columns = cfg.data.text_columns
    if text_columns is None:
        keys = rows[0].keys()
        text_columns = next((c for c in (["text"], ["sentence"], ["sentence1", "sentence2"])
                             if all(k in keys for k in c)), None)
        if text_columns is None:
            raise ConfigError(f"data.text_columns: give the text column(s) of train_data (its columns: "
                              f"{', '.join(map(str, keys))})")
    label = cfg.data.label_column if cfg.data.label_column is not None else "label"
    return [str(c) for c in text_columns], str(label)


def _table(rows: list[Mapping[str, Any]], text_columns: list[str], label: str, what: str):
    from .data.sources import _Table, _validate

    for i, row in enumerate(rows):
        missing = [c for c in (*text_columns, label) if c not in row]
        if missing:
            raise DataError(f"{what} row {i}: no column {', '.join(map(repr, missing))} "
                            f"(its columns: {', '.join(map(str, row.keys()))})")
    table = _Table(text_a=[row[text_columns[0]] for row in rows],
                   text_b=[row[text_columns[1]] for row in rows] if len(text_columns) > 1 else None,
                   labels=[row[label] for row in rows], source=what, where=lambda i: f"row {i}")
    _validate(table)
    return table


def classification_data(train_data, eval_data, cfg: Config):
    """ClassificationData from examples in memory, labels mapped to ids as files' are."""
    from .data.presets import resize_training
    from .data.sources import build_data

    if cfg.data.kind == "instructions":
        raise ConfigError("run(train_data=...) takes classification examples; instruction data comes from "
                          "files (data.path)")
    train_rows = _records(train_data, "train_data")
    text_columns, label = _columns(train_rows, cfg)
    train = _table(train_rows, text_columns, label, "train_data")
    if eval_data is None:
        if cfg.data.holdout_fraction is None:
            raise ConfigError("run(): give eval_data, or data.holdout_fraction to evaluate on held-out "
                              "training examples")
        evaluation = train
    else:
        evaluation = _table(_records(eval_data, "eval_data"), text_columns, label, "eval_data")
    return resize_training(build_data(train, evaluation), cfg.data)
