"""What the benchmarks share: synthetic batches, timing side by side, the machine's description."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def make_batch(vocab: int, batch: int, tokens: int, num_labels: int | None = 2) -> dict:
    """Random token ids (full attention); class labels, or next-token labels when num_labels is None."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, tokens), generator=g)
    labels = torch.randint(0, num_labels, (batch,), generator=g) if num_labels else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones(batch, tokens, dtype=torch.long), "labels": labels}


def classification_losses(model):
    def losses(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    return losses


def causal_lm_losses(model):
    """Per-example mean next-token loss."""
    def losses(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return token.view(targets.shape).mean(1)
    return losses


def timed(step) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def median_times(steps: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of every step; the steps alternate so that drift hits them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> dict:
    return {"threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def write_results(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload | machine(), indent=2) + "\n")
    print(f"\nwrote {path}")
