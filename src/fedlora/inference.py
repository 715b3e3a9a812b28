"""A finished run put to use: its global model rebuilt from the run folder (summary.json's config, the last
checkpoint), evaluated on any data, asked for predictions, and exported as one merged model folder."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from . import checkpoint
from .adapters import AdaptedModel, label_config, write_labels
from .api import Run
from .config import apply_overrides, build_config
from .data import INSTRUCTION_PRESETS, ClassificationData, ClassificationSplit, InstructionSplit
from .data import PRESETS as CLASSIFICATION_PRESETS
from .data.presets import load_evaluation
from .errors import ConfigError, DataError, FedloraError
from .experiment import build_task, task_kind
from .run_folder import CHECKPOINT
from .methods import check_method
from .models import pick_device
from .plan import population_sizes
from .run_folder import ROUNDS_LOG, read_log, read_summary
from .tasks import ClassificationTask, Task

# What may change between training a model and using it: the data it is evaluated on, how, and where.
CHANGEABLE = ("data.", "eval.", "device")


@dataclass
class FinishedRun(Run):
    """A finished run with its global model rebuilt (`load_trained`)."""
    task: Task
    adapted: AdaptedModel
    model_source: str

    @property
    def model(self) -> torch.nn.Module:
        return self.adapted.model

    @property
    def label_names(self) -> list[str] | None:
        return self.task.data.label_names if isinstance(self.task, ClassificationTask) else None

    def evaluate(self) -> dict[str, float]:
        """The run's own evaluation (eval.batch_size, eval.max_examples) with per-class or per-task figures."""
        e = self.config.eval
        if isinstance(self.task, ClassificationTask):
            return self.task.evaluate(self.model, e.batch_size, e.max_examples, per_class=True)
        return self.task.evaluate(self.model, e.batch_size, e.max_examples)


def load_trained(folder: str | Path, overrides: Iterable[str] = (), data: str | None = None,
             progress: bool = False) -> FinishedRun:
    """The global model of a finished run, with the task it was trained for. `data` (a file or a data set
    preset) replaces the evaluation data; `overrides` (KEY=VALUE) may change data.*, eval.* and device.
    Other data keeps the run's class names."""
    folder = Path(folder)
    summary = read_summary(folder)
    overrides = list(overrides)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(CHANGEABLE):
            raise ConfigError(f"--set {key}: only data.*, eval.* and device can change for a trained model")
    raw = json.loads(json.dumps(summary["config"]))
    if data is not None:
        raw["data"] = evaluation_data(raw["data"], data)
    cfg = build_config(apply_overrides(raw, overrides))
    method_class = check_method(cfg)
    source = summary.get("model_source")
    if cfg.model.path and not Path(cfg.model.path).is_dir() and source and Path(source).is_dir():
        cfg.model.path = source  # the run named a folder relative to where it was started
    device = pick_device(cfg.device)
    state = checkpoint.load(folder / CHECKPOINT, device)
    if state.get("round") != summary.get("rounds"):
        raise FedloraError(f"{folder / CHECKPOINT} holds round {state.get('round')}, but the run ended after "
                           f"round {summary.get('rounds')}")
    data = None
    names = summary.get("labels")
    data_changed = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True) != json.dumps(
        summary["config"]["data"], sort_keys=True)
    if task_kind(cfg.data, cfg.model.name) == "classification" and names and data_changed:
        split = load_evaluation(cfg.data, names)
        data = ClassificationData(train=split, eval=split, num_labels=len(names), label_names=list(names))
    torch.manual_seed(cfg.seed)
    task, adapted, source = build_task(cfg, device, progress, data=data)
    if names is not None and isinstance(task, ClassificationTask) and task.data.label_names != names:
        raise DataError(f"the run's classes ({', '.join(names)}) differ from its data's now "
                        f"({', '.join(task.data.label_names)}): was {task.data.train.source} changed?")
    sizes = summary["client_sizes"]
    method = method_class(adapted, cfg, sizes if sizes is not None else population_sizes(cfg))
    method.load_state_dict(state["method"])
    if state.get("base_weights") is not None:
        adapted.load_base_weights(state["base_weights"])
    adapted.load_state(method.eval_state())
    adapted.model.eval()
    return FinishedRun(folder, cfg, read_log(folder / ROUNDS_LOG), summary, task, adapted, source)


def evaluation_data(section: dict, data: str) -> dict:
    """The run's data section evaluating on `data`: a file (read with the run's columns) or a preset."""
    section = dict(section, holdout_fraction=None, max_train_examples=None)
    if Path(data).is_file():
        return section | {"eval_path": data}
    if data in CLASSIFICATION_PRESETS or data in INSTRUCTION_PRESETS:
        return section | {"name": data, "path": None, "eval_path": None, "eval_split": None, "hub_id": None,
                          "text_columns": None, "label_column": None, "header": True}
    raise ConfigError(f"--data {data}: neither a file nor a data set preset "
                      f"({', '.join([*CLASSIFICATION_PRESETS, *INSTRUCTION_PRESETS])})")


# ---------------------------------------------------------------- predictions

def read_inputs(lines: Iterable[str], source: str, keys: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, texts) of every non-blank input line: a JSON object (texts under `keys`, the first
    one required), a JSON string, or plain text (two texts separated by a tab)."""
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = line.split("\t") if len(keys) > 1 else [line]
        if isinstance(value, dict):
            if keys[0] not in value:
                raise DataError(f"{source} line {number}: no key {keys[0]!r} (keys: {', '.join(value) or 'none'})")
            value = [value[k] for k in keys if k in value]
        elif isinstance(value, str):
            value = [value]
        elif not isinstance(value, list):
            value = [line]
        if not all(isinstance(v, str) and v.strip() for v in value) or len(value) > len(keys):
            raise DataError(f"{source} line {number}: expected {' and '.join(keys)} as text")
        yield number, value


def input_keys(run: FinishedRun) -> list[str]:
    """The JSON keys an input's texts go under: the run's text column names (or text, text_pair), or prompt."""
    if not isinstance(run.task, ClassificationTask):
        return ["prompt"]
    columns = run.config.data.text_columns
    pair = run.task.data.train.text_b is not None
    if columns and all(isinstance(c, str) for c in columns):
        return list(columns)
    return ["text", "text_pair"] if pair else ["text"]


def predict(run: FinishedRun, inputs: list[list[str]]) -> list[dict]:
    """One result per input: for a classifier its label, id and probability; for a language model its
    greedy generation."""
    batch_size = run.config.eval.batch_size
    task = run.task
    if isinstance(task, ClassificationTask):
        pair = task.data.train.text_b is not None
        if pair and any(len(texts) != 2 for texts in inputs):
            raise DataError("this model classifies pairs of texts: give both in every input")
        split = ClassificationSplit([t[0] for t in inputs], [t[1] for t in inputs] if pair else None,
                                    [0] * len(inputs), "input")
        out = []
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                batch = task.batch(range(start, min(start + batch_size, len(inputs))), split)
                batch.pop("labels")
                with task.autocast_context():
                    logits = run.model(**batch).logits.float()
                probs = logits.softmax(-1)
                for k, p in zip(logits.argmax(-1).tolist(), probs.tolist()):
                    out.append({"label": task.data.label_names[k], "id": k, "probability": round(p[k], 6)})
        return out
    n = len(inputs)
    split = InstructionSplit(prompts=[t[0] for t in inputs], targets=[""] * n, answers=[""] * n,
                             tasks=["input"] * n, options=[None] * n)
    return [{"generation": text} for text in task.generate(run.model, list(range(n)), batch_size, split)]


# ---------------------------------------------------------------- a merged model folder

def export_merged(run: FinishedRun, out: str | Path) -> Path:
    """Fold the adapters into the base weights and write a plain transformers model folder (weights,
    config with the class names, tokenizer, labels.json) that from_pretrained loads without PEFT."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedloraError(f"{out}: exists and is not an empty folder")
    quantization = run.config.model.quantization
    if quantization != "none":
        raise FedloraError(f"the run's base was loaded quantised (model.quantization = '{quantization}'): its "
                           f"adapters cannot be folded into full weights here; load the run's PEFT adapter "
                           f"(adapter_model.safetensors) onto the unquantised base model and merge it there")
    if run.config.model.pooling == "mean":
        raise FedloraError("the run's head reads mean-pooled hidden states (model.pooling = 'mean'), which a plain "
                           "transformers folder cannot express (it pools the first token): use the run itself "
                           "(fedlora eval / fedlora predict, or fedlora.inference.load_trained)")
    adapted = run.adapted
    if adapted.layers:
        adapted.merge()
    names = run.label_names
    if names is not None:
        adapted.model.config.update(label_config(names))
    adapted.model.save_pretrained(out, state_dict=adapted.base_model_state_dict())
    run.task.tokenizer.save_pretrained(out)
    if names is not None:
        write_labels(out, names)
    return out


def format_metrics(metrics: dict[str, float], n: int) -> str:
    """The overall figures on one line, then one line per class or task."""
    main = {k: v for k, v in metrics.items() if "/" not in k}
    lines = [", ".join(f"{k} {v:.4f}" for k, v in main.items()) + f" ({n} examples)"]
    lines += [f"  {k}: {v:.4f}" for k, v in metrics.items() if "/" in k]
    return "\n".join(lines)


def evaluated_count(run: FinishedRun) -> int:
    return len(run.task.eval_indices(run.config.eval.max_examples))


def open_inputs(path: str) -> tuple[Iterable[str], str]:
    if path == "-":
        return sys.stdin, "<stdin>"
    file = Path(path)
    if not file.is_file():
        raise FedloraError(f"--input: no such file: {path}")
    return file.read_text(encoding="utf-8").splitlines(), str(file)
