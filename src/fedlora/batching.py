"""A logical batch in micro-batches: rows of similar length together, each part cut to its own longest row and
holding at most train.physical_batch_size rows. Gradients summed over the parts are the batch's gradient
(DP-SGD's per-example clipped sums likewise), so the batch size that sets the sampling rate is free of the
memory a forward and backward takes."""
from __future__ import annotations

import os

import numpy as np
import torch


def default_part_cost(device: torch.device) -> int:
    """What one more forward and backward part costs beyond its tokens, in tokens (see length_parts). On the
    CPU 64 was fastest for 10 and 50 clients at batches of 8 and 32 (MiniLM, SST-2,
    benchmarks/parallel_clients.py); a GPU is kept busy only by large parts, so there a part must save many
    padded tokens to be worth it."""
    return 64 if device.type == "cpu" else 4096


def optimal_parts(sorted_lengths: np.ndarray, part_cost: int, max_rows: int | None = None) -> list[int]:
    """Where to cut ascending lengths so that sum(rows * longest) + part_cost * parts is least (the ends),
    then every part longer than `max_rows` cut into near-equal pieces of at most `max_rows` rows.
    A cut between equal lengths never pays, so only the distinct lengths are candidates."""
    lengths, counts = np.unique(sorted_lengths, return_counts=True)
    rows_before = np.concatenate([[0], np.cumsum(counts)])  # rows_before[g]: rows shorter than lengths[g]
    best = np.zeros(len(lengths) + 1)
    start = np.zeros(len(lengths) + 1, dtype=np.int64)
    for j in range(1, len(lengths) + 1):
        costs = best[:j] + (rows_before[j] - rows_before[:j]) * lengths[j - 1] + part_cost
        start[j] = int(np.argmin(costs))
        best[j] = costs[start[j]]
    ends = [len(lengths)]
    while start[ends[-1]] > 0:
        ends.append(int(start[ends[-1]]))
    ends = [int(rows_before[g]) for g in ends[::-1]]
    if max_rows is None:
        return ends
    cut, begin = [], 0
    for end in ends:
        pieces = -(-(end - begin) // max_rows)
        cut += [begin + (end - begin) * (i + 1) // pieces for i in range(pieces)]
        begin = end
    return cut


def length_parts(batch: dict[str, torch.Tensor], part_cost: int,
                 max_rows: int | None = None) -> list[tuple[np.ndarray, dict]]:
    """The batch's rows (their positions) and inputs in parts of similar length, each cut to its own longest
    row (padding is on the right; a part padded on the left keeps every column). The longest part comes
    first, so that the memory it frees can serve every later part (in ascending order each part would need
    blocks larger than any freed before, and the heap would grow part by part)."""
    mask = batch["attention_mask"]
    lengths = mask.sum(1).cpu().numpy()
    order = np.argsort(lengths, kind="stable")
    ends = optimal_parts(lengths[order], part_cost, max_rows)
    parts = []
    for chosen in reversed(np.split(order, ends[:-1])):
        width = int(lengths[chosen].max())
        rows_t = torch.from_numpy(chosen).to(mask.device)
        if mask[rows_t, width:].any():
            width = mask.shape[1]
        parts.append((chosen, {k: v[rows_t, :width] if v.dim() > 1 and v.shape[1] == mask.shape[1] else v[rows_t]
                               for k, v in batch.items()}))
    return parts


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not known here (macOS)
        return 0


def row_bytes(model_config, max_length: int, causal_lm: bool) -> int:
    """Activation memory of one row of max_length tokens in a forward and backward: per token and layer about
    a dozen hidden-size tensors, two intermediate-size ones and a row of attention per head, plus a language
    model's logits, in float32."""
    c = model_config
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 768)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", 12)
    inner = getattr(c, "intermediate_size", None) or 4 * hidden
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", 12)
    logits = 2 * getattr(c, "vocab_size", 0) if causal_lm else 0  # a class head's are few
    return max_length * (layers * (12 * hidden + 2 * inner + heads * max_length) + logits) * 4


def physical_rows(setting: int | str, model_config, max_length: int, causal_lm: bool, device: torch.device) -> int:
    """train.physical_batch_size: the setting, or with "auto" the rows whose activations fit in half the free
    memory (at least one)."""
    if setting != "auto":
        return int(setting)
    return max(1, int(available_memory(device) // 2 // row_bytes(model_config, max_length, causal_lm)))
