"""Every configuration key with its default and description, read from the schema itself (`fedlora config`).
The text is a valid TOML config that sets every key to its default; keys without a default are comments."""
from __future__ import annotations

import json
import typing
from typing import Any, Literal

from pydantic import BaseModel

from .config import Config


def _choices(annotation: Any) -> list[Any]:
    """The values a Literal in the annotation allows (through unions and Annotated)."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [c for arg in typing.get_args(annotation) for c in _choices(arg)]


def _section(annotation: Any) -> type[BaseModel] | None:
    for kind in (annotation, *typing.get_args(annotation)):
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            return kind
    return None


def _key_lines(section: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in section.model_fields.items():
        if _section(field.annotation) is not None:
            continue
        notes = [field.description] if field.description else []
        choices = _choices(field.annotation)
        if choices and len(choices) > 1:
            notes.append("one of " + ", ".join(str(c) for c in choices))
        comment = f"  # {'; '.join(notes)}" if notes else ""
        default = field.get_default(call_default_factory=True)
        if default is None:
            lines.append(f"# {name} = (not set){comment}")
        else:
            lines.append(f"{name} = {json.dumps(default)}{comment}")
    return lines


def reference() -> str:
    """The configuration at its defaults, one key a line with its description, as TOML."""
    lines = ["# fedlora configuration: every key at its default. A config file gives only the keys it changes;",
             "# `--set section.key=value` overrides one on the command line.", ""]
    lines += _key_lines(Config, "")
    for name, field in Config.model_fields.items():
        section = _section(field.annotation)
        if section is None:
            continue
        lines += ["", f"[{name}]"]
        if section.__doc__ and section.__doc__ is not BaseModel.__doc__ and section.__doc__.strip():
            lines += [f"# {line.strip()}" for line in section.__doc__.strip().splitlines()]
        lines += _key_lines(section, name)
        for sub, subfield in section.model_fields.items():
            inner = _section(subfield.annotation)
            if inner is not None:
                lines.append(f"# [{name}.{sub}]: {subfield.description or ''} (a table of {inner.__name__} keys; "
                             "not set by default)")
    return "\n".join(lines) + "\n"
