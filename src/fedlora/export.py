"""A finished run's model written to its folder: a PEFT adapter (beside it, for a method that changes W0, the
base model it applies to), or for full fine-tuning the whole model, with the tokenizer and the class names."""
from __future__ import annotations

from pathlib import Path

from .adapters import AdaptedModel, label_config, write_labels
from .config import Config
from .methods import Method
from .models import base_model_reference
from .tasks import Task


def export_model(out: Path, cfg: Config, task: Task, adapted: AdaptedModel, method: Method, model_source: str,
                 label_names: list[str] | None) -> None:
    state = method.eval_state()
    adapted.load_state(state)
    model, tokenizer = adapted.model, task.tokenizer
    if label_names is not None:
        write_labels(out, label_names)
        model.config.update(label_config(label_names))  # a saved model folder carries the class names
    if adapted.parameterisation == "full":
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        return
    base = base_model_reference(cfg.model.name, cfg.model.path, model_source)
    if method.changes_base:  # W0 itself was trained: ship it beside the adapter
        base_dir = out / "base_model"
        model.save_pretrained(base_dir, state_dict=adapted.base_model_state_dict())
        tokenizer.save_pretrained(base_dir)
        base = str(base_dir.resolve())
    adapted.export_peft(out / "adapter", state, base_model=base, task_type=task.task_type, label_names=label_names)
