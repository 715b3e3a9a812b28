"""Tensors as Flower ArrayRecords, byte for byte: every Array holds the tensor's raw data, so Flower's own
count of a record is the payload's bytes plus the key names it also counts."""
from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from flwr.app import Array, ArrayRecord

from ..plan import PrivacySettings
from ..validation import payload_dtype

RAW = "torch.raw"


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    record = ArrayRecord()
    for key, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        record[key] = Array(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), stype=RAW,
                            data=t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return record


def from_record(record: ArrayRecord, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a record a peer sent; ValueError for a dtype outside the allow-list or data that does
    not fill the shape (the server's update checks then judge keys, shapes, dtypes and values)."""
    out = {}
    for key, array in record.items():
        if array.stype != RAW:  # an ArrayRecord built by other Flower code (NumPy arrays, never unpickled)
            out[key] = torch.from_numpy(array.numpy()).to(device)
            continue
        dtype = payload_dtype(array.dtype)
        shape = tuple(int(n) for n in array.shape)
        if math.prod(shape) * dtype.itemsize != len(array.data):
            raise ValueError(f"'{key}' has {len(array.data)} bytes, not those of shape {shape} in {array.dtype}")
        if not array.data:
            out[key] = torch.empty(shape, dtype=dtype, device=device)
        else:
            out[key] = torch.frombuffer(bytearray(array.data), dtype=dtype).reshape(shape).to(device)
    return out


def flower_bytes(record: ArrayRecord) -> int:
    """Flower's count of a record's bytes (ArrayRecord.count_bytes) less the key names it includes."""
    return record.count_bytes() - sum(len(key) for key in record)


def nest(flat: dict[str, torch.Tensor]) -> dict:
    """{'global/x': t, 'ranks/3/y': u} -> {'global': {'x': t}, 'ranks': {3: {'y': u}}}."""
    out: dict = {}
    for key, value in flat.items():
        *parts, last = key.split("/")
        table = out
        for part in parts:
            table = table.setdefault(int(part) if part.isdigit() else part, {})
        table[last] = value
    return out


def flatten(nested: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}/")
        else:
            out[f"{prefix}{key}"] = value
    return out


def privacy_settings(privacy: PrivacySettings | None, clip: float | None = None) -> dict:
    """A client's DP settings as a message's config entries ({} without DP): example-level DP's settings, or
    client-level DP's clipping bound."""
    if clip is not None:
        return {"client-clip": float(clip)}
    if privacy is None:
        return {}
    return {"noise-multiplier": float(privacy.noise_multiplier), "delta": float(privacy.delta),
            "init-examples": int(privacy.init_examples)}


def privacy_from(settings) -> PrivacySettings | None:
    """The DP settings a message carries (None: it carries none)."""
    if "noise-multiplier" not in settings:
        return None
    return PrivacySettings(float(settings["noise-multiplier"]), float(settings["delta"]),
                           int(settings["init-examples"]))


def keep_for_audit(name: str, tensors: Callable[[], dict]) -> None:
    """With FEDLORA_FLOWER_RECORD=DIR in the environment (a testing aid, off by default), save `tensors()` as
    DIR/NAME.pt on this party's own disk: a node what it sealed under distributed DP, the server the sum it
    unmasked, so that a test can recompute one from the other across processes. Without it nothing is built."""
    folder = os.environ.get("FEDLORA_FLOWER_RECORD")
    if folder:
        torch.save({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in tensors().items()},
                   os.path.join(folder, f"{name}.pt"))
