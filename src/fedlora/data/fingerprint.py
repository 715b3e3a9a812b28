"""Fingerprints of a run's data, kept in its checkpoint so that a resume on other data is refused.

A split's fingerprint is a digest of its rows in order (every column of a row, labels included), with the row
count. Clients' shards that are materialised (a list of index arrays) get one digest each, over their rows'
digests; a sampled population (data.partition = "sampled", its clients computed when asked) gets none: its
clients' rows follow from the training data's fingerprint and the partition settings in the config."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

DIGEST_BYTES = 8


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def row_digests(split) -> list[bytes]:
    """One digest per row of a split (a dataclass of equally long per-row lists, such as ClassificationSplit or
    InstructionSplit)."""
    columns = [getattr(split, f.name) for f in dataclasses.fields(split)
               if isinstance(getattr(split, f.name), list)]
    return [_digest(json.dumps(row, default=str, ensure_ascii=False).encode())
            for row in zip(*columns)]


def fingerprint(train, evaluation, shards: Sequence | None, sizes: Sequence[int] | None = None,
                label_names: Sequence[str] | None = None) -> dict:
    """The data's fingerprint: the training and evaluation rows (with the class names, which give the label ids
    their meaning) and, when `shards` is a list of index arrays, every client's size and rows. `sizes` stand in
    for the shards' sizes where the runtime learned others (a Flower node with data of its own)."""
    rows = row_digests(train)
    names = json.dumps(list(label_names or [])).encode()
    return {"train": {"rows": len(rows), "digest": _digest(names + b"".join(rows)).hex()},
            "eval": {"rows": len(evaluation), "digest": _digest(b"".join(row_digests(evaluation))).hex()},
            "clients": None if not isinstance(shards, list) else
            [[int(n), _digest(b"".join(rows[int(i)] for i in s)).hex()]
             for n, s in zip(sizes if sizes is not None else map(len, shards), shards)]}


def differences(saved: dict, now: dict, train_source: str, eval_source: str) -> str | None:
    """What differs between the data a checkpoint was written on and the data now, as one phrase; None when
    nothing does."""
    found = []
    for key, source in (("train", train_source), ("eval", eval_source)):
        was, has = saved[key], now[key]
        if was["digest"] != has["digest"]:
            counts = (f"{has['rows']} rows, was {was['rows']}" if has["rows"] != was["rows"]
                      else f"{has['rows']} rows as before, not the same ones")
            found.append(f"the {'training' if key == 'train' else 'evaluation'} data {source} differs ({counts})")
    if saved["clients"] is not None and now["clients"] is not None:
        now_clients = now["clients"]
        changed = [(c, was[0], has[0]) for c, (was, has) in enumerate(zip(saved["clients"], now_clients))
                   if was != has]
        if changed:
            shown = "; ".join(f"client {c}: {old} -> {new} rows" if old != new else f"client {c}: {new} rows as before, not the same ones"
                              for c, old, new in changed[:10])
            more = f"; and {len(changed) - 10} more" if len(changed) > 10 else ""
            found.append(f"{len(changed)} of {len(now_clients)} clients' training rows changed ({shown}{more})")
    return "; ".join(found) or None
