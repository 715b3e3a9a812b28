"""Writing files so that a crash or a failed write never leaves half of one: atomic replacement, whole
appended lines, and every failure reported as one line naming the path."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import FedloraError


def write_error(path: Path, err: OSError) -> FedloraError:
    return FedloraError(f"{path}: cannot write ({err.strerror or err}); what was written before is kept")


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` in one step: a crash or a failed write leaves the old file as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_error(path, err) from None


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line; a failed write is cut back off, so the file never ends in half a line
    written by this call."""
    line = (json.dumps(record) + "\n").encode()
    try:
        with open(path, "ab") as f:
            start = f.seek(0, os.SEEK_END)
            try:
                f.write(line)
                f.flush()
            except OSError:
                f.truncate(start)
                raise
    except OSError as err:
        raise write_error(path, err) from None
