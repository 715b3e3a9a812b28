"""Instruction tuning of causal language models: the loss on the response tokens only, and evaluation the
way the papers do it: greedy generation with answer extraction, and for multiple-choice tasks the option
whose response has the highest summed log-likelihood."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from . import progress
from .answers import completion_for, is_correct
from .data.instructions import InstructionData, InstructionSplit
from .tasks import Task, check_max_length

IGNORE = -100
# The instruction template of Alpaca and LLM-Adapters, for tokenizers without a chat template.
PLAIN_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")


class CausalLMTask(Task):
    task_type = "CAUSAL_LM"

    def __init__(self, data: InstructionData, tokenizer, max_length: int, device: torch.device, *,
                 chat_template: bool | None = None, choice_eval: str = "score", max_new_tokens: int = 256,
                 autocast: torch.dtype | None = None, progress: bool = False):
        self.data = data
        self.tokenizer = tokenizer
        self.max_length = check_max_length(tokenizer, max_length, texts=2)  # a prompt and a response
        self.device = device
        self.use_chat = bool(tokenizer.chat_template) if chat_template is None else chat_template
        if self.use_chat and not tokenizer.chat_template:
            raise ValueError("data.chat_template = true, but the tokenizer has no chat template")
        self.choice_eval = choice_eval
        self.max_new_tokens = max_new_tokens
        self.autocast = autocast
        self.progress = progress
        self._prompt_ids: dict[tuple[int, int], list[int]] = {}

    @property
    def train_labels(self) -> list[int]:
        """The source task of every training example, as ids: what the partitioners split by."""
        ids = {t: i for i, t in enumerate(self.data.task_names)}
        return [ids[t] for t in self.data.train.tasks]

    @property
    def num_groups(self) -> int:
        return len(self.data.task_names)

    # -- tokenisation ---------------------------------------------------------------------------
    def prompt_text(self, prompt: str) -> str:
        if self.use_chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return PLAIN_TEMPLATE.format(prompt=prompt)

    def _prompt(self, split: InstructionSplit, i: int) -> list[int]:
        key = (id(split), i)
        if key not in self._prompt_ids:
            text = self.prompt_text(split.prompts[i])
            # a chat template writes its own special tokens; the plain template takes the tokenizer's BOS
            self._prompt_ids[key] = self.tokenizer(text, add_special_tokens=not self.use_chat)["input_ids"]
        return self._prompt_ids[key]

    def encode(self, prompt_ids: list[int], response: str, eos: bool = True) -> tuple[list[int], list[int]]:
        """(input ids, labels) for prompt + response, labels IGNORE on the prompt. Too long: the prompt
        loses its start first, the response its end only when it alone is longer than half the limit."""
        target = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        if eos:
            target = target + [self.tokenizer.eos_token_id]
        if len(prompt_ids) + len(target) > self.max_length:
            target = target[:max(self.max_length // 2, self.max_length - len(prompt_ids))]
            prompt_ids = prompt_ids[len(prompt_ids) - (self.max_length - len(target)):]
        return prompt_ids + target, [IGNORE] * len(prompt_ids) + target

    def _pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device),
                "labels": labels.to(self.device)}

    def batch(self, indices: Sequence[int], split: InstructionSplit | None = None) -> dict[str, torch.Tensor]:
        split = split or self.data.train
        return self._pad([self.encode(self._prompt(split, i), split.targets[i]) for i in indices])

    # -- losses ---------------------------------------------------------------------------------
    def _token_log_probs(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of every next token that carries a label, and the mask of those tokens."""
        with self.autocast_context():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        mask = labels != IGNORE
        log_probs = -torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        return log_probs * mask, mask

    def example_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean negative log-likelihood of each example's response tokens, shape (B,)."""
        log_probs, mask = self._token_log_probs(model, batch)
        return -log_probs.sum(1) / mask.sum(1).clamp(min=1)

    # -- evaluation -----------------------------------------------------------------------------
    def eval_indices(self, max_examples: int | None) -> list[int]:
        """The evaluated examples: all, or `max_examples` taken round-robin over the tasks (in file order)."""
        split = self.data.eval
        if max_examples is None or max_examples >= len(split):
            return list(range(len(split)))
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(split.tasks):
            by_task[t].append(i)
        queues = [iter(v) for v in by_task.values()]
        chosen: list[int] = []
        while len(chosen) < max_examples:
            for q in queues:
                i = next(q, None)
                if i is not None and len(chosen) < max_examples:
                    chosen.append(i)
        return sorted(chosen)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int, max_examples: int | None = None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        split, indices = self.data.eval, self.eval_indices(max_examples)
        progress.plain_line(f"evaluating {len(indices)} examples", self.progress)
        choice = [i for i in indices if split.options[i] is not None]
        generate = [i for i in indices if split.options[i] is None or self.choice_eval in ("generate", "both")]
        correct: dict[str, dict[int, bool]] = {"generate": {}, "score": {}}
        if choice and self.choice_eval in ("score", "both"):
            picks = self.score_options(model, choice, batch_size)
            correct["score"] = {i: split.options[i][p] == split.answers[i] for i, p in zip(choice, picks)}
        if generate:
            texts = self.generate(model, generate, batch_size)
            correct["generate"] = {i: is_correct(split.tasks[i], t, split.answers[i]) for i, t in zip(generate, texts)}
        loss = self._eval_loss(model, indices, batch_size)
        model.train(was_training)
        # the reported accuracy of an example: option scoring where it ran, else its generation
        final = correct["generate"] | correct["score"]
        result = {"accuracy": float(np.mean([final[i] for i in indices])), "loss": loss}
        for task in sorted({split.tasks[i] for i in indices}):
            result[f"accuracy/{task}"] = float(np.mean([final[i] for i in indices if split.tasks[i] == task]))
        if self.choice_eval == "both" and choice:
            for mode in ("generate", "score"):
                result[f"accuracy_{mode}/choice"] = float(np.mean([correct[mode][i] for i in choice]))
        return result

    def _eval_loss(self, model, indices: list[int], batch_size: int) -> float:
        total, count = 0.0, 0
        for start in range(0, len(indices), batch_size):
            batch = self.batch(indices[start:start + batch_size], self.data.eval)
            total += self.example_losses(model, batch).sum().item()
            count += batch["input_ids"].shape[0]
        return total / count

    def score_options(self, model, indices: list[int], batch_size: int) -> list[int]:
        """For each example, the index of its option with the highest summed log-likelihood; the
        (example, option) pairs run in batches of `batch_size`."""
        split = self.data.eval
        pairs = [(i, k) for i in indices for k in range(len(split.options[i]))]
        scores: dict[tuple[int, int], float] = {}
        for start in progress.bar(range(0, len(pairs), batch_size), self.progress, desc="scoring options",
                                  leave=False):
            chunk = pairs[start:start + batch_size]
            rows = [self.encode(self._prompt(split, i), completion_for(split.tasks[i], split.options[i][k]),
                                eos=False) for i, k in chunk]
            log_probs, _ = self._token_log_probs(model, self._pad(rows))
            scores.update(zip(chunk, log_probs.sum(1).tolist()))
        return [max(range(len(split.options[i])), key=lambda k: scores[(i, k)]) for i in indices]

    def generate(self, model, indices: list[int], batch_size: int, split: InstructionSplit | None = None) -> list[str]:
        """Greedy completions, batched with left padding (longest prompts first, so batches pad little)."""
        split = split or self.data.eval
        order = sorted(indices, key=lambda i: -len(self._prompt(split, i)))
        pad = self.tokenizer.pad_token_id
        texts: dict[int, str] = {}
        for start in progress.bar(range(0, len(order), batch_size), self.progress, desc="generating", leave=False):
            chunk = order[start:start + batch_size]
            prompts = [self._prompt(split, i)[-(self.max_length - 1):] for i in chunk]
            width = max(len(p) for p in prompts)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
            with self.autocast_context():
                out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                     do_sample=False, pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id)
            for i, row in zip(chunk, out[:, width:]):
                texts[i] = self.tokenizer.decode(row, skip_special_tokens=True)
        return [texts[i] for i in indices]
