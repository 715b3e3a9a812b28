"""Turning examples into model batches, and evaluating the global model."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Iterator, Sequence

import numpy as np
import torch

from .batching import default_part_cost, length_parts
from .data import ClassificationData, ClassificationSplit
from .data.partition import stratified_sample
from . import progress
from .errors import ConfigError

# The evaluation sample is the same for every run, seed and method (like data.max_train_examples' draw).
EVAL_SAMPLE_SEED = 2


def check_max_length(tokenizer, max_length: int, texts: int) -> int:
    """`max_length` if an example of `texts` texts fits in it with one token of each and the tokenizer's
    special tokens, and the tokenizer's own limit allows it; else a ConfigError."""
    needed = tokenizer.num_special_tokens_to_add(pair=texts == 2) + texts
    if max_length < needed:
        raise ConfigError(f"config key 'data.max_length': {max_length} is too small: an example needs at least "
                          f"{needed} tokens ({needed - texts} special tokens and one token of each of its "
                          f"{texts} text{'s' if texts > 1 else ''})")
    limit = tokenizer.model_max_length
    if limit < 1_000_000 and max_length > limit:  # unset limits are huge placeholders
        raise ConfigError(f"config key 'data.max_length': {max_length} is more than the model takes ({limit} tokens)")
    return max_length


class Task(ABC):
    """What the simulator needs from a task: batches of a client's examples, per-example losses, evaluation."""

    task_type: str  # PEFT's task type of the exported adapter

    device: torch.device
    autocast: torch.dtype | None = None  # mixed precision for forward passes

    @abstractmethod
    def batch(self, indices: Sequence[int], split=None) -> dict[str, torch.Tensor]:
        """The model inputs (and labels) of these examples of `split` (default: the training split)."""

    @abstractmethod
    def example_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of every example of the batch, shape (B,)."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, batch_size: int, max_examples: int | None = None) -> dict[str, float]:
        """Metrics of the model on the evaluation split."""

    def autocast_context(self):
        return torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                              enabled=self.autocast is not None)

    def micro_batches(self, indices: Sequence[int], max_rows: int | None = None,
                      part_cost: int | None = None) -> list[dict[str, torch.Tensor]]:
        """These training examples as micro-batches of similar lengths, each of at most `max_rows` rows and cut
        to its own longest row (batching.length_parts)."""
        cost = default_part_cost(self.device) if part_cost is None else part_cost
        return [part for _, part in length_parts(self.batch(indices), cost, max_rows)]

    @staticmethod
    def client_batch_indices(shard: np.ndarray, batch_size: int, steps: int, rng: np.random.Generator,
                             sample_rate: float | None = None) -> Iterator[np.ndarray]:
        """The examples of `steps` batches from a client's shard. Without `sample_rate`: drawn without
        replacement from a shuffled shard, reshuffled when exhausted. With it: Poisson sampling, every example
        taken independently with that probability (possibly none), as DP-SGD's accounting assumes."""
        if sample_rate is not None:
            for _ in range(steps):
                yield shard[rng.random(len(shard)) < sample_rate]
            return
        order = rng.permutation(shard)
        pos = 0
        for _ in range(steps):
            if pos + batch_size > len(order) and pos > 0:
                order, pos = rng.permutation(shard), 0
            chosen = order[pos:pos + batch_size]
            pos += len(chosen)
            yield chosen


class ClassificationTask(Task):
    """Sequence classification: one or two texts -> label; accuracy on a fixed evaluation split."""

    task_type = "SEQ_CLS"

    def __init__(self, data: ClassificationData, tokenizer, max_length: int, device: torch.device,
                 autocast: torch.dtype | None = None, progress: bool = False):
        self.data = data
        self.tokenizer = tokenizer
        self.max_length = check_max_length(tokenizer, max_length, texts=1 if data.train.text_b is None else 2)
        self.device = device
        self.autocast = autocast
        self.progress = progress
        self._eval_batches: dict[tuple[int, int | None], list[dict]] = {}

    @property
    def train_labels(self) -> list[int]:
        return self.data.train.labels

    @property
    def num_groups(self) -> int:
        return self.data.num_labels

    def batch(self, indices: Sequence[int], split: ClassificationSplit | None = None) -> dict[str, torch.Tensor]:
        split = split or self.data.train
        texts = [split.text_a[i] for i in indices]
        pairs = [split.text_b[i] for i in indices] if split.text_b is not None else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        enc["labels"] = torch.tensor([split.labels[i] for i in indices], dtype=torch.long)
        return {k: v.to(self.device) for k, v in enc.items()}

    def example_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of every example of the batch, shape (B,)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with self.autocast_context():
            logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")

    def evaluating_on(self, split: ClassificationSplit) -> "ClassificationTask":
        """This task with `split` (labels as this task's class ids) as its evaluation data: a client's own."""
        return ClassificationTask(replace(self.data, eval=split), self.tokenizer, self.max_length, self.device,
                                  self.autocast, self.progress)

    def eval_indices(self, max_examples: int | None) -> np.ndarray:
        """The evaluated examples: all, or a fixed random sample of `max_examples`, stratified by label."""
        labels = self.data.eval.labels
        if max_examples is None or max_examples >= len(labels):
            return np.arange(len(labels))
        return stratified_sample(labels, max_examples, seed=EVAL_SAMPLE_SEED)

    def baselines(self, max_examples: int | None) -> dict[str, float]:
        """Accuracy without learning on the evaluated examples: chance (1 / classes) and always answering
        the class most common among them (majority)."""
        counts = np.bincount(np.asarray(self.data.eval.labels)[self.eval_indices(max_examples)],
                             minlength=self.data.num_labels)
        return {"chance": 1 / self.data.num_labels, "majority": float(counts.max() / counts.sum())}

    def _eval_set(self, batch_size: int, max_examples: int | None) -> list[dict]:
        key = (batch_size, max_examples)
        if key not in self._eval_batches:
            split = self.data.eval
            chosen = self.eval_indices(max_examples)
            lengths = [len(split.text_a[i]) + len(split.text_b[i] if split.text_b else "") for i in chosen]
            order = chosen[np.argsort(lengths, kind="stable")]  # similar lengths together: less padding
            self._eval_batches[key] = [self.batch(order[i:i + batch_size], split)
                                       for i in range(0, len(order), batch_size)]
        return self._eval_batches[key]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int, max_examples: int | None = None,
                 per_class: bool = False) -> dict[str, float]:
        """Accuracy and mean loss; with `per_class` also "accuracy/<label>" (the recall of each class present)."""
        was_training = model.training
        model.eval()
        correct, loss_sum, count = 0, 0.0, 0
        hits = np.zeros(self.data.num_labels, dtype=np.int64)
        seen = np.zeros(self.data.num_labels, dtype=np.int64)
        batches = self._eval_set(batch_size, max_examples)
        progress.plain_line(f"evaluating {sum(len(b['labels']) for b in batches)} examples", self.progress)
        for batch in progress.bar(batches, self.progress, desc="evaluating", leave=False):
            with self.autocast_context():
                out = model(**batch)
            n = batch["labels"].shape[0]
            right = out.logits.argmax(-1) == batch["labels"]
            correct += right.sum().item()
            loss_sum += out.loss.item() * n
            count += n
            labels = batch["labels"].cpu().numpy()
            np.add.at(hits, labels, right.cpu().numpy())
            np.add.at(seen, labels, 1)
        model.train(was_training)
        result = {"accuracy": correct / count, "loss": loss_sum / count}
        if per_class:
            result |= {f"accuracy/{name}": float(hits[k] / seen[k])
                       for k, name in enumerate(self.data.label_names) if seen[k]}
        return result
