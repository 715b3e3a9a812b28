"""Checkpoints that load without running code: one safetensors file holds every tensor of a nested state
under a flat key, and its metadata holds the rest of the state as JSON, with {"__tensor__": key} where a
tensor was. Nothing in it is unpickled, so a checkpoint from someone else can only fail to load.

The state may nest dicts (str or int keys), lists, tuples, tensors, numbers, strings, booleans and None;
it reads back with the same types, dict keys, dtypes and values. torch is imported when first needed, so that
what reads a run folder (the command line's help included) starts without it."""
from __future__ import annotations

import json
import numbers
import random
from pathlib import Path

import numpy as np

from .errors import FedloraError
from .files import atomic_write

FORMAT = "fedlora-checkpoint/1"
_META_KEY = "fedlora"
_MARKERS = ("__tensor__", "__tuple__", "__items__")


def save(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically (a crash leaves the previous file or the new one, never a mix)."""
    import torch
    from safetensors.torch import save as safetensors_bytes

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def encode(value):
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            t = value.detach().cpu()
            storage = t.untyped_storage().data_ptr()
            # safetensors refuses tensors that share memory (views, a tensor saved twice): those are copied
            tensors[key] = t.contiguous().clone() if storage in storages and t.numel() else t.contiguous()
            storages.add(storage)
            return {"__tensor__": key}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, numbers.Number):
            value = value.item() if isinstance(value, np.generic) else value
            if isinstance(value, (int, float)):
                return value
        if isinstance(value, list):
            return [encode(v) for v in value]
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v) for v in value]}
        if isinstance(value, dict):
            keys = list(value)
            if any(type(k) not in (str, int) for k in keys):
                raise TypeError(f"checkpoint dict keys must be str or int, not {[type(k).__name__ for k in keys]}")
            if all(type(k) is str for k in keys) and not any(k in _MARKERS for k in keys):
                return {k: encode(v) for k, v in value.items()}
            return {"__items__": [[k, encode(v)] for k, v in value.items()]}
        raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")

    meta = json.dumps({"format": FORMAT, "state": encode(state)}, allow_nan=True)
    atomic_write(Path(path), safetensors_bytes(tensors, metadata={_META_KEY: meta}))


def load(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """The state saved at `path`, tensors on `device`. A file that is not a fedlora checkpoint (a pickle,
    another program's safetensors or torch file, a torn write) raises FedloraError naming it."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = (f.metadata() or {}).get(_META_KEY)
            if meta is None:
                raise ValueError("a safetensors file without fedlora's state")
            doc = json.loads(meta)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                                 f"expected {FORMAT!r}")
            keys = set(f.keys())

            def decode(value):
                if isinstance(value, list):
                    return [decode(v) for v in value]
                if not isinstance(value, dict):
                    return value
                if len(value) == 1 and "__tensor__" in value:
                    if value["__tensor__"] not in keys:
                        raise ValueError(f"tensor {value['__tensor__']!r} is missing")
                    return f.get_tensor(value["__tensor__"])
                if len(value) == 1 and "__tuple__" in value:
                    return tuple(decode(v) for v in value["__tuple__"])
                if len(value) == 1 and "__items__" in value:
                    return {k: decode(v) for k, v in value["__items__"]}
                return {k: decode(v) for k, v in value.items()}

            state = decode(doc["state"])
    except FileNotFoundError:
        raise FedloraError(f"{path}: no such checkpoint") from None
    except OSError as err:
        raise FedloraError(f"{path}: cannot read the checkpoint ({err.strerror or err})") from None
    except Exception as err:  # safetensors' own errors, bad JSON, a structure fedlora did not write
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FedloraError(f"{path}: not a fedlora checkpoint ({why})") from None
    if not isinstance(state, dict):
        raise FedloraError(f"{path}: not a fedlora checkpoint (its state is a {type(state).__name__})")
    return state


def require(state: dict, keys: tuple[str, ...], path: str | Path) -> None:
    """Refuse a checkpoint that lacks any of `keys` (one written by another version or program)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise FedloraError(f"{path}: not a checkpoint of a fedlora run (no {', '.join(missing)})")


# -- random number generators --------------------------------------------------------------------

def rng_state() -> dict:
    """The global generators' states (torch CPU and CUDA, NumPy's legacy MT19937, Python's) as tensors,
    lists and numbers."""
    import torch

    name, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
