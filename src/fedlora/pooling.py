"""Mean pooling for encoder classifiers (`model.pooling = "mean"`).

Sentence encoders such as all-MiniLM-L6-v2 were trained to represent a text by the attention-masked mean
of their last hidden states; their first token ([CLS]) and BERT's pooler were never tuned for that. The
model keeps its architecture and weights: a hook replaces the first position of the encoder's output by
the masked mean of all positions, so the model's own head (BERT's pooler and classifier, RoBERTa's
classification head, ...), which reads the first position, reads the mean instead.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder whose output the hook changes; a model without one is refused."""
    encoder = getattr(model.base_model, "encoder", None)
    if encoder is None or model.base_model is model:
        raise ConfigError(f"model.pooling = 'mean' needs an encoder classifier (BERT, RoBERTa, ...), not a "
                          f"{type(model).__name__}; use model.pooling = 'cls'")
    return encoder


def check_before_loading(source: str) -> None:
    """The same refusal from the model's config alone (its architecture built on the meta device, with no
    weights), so that it comes before the data and the weights are loaded."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except (OSError, ValueError, KeyError):
        return  # loading the model will say what is wrong with its source
    encoder_of(model)


def pool_by_mean(model: nn.Module) -> None:
    """Make `model`'s head read the masked mean of the last hidden states instead of the first token's."""
    encoder = encoder_of(model)
    masks = []

    def keep_mask(module, args, kwargs):
        masks[:] = [kwargs.get("attention_mask")]

    def first_is_mean(module, args, output):
        hidden = output[0]
        mask = masks[0] if masks and masks[0] is not None else torch.ones(hidden.shape[:2], device=hidden.device)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        pooled = torch.cat([mean.unsqueeze(1), hidden[:, 1:]], dim=1)
        if isinstance(output, tuple):
            return (pooled,) + output[1:]
        output.last_hidden_state = pooled
        return output

    model.register_forward_pre_hook(keep_mask, with_kwargs=True)
    encoder.register_forward_hook(first_is_mean)
