"""The fedlora config as Flower run config, and the app project `flwr run DIR` runs.

Flower's run config holds only scalars under flat dotted keys, so the fedlora config travels as
`fedlora.<section>.<key>` entries, lists written as TOML array strings ('["sentence"]') and a section
given with all its keys at their defaults as "{}".
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from ..config import Config, build_config, map_paths, toml_value
from ..errors import ConfigError
from ..methods import check_method

PREFIX = "fedlora."
RUN_KEYS = {
    "out": "folder the ServerApp writes rounds.jsonl, summary.json and the adapter into",
    "round-timeout": "seconds the ServerApp waits for a round's replies (a silent client is dropped after it)",
    "node-wait": "seconds the ServerApp waits for federation.num_clients SuperNodes to connect",
    "resume": "continue the run in 'out' from its last checkpoint (fedlora flower run --resume sets it)",
    "secagg-threshold": "0: plain rounds; else Flower's SecAgg+ carries every round's uploads and the server "
                        "learns only their weighted mean; the fraction of a round's clients whose shares "
                        "reconstruct the masks (at least 2 clients; 1 - it is the share that may drop out)",
    "federated-eval": "nodes with evaluation data of their own (node config eval-path, data.client_eval_paths) "
                      "evaluate the global model on it in evaluated rounds and reply with their metrics and "
                      "example counts; false: they are not asked (under DP the replies are not protected)",
}


def _flat(raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        elif isinstance(value, dict):  # a section that is given, with every key at its default
            out[prefix + key] = "{}"
        elif isinstance(value, list):
            out[prefix + key] = toml_value(value)
        else:
            out[prefix + key] = "none" if value is None else value
    return out


def to_run_config(cfg: Config) -> dict[str, Any]:
    """Flat run-config entries for the keys of a fedlora config that differ from their defaults (a None there
    is written "none": data.name's, or privacy.epsilon's where other privacy keys are set without DP)."""
    dumped = cfg.model_dump(exclude_defaults=True)
    if dumped.get("privacy") and not cfg.privacy.enabled:  # privacy keys of a run without DP: say it is off
        dumped["privacy"]["epsilon"] = "none"
    return _flat(dumped, PREFIX)


def from_run_config(run_config: dict[str, Any]) -> Config:
    """The fedlora config carried by a Flower run config (the entries under `fedlora.`)."""
    raw: dict[str, Any] = {}
    for key, value in run_config.items():
        if not key.startswith(PREFIX):
            continue
        if isinstance(value, str) and value[:1] in ("[", "{"):
            try:
                value = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(f"run config '{key}': not a TOML array or table: {value}") from None
        *sections, name = key[len(PREFIX):].split(".")
        table = raw
        for depth, section in enumerate(sections):
            table = table.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"run config '{key}': '{PREFIX}{'.'.join(sections[:depth + 1])}' is a value, "
                                  "not a section")
        if isinstance(table.get(name), dict) and not isinstance(value, dict):
            raise ConfigError(f"run config '{key}': is a section, not a value")
        table[name] = value
    cfg = build_config(raw)
    check_method(cfg)
    return cfg


def absolute_paths(cfg: Config) -> Config:
    """The config with its model and data paths absolute, and data.root set from $FEDLORA_DATA_DIR when the
    config does not give it: the ServerApp runs in the SuperLink's process, the ClientApps in the SuperNodes',
    with other working folders and environments than the shell that writes the app."""
    raw = map_paths(cfg.to_dict(), lambda value: str(Path(value).resolve()))
    root = os.environ.get("FEDLORA_DATA_DIR")
    for data in (raw.get("data"), (raw.get("fedsb") or {}).get("public_data")):
        if data and data.get("name") is not None and not data.get("root") and root:
            data["root"] = str(Path(root).resolve())
    return build_config(raw)


def write_app(folder: str | Path, cfg: Config, out: str | Path, round_timeout: float = 600,
              node_wait: float = 120) -> Path:
    """Write `folder/pyproject.toml`: a Flower app whose ServerApp and ClientApp are fedlora's and whose run
    config carries `cfg`; `flwr run folder` then runs it."""
    import tomli_w

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        # fedlora itself must be installed where the SuperLink and SuperNodes run: Flower skips flwr when it
        # installs an app's dependencies, and fedlora need not be on the index it installs from
        "project": {"name": "fedlora-app", "version": "1.0.0", "description": "fedlora on Flower",
                    "license": "Apache-2.0", "dependencies": ["flwr>=1.41"]},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
                 "flwr": {"app": {
                     "publisher": "fedlora",
                     "components": {"serverapp": "fedlora.flower.server_app:app",
                                    "clientapp": "fedlora.flower.client_app:app"},
                     "config": {"out": str(Path(out).resolve()), "round-timeout": float(round_timeout),
                                "node-wait": float(node_wait), "resume": False, "secagg-threshold": 0.0,
                                "federated-eval": True}
                               | to_run_config(absolute_paths(cfg))}}},
    }
    path = folder / "pyproject.toml"
    path.write_bytes(tomli_w.dumps(project).encode())
    return path
