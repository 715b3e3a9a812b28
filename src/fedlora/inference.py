"""A finished run put to use: its global model rebuilt from the run folder (summary.json's config, the last
checkpoint), evaluated on any data, asked for predictions, and exported as one merged model folder."""
from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from . import checkpoint
from .adapters import AdaptedModel, label_config, write_labels
from .api import Run
from .config import DataConfig, apply_overrides, build_config
from .data import (INSTRUCTION_PRESETS, ClassificationData, ClassificationSplit, InstructionData, InstructionSplit,
                   load_instructions)
from .data import PRESETS as CLASSIFICATION_PRESETS
from .data.instructions import _default_task as default_task
from .data.instructions import _read_file as read_instruction_file
from .data.presets import load_evaluation
from .errors import ConfigError, DataError, FedloraError
from .experiment import build_task, load_task_data, task_kind
from .export import RECORD_FORMAT
from .methods import METHODS, check_method, register_method
from .models import pick_device
from .plan import population_sizes
from .run_folder import CHECKPOINT, MODEL_RECORD, ROUNDS_LOG, read_log, read_summary
from .tasks import ClassificationTask, Task

# What may change between training a model and using it: the data it is evaluated on, how, and where.
CHANGEABLE = ("data.", "eval.", "device")


@dataclass
class FinishedRun(Run):
    """A finished run with its global model rebuilt (`load_trained`). Its task holds no training examples; the
    evaluation split is read when first needed (`load_eval_data`)."""
    task: Task
    adapted: AdaptedModel
    model_source: str
    eval_loaded: bool = False

    @property
    def model(self) -> torch.nn.Module:
        return self.adapted.model

    @property
    def label_names(self) -> list[str] | None:
        return self.task.data.label_names if isinstance(self.task, ClassificationTask) else None

    def load_eval_data(self):
        """The evaluation split (the run's own, or --data's), read on first use into task.data.eval."""
        if not self.eval_loaded:
            self.task.data.eval = evaluation_split(self.config.data, self.label_names)
            self.eval_loaded = True
        return self.task.data.eval

    def evaluate(self) -> dict[str, float]:
        """The run's own evaluation (eval.batch_size, eval.max_examples) with per-class or per-task figures."""
        self.load_eval_data()
        e = self.config.eval
        if isinstance(self.task, ClassificationTask):
            return self.task.evaluate(self.model, e.batch_size, e.max_examples, per_class=True)
        return self.task.evaluate(self.model, e.batch_size, e.max_examples)


def load_trained(folder: str | Path, overrides: Iterable[str] = (), data: str | None = None,
                 progress: bool = False) -> FinishedRun:
    """The global model of a finished run, rebuilt from the run folder alone (model.json, the checkpoint, the
    base model it names), with the task it was trained for. `data` (a file or a data set preset) replaces the
    evaluation data; `overrides` (KEY=VALUE) may change data.*, eval.* and device. Other data keeps the run's
    class names. The training data is never read (but for a run written before model.json)."""
    folder = Path(folder)
    summary = read_summary(folder)
    overrides = list(overrides)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(CHANGEABLE):
            raise ConfigError(f"--set {key}: only data.*, eval.* and device can change for a trained model")
    record = read_record(folder) or older_record(folder, summary)
    import_method(record["method"])
    raw = json.loads(json.dumps(record["config"]))
    if data is not None:
        raw["data"] = evaluation_data(raw["data"], data)
    cfg = build_config(apply_overrides(raw, overrides))
    method_class = check_method(cfg)
    if task_kind(cfg.data, cfg.model.name) != record["kind"]:
        raise ConfigError(f"--data {data}: the run's model is for {record['kind']}, this data is not")
    source = record["model_source"]
    if cfg.model.path and not Path(cfg.model.path).is_dir() and source and Path(source).is_dir():
        cfg.model.path = source  # an older run named a folder relative to where it was started
    device = pick_device(cfg.device)
    state = checkpoint.load(folder / CHECKPOINT, device)
    if state.get("round") != summary.get("rounds"):
        raise FedloraError(f"{folder / CHECKPOINT} holds round {state.get('round')}, but the run ended after "
                           f"round {summary.get('rounds')}")
    torch.manual_seed(cfg.seed)
    task, adapted, source = build_task(cfg, device, progress, data=no_examples(record))
    task.tokenizer.truncation_side = record["tokenizer"]["truncation_side"]
    sizes = summary["client_sizes"]
    method = method_class(adapted, cfg, sizes if sizes is not None else population_sizes(cfg))
    method.load_state_dict(state["method"])
    if state.get("base_weights") is not None:
        adapted.load_base_weights(state["base_weights"])
    adapted.load_state(method.eval_state())
    adapted.model.eval()
    return FinishedRun(folder, cfg, read_log(folder / ROUNDS_LOG), summary, task, adapted, source)


def read_record(folder: Path) -> dict | None:
    """The run's model.json, or None for a run written before it existed."""
    path = folder / MODEL_RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FedloraError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise FedloraError(f"{path}: not a fedlora model record (format {RECORD_FORMAT!r})")
    return record


def older_record(folder: Path, summary: dict) -> dict:
    """What model.json would hold, for a run written before it: read off the run's training data, which
    must still be where the config names it."""
    cfg = build_config(json.loads(json.dumps(summary["config"])))
    source = summary.get("model_source")
    if cfg.model.path and not Path(cfg.model.path).is_dir() and source and Path(source).is_dir():
        cfg.model.path = source
    kind = task_kind(cfg.data, cfg.model.name)
    try:
        data = load_task_data(cfg.data, kind)
    except FedloraError as err:
        raise FedloraError(f"{folder} has no {MODEL_RECORD} (a run of an older fedlora): its model is rebuilt "
                           f"from its training data, which cannot be read: {err}") from None
    names = summary.get("labels")
    classifier = kind == "classification"
    if classifier and names is not None and data.label_names != names:
        raise DataError(f"the run's classes ({', '.join(names)}) differ from its data's now "
                        f"({', '.join(data.label_names)}): was {data.train.source} changed?")
    return {"kind": kind, "labels": names, "pair": classifier and data.train.text_b is not None,
            "tokenizer": {"truncation_side": "right"}, "method": {"name": cfg.method.name, "class": None},
            "model_source": source, "config": summary["config"]}


def import_method(method: dict) -> None:
    """Register the run's method when it is not built in: import the module its record names (which registers
    it with register_method, or holds the class)."""
    if method["name"] in METHODS or not method.get("class"):
        return
    module_name, _, qualname = method["class"].partition(":")
    if module_name == "__main__":
        raise FedloraError(f"the run's method {method['name']!r} is the class {qualname} of a script or notebook "
                           f"(module '__main__'), which cannot be imported: define it in a module on the Python "
                           f"path to use the run")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise FedloraError(f"the run's method {method['name']!r} is the class {qualname} of module "
                           f"{module_name!r}, which cannot be imported ({type(err).__name__}: {err}): install "
                           f"it or put its folder on PYTHONPATH") from None
    if method["name"] not in METHODS:
        cls = module
        for part in qualname.split("."):
            cls = getattr(cls, part, None)
        if cls is None:
            raise FedloraError(f"the run's method {method['name']!r}: module {module_name!r} has no {qualname}")
        register_method(cls)


def no_examples(record: dict):
    """Data without examples, carrying what the model needs: the class names and whether it reads pairs."""
    if record["kind"] == "classification":
        names = list(record["labels"])
        # one textless row per class: build_task refuses training data of fewer than two classes
        k = len(names)
        classes = ClassificationSplit([""] * k, [""] * k if record["pair"] else None, list(range(k)), "no examples")
        return ClassificationData(train=classes, eval=classes.select([]), num_labels=k, label_names=names)
    empty = InstructionSplit(prompts=[], targets=[], answers=[], tasks=[], options=[])
    return InstructionData("no examples", empty, empty)


def evaluation_split(data: DataConfig, label_names: list[str] | None):
    """The evaluation split `data` describes, read alone where it is a file of its own; a classifier's labels
    as ids of the run's classes. An unreachable one is refused, saying to give --data."""
    hint = "evaluate on a file with --data FILE (read with the run's columns) or a data set preset"
    if data.client_paths and not data.eval_path:
        raise DataError(f"the run had no evaluation file of its own (its clients evaluated on theirs, "
                        f"data.client_eval_paths): {hint}")
    if not (data.name or data.path or data.eval_path or data.hub_id):
        raise DataError(f"the run's evaluation data was held in memory: {hint}")
    if data.eval_path and not Path(data.eval_path).is_file():
        raise DataError(f"the run's evaluation file {data.eval_path} is not there: {hint}")
    if not data.eval_path and data.path and not Path(data.path).is_file():
        raise DataError(f"the run evaluated on its training file {data.path} (held-out rows or its evaluation "
                        f"file beside it), which is not there: {hint}")
    if label_names is not None:
        return load_evaluation(data, label_names)
    if data.eval_path and data.holdout_fraction is None:
        path = Path(data.eval_path)
        split = read_instruction_file(path, default_task(path), "answer")
        return split.select([i for i, t in enumerate(split.tasks) if t in data.tasks]) if data.tasks else split
    return load_instructions(data).eval


def evaluation_data(section: dict, data: str) -> dict:
    """The run's data section evaluating on `data`: a file (read with the run's columns) or a preset."""
    section = dict(section, holdout_fraction=None, max_train_examples=None)
    if Path(data).is_file():
        return section | {"eval_path": data}
    if data in CLASSIFICATION_PRESETS or data in INSTRUCTION_PRESETS:
        return section | {"name": data, "path": None, "eval_path": None, "eval_split": None, "hub_id": None,
                          "text_columns": None, "label_column": None, "header": True, "client_paths": None,
                          "client_eval_paths": None}
    raise ConfigError(f"--data {data}: neither a file nor a data set preset "
                      f"({', '.join([*CLASSIFICATION_PRESETS, *INSTRUCTION_PRESETS])})")


# ---------------------------------------------------------------- predictions

def parse_input(line: str, keys: list[str]) -> list[str]:
    """The texts of one input line: a JSON object (texts under `keys`, the first one required), a JSON string
    or list, or plain text (two texts separated by a tab); a ValueError saying why the line cannot be used.
    A line that starts with `{` is read as a JSON object and must be one."""
    if not line.strip():
        raise ValueError("blank line (no text)")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        if line.lstrip().startswith("{"):
            raise ValueError(f"not a valid JSON object ({err.msg} at column {err.colno})") from None
        value = None
    if isinstance(value, dict):
        missing = [k for k in keys if k not in value][:1 if len(keys) == 1 else None]
        if missing:
            raise ValueError(f"no key {missing[0]!r} (keys: {', '.join(value) or 'none'})")
        texts = [value[k] for k in keys]
        names = [repr(k) for k in keys]
    else:
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, list):
            texts = value
        else:  # plain text, or JSON of another kind (a number) read as text
            texts = line.split("\t") if len(keys) > 1 else [line]
        names = ["the first text", "the second text"] if len(keys) > 1 else ["the text"]
    if len(texts) != len(keys):
        raise ValueError(f"expected {len(keys)} text{'s' if len(keys) > 1 else ''} ({' and '.join(keys)}), "
                         f"got {len(texts)}" + (": this model classifies pairs" if len(keys) > 1 else ""))
    for name, text in zip(names, texts):
        if not isinstance(text, str):
            raise ValueError(f"{name} is not text (a JSON {type(text).__name__})")
        if not text.strip():
            raise ValueError(f"{name} is empty")
    return texts


def predict_lines(run: FinishedRun, lines: Iterable[str], source: str) -> list[dict]:
    """One result per input line, in order: the prediction, or {"line": n, "error": why} for a line that
    cannot be used. No lines at all is refused."""
    keys = input_keys(run)
    parsed: dict[int, list[str]] = {}
    results: list[dict] = []
    for number, line in enumerate(lines, start=1):
        try:
            parsed[len(results)] = parse_input(line.rstrip("\r\n"), keys)
            results.append({})
        except ValueError as err:
            results.append({"line": number, "error": str(err)})
    if not results:
        raise DataError(f"{source}: no input lines (one input per line: plain text, a JSON string or a JSON "
                        f"object with {', '.join(keys)})")
    for k, result in zip(parsed, predict(run, list(parsed.values()))):
        results[k] = result
    return results


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
    tokenizer = run.task.tokenizer
    tokenizer.model_max_length = run.task.max_length  # the length the model was trained and evaluated at
    tokenizer.save_pretrained(out)
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
    run.load_eval_data()
    return len(run.task.eval_indices(run.config.eval.max_examples))


def open_inputs(path: str) -> tuple[Iterable[str], str]:
    if path == "-":
        return sys.stdin, "<stdin>"
    file = Path(path)
    if not file.is_file():
        raise FedloraError(f"--input: no such file: {path}")
    return file.read_text(encoding="utf-8").splitlines(), str(file)
