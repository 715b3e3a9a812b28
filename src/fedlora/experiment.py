"""What a run is built from: the task (data, tokenizer, loss, evaluation) and the adapted model."""
from __future__ import annotations

import torch

from .adapters import AdaptedModel
from .config import Config
from .data import PRESETS as CLASSIFICATION_PRESETS
from .data import INSTRUCTION_PRESETS, load_classification, load_instructions
from .data.sources import check_classes
from .errors import ConfigError
from .lm_task import CausalLMTask
from .methods import METHODS
from .models import PRESETS as MODEL_PRESETS
from .models import (check_quantization, default_target_modules, head_modules, load_causal_lm, load_classifier,
                     resolve_model_source)
from .pooling import check_before_loading, pool_by_mean
from .tasks import ClassificationTask, Task


def task_kind(data_cfg, model_name: str) -> str:
    """'classification' or 'instructions', from data.kind, the data preset, or the model preset's task."""
    if data_cfg.kind != "auto":
        return data_cfg.kind
    if data_cfg.name in INSTRUCTION_PRESETS:
        return "instructions"
    if data_cfg.name in CLASSIFICATION_PRESETS:
        return "classification"
    preset = MODEL_PRESETS.get(model_name)
    return "instructions" if preset is not None and preset.task == "causal-lm" else "classification"


def load_task_data(data_cfg, kind: str):
    if kind == "instructions" and data_cfg.client_paths:
        raise ConfigError("data.client_paths: one file per client is read for classification data; instruction "
                          "data is split among the clients by data.partition")
    return load_instructions(data_cfg) if kind == "instructions" else load_classification(data_cfg)


def build_task(cfg: Config, device: torch.device, progress: bool = False, data=None, model=None,
               tokenizer=None) -> tuple[Task, AdaptedModel, str]:
    """The task (data, tokenizer, loss, evaluation), the adapted model on `device`, and the model source.
    `data` (ClassificationData) and `model` with its `tokenizer` stand in for the config's when given."""
    method = METHODS[cfg.method.name]
    quantization = cfg.model.quantization if model is None else "none"  # a model object is used as it is
    check_quantization(quantization, method, device)
    kind = task_kind(cfg.data, cfg.model.name)
    if kind == "classification" and cfg.model.pooling == "mean" and model is None:
        check_before_loading(resolve_model_source(cfg.model.name, cfg.model.path))
    if data is None:
        data = load_task_data(cfg.data, kind)
    if kind == "classification":
        check_classes(data)
    if model is not None:
        source = getattr(model, "name_or_path", None) or "a model object"
        labels = getattr(model.config, "num_labels", None)
        if kind == "classification" and labels != data.num_labels:
            raise ConfigError(f"the model object has {labels} labels but the data has {data.num_labels} classes "
                              f"({', '.join(data.label_names)}): load it with num_labels={data.num_labels}")
    elif kind == "instructions":
        source = resolve_model_source(cfg.model.name, cfg.model.path)
        model, tokenizer = load_causal_lm(source, cfg.model.dtype, quantization, device)
    else:
        source = resolve_model_source(cfg.model.name, cfg.model.path)
        model, tokenizer = load_classifier(source, data.num_labels, cfg.model.dtype, quantization, device)
    if kind == "classification" and cfg.model.pooling == "mean":
        pool_by_mean(model)
    rank, alpha = cfg.adapter.rank, cfg.adapter.alpha
    if method.parameterisation == "lorasb" and alpha not in (None, rank):
        raise ConfigError(f"adapter.alpha: Fed-SB fixes the scaling s = 1 (alpha = rank = {rank}); got {alpha}")
    heads = cfg.adapter.modules_to_save if cfg.adapter.modules_to_save is not None else head_modules(model)
    adapted = AdaptedModel(
        model, parameterisation=method.parameterisation, rank=rank, scaling=(alpha or rank) / rank,
        target_modules=cfg.adapter.target_modules or default_target_modules(model.config.model_type),
        head_modules=heads, dropout=cfg.adapter.dropout)
    if quantization == "none":  # a quantised model was loaded onto the device, its adapters made there
        adapted.model.to(device)
    autocast = None if cfg.model.autocast == "off" else getattr(torch, cfg.model.autocast)
    if kind == "instructions":
        try:
            task = CausalLMTask(data, tokenizer, cfg.data.max_length, device, chat_template=cfg.data.chat_template,
                                choice_eval=cfg.eval.choice_mode, max_new_tokens=cfg.eval.max_new_tokens,
                                autocast=autocast, progress=progress)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    else:
        task = ClassificationTask(data, tokenizer, cfg.data.max_length, device, autocast=autocast, progress=progress)
    return task, adapted, source
