"""A finished run's model written to its folder: a PEFT adapter (beside it, for a method that changes W0, the
base model it applies to), or for full fine-tuning the whole model, with the tokenizer and the class names; and
model.json, the record that `fedlora eval`, `predict` and `export` rebuild the model from without reading the
training data, its paths relative to the run folder so that the folder can be moved."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .adapters import AdaptedModel, label_config, write_labels
from .config import Config
from .data.presets import data_root
from .methods import Method
from .models import base_model_reference
from .run_folder import CHECKPOINT, MODEL_RECORD
from .tasks import ClassificationTask, Task

RECORD_FORMAT = "fedlora-model/1"


def export_model(out: Path, cfg: Config, task: Task, adapted: AdaptedModel, method: Method, model_source: str,
                 label_names: list[str] | None) -> None:
    state = method.eval_state()
    adapted.load_state(state)
    model, tokenizer = adapted.model, task.tokenizer
    if label_names is not None:
        write_labels(out, label_names)
        model.config.update(label_config(label_names))  # a saved model folder carries the class names
    files = {"checkpoint": CHECKPOINT}
    if adapted.parameterisation == "full":
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        files["model"] = "model"
    else:
        base = base_model_reference(cfg.model.name, cfg.model.path, model_source)
        if method.changes_base:  # W0 itself was trained: ship it beside the adapter, named relative to the run folder
            model.save_pretrained(out / "base_model", state_dict=adapted.base_model_state_dict())
            tokenizer.save_pretrained(out / "base_model")
            base = files["base_model"] = "base_model"
        adapted.export_peft(out / "adapter", state, base_model=base, task_type=task.task_type,
                            label_names=label_names)
        files["adapter"] = "adapter"
    write_record(out, cfg, task, method, model_source, label_names, files)


def write_record(out: Path, cfg: Config, task: Task, method: Method, model_source: str,
                 label_names: list[str] | None, files: dict[str, str]) -> None:
    """model.json: what rebuilding the run's model needs beside its files (named relative to the run folder)."""
    classifier = isinstance(task, ClassificationTask)
    kind = type(method)
    record = {
        "format": RECORD_FORMAT,
        "kind": "classification" if classifier else "instructions",
        "labels": label_names,
        "pair": classifier and task.data.train.text_b is not None,
        "tokenizer": {"max_length": task.max_length, "truncation_side": task.tokenizer.truncation_side},
        "method": {"name": cfg.method.name, "class": f"{kind.__module__}:{kind.__qualname__}"},
        "model_source": absolute(model_source) if Path(model_source).is_dir() else model_source,
        "files": files,
        "config": resolved_config(cfg),
    }
    (out / MODEL_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False))


def absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def resolved_config(cfg: Config) -> dict:
    """The config with the paths it read from made absolute, so that they hold wherever the run is used from;
    a preset's data root (from $FEDLORA_DATA_DIR) is written down."""
    raw = cfg.to_dict()
    if raw["model"]["path"]:
        raw["model"]["path"] = absolute(raw["model"]["path"])
    data = raw["data"]
    for key in ("path", "eval_path"):
        if data[key]:
            data[key] = absolute(data[key])
    root = data_root(cfg.data)
    if root is not None and data["name"] is not None and not data["path"]:
        data["root"] = absolute(str(root))
    return raw
