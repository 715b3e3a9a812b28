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


def _keys(section: type[BaseModel]):
    """(name, default, notes) of a section's plain keys; a default of None means not set."""
    for name, field in section.model_fields.items():
        if _section(field.annotation) is not None:
            continue
        notes = [field.description] if field.description else []
        choices = _choices(field.annotation)
        if choices and len(choices) > 1:
            notes.append("one of " + ", ".join(str(c) for c in choices))
        yield name, field.get_default(call_default_factory=True), notes


def _key_lines(section: type[BaseModel]) -> list[str]:
    lines = []
    for name, default, notes in _keys(section):
        comment = f"  # {'; '.join(notes)}" if notes else ""
        if default is None:
            lines.append(f"# {name} = (not set){comment}")
        else:
            lines.append(f"{name} = {json.dumps(default)}{comment}")
    return lines


def _doc(section: type[BaseModel]) -> list[str]:
    doc = section.__doc__
    if not doc or doc is BaseModel.__doc__ or not doc.strip():
        return []
    return [line.strip() for line in doc.strip().splitlines()]


def _sections():
    """(name, section class) of every table of the config, in the schema's order."""
    for name, field in Config.model_fields.items():
        section = _section(field.annotation)
        if section is not None:
            yield name, section


def _tables(section: type[BaseModel]):
    """(name, field, section class) of the keys of `section` that take a whole table."""
    for sub, field in section.model_fields.items():
        inner = _section(field.annotation)
        if inner is not None:
            yield sub, field, inner


def reference() -> str:
    """The configuration at its defaults, one key a line with its description, as TOML."""
    lines = ["# fedlora configuration: every key at its default. A config file gives only the keys it changes;",
             "# `--set section.key=value` overrides one on the command line.", ""]
    lines += _key_lines(Config)
    for name, section in _sections():
        lines += ["", f"[{name}]"]
        lines += [f"# {line}" for line in _doc(section)]
        lines += _key_lines(section)
        for sub, field, inner in _tables(section):
            lines.append(f"# [{name}.{sub}]: {field.description or ''} (a table of {inner.__name__} keys; "
                         "not set by default)")
    return "\n".join(lines) + "\n"


MARKDOWN_COMMAND = "fedlora config --markdown > docs/configuration.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(section: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, default, notes in _keys(section):
        shown = "not set" if default is None else f"`{json.dumps(default)}`"
        rows.append(f"| `{prefix}{name}` | {shown} | {_cell('; '.join(notes))} |")
    for name, field, inner in _tables(section):
        rows.append(f"| `{prefix}{name}` | not set | {_cell(field.description or '')}; a table of the "
                    f"`[{_table_name(inner)}]` keys |")
    return rows


def markdown() -> str:
    """docs/configuration.md: every key with its default and description, section by section."""
    lines = ["# Configuration", "",
             f"<!-- Generated from the descriptions in src/fedlora/config.py by `{MARKDOWN_COMMAND}`; "
             "edit those, not this page. -->", "",
             "A run is configured by a TOML file with the tables below. Every key has a default: a file gives only "
             "the keys it changes. Unknown keys and impossible values are refused with a message naming the key. "
             "`--set section.key=value` overrides one key on the command line (the value is read as TOML). "
             "A relative path in a config file (`model.path`, `data.root`, `data.path`, `data.eval_path`, the "
             "per-client file lists) is relative to the file's folder; one given with `--set`, to the working "
             "folder. The same keys, at their defaults with their descriptions, as a TOML file to start from:", "",
             "    .venv/bin/fedlora config", "", "## Top level", ""]
    lines += _table(Config, "")
    for name, section in _sections():
        lines += ["", f"## [{name}]", ""]
        doc = _doc(section)
        if doc:
            lines += [" ".join(doc), ""]
        lines += _table(section, f"{name}.")
    return "\n".join(lines) + "\n"


def _table_name(section: type[BaseModel]) -> str:
    return next((name for name, kind in _sections() if kind is section), section.__name__)
