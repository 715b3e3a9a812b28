"""What a run shows while it works: tqdm bars on a terminal; in a non-interactive output (a log file, a
pipe) no redrawn bars but one plain line per step that takes long (a client's set-up reply, an
evaluation, a round)."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


def bar(iterable, enabled: bool, **kwargs):
    """tqdm's bar over `iterable` on a terminal when `enabled`; elsewhere the plain iterable."""
    return tqdm(iterable, disable=not (enabled and interactive()), **kwargs)


def line(message: str, enabled: bool = True) -> None:
    """One progress line on standard error (above any bar on a terminal)."""
    if enabled:
        tqdm.write(message, file=sys.stderr)


def plain_line(message: str, enabled: bool) -> None:
    """A line that stands in for a bar: only where bars are not drawn."""
    line(message, enabled and not interactive())


def round_line(record: dict, rounds: int) -> str:
    """A round's log record as one line: "round 3/20: 2 clients, accuracy 0.7012, loss 0.5500, ..."."""
    r = record["round"]
    parts = [f"{len(record['clients'])} clients"]
    if record.get("dropped"):
        parts.append(f"{len(record['dropped'])} dropped")
    parts += [f"{k} {v:.4f}" for k, v in (record.get("eval") or {}).items() if "/" not in k]
    clients = record.get("client_eval") or {}
    if clients.get("clients"):  # federated evaluation: the clients' example-weighted mean
        mean = clients["mean"]
        parts.append(f"clients' {', '.join(f'{k} {v:.4f}' for k, v in mean.items() if k != 'examples' and '/' not in k)}"
                     f" ({len(clients['clients'])} clients, {mean['examples']:,} examples)")
    if clients.get("failed"):
        parts.append(f"{len(clients['failed'])} failed to evaluate")
    parts.append(f"{record['bytes_up']:,} bytes up")
    if record.get("epsilon") is not None:
        parts.append(f"epsilon {record['epsilon']:.3f}")
    if record.get("withheld"):  # distributed DP: too few noise shares in the sum
        parts.append(f"withheld: {record['withheld']}")
    elif "update_norm" in record:  # client-level DP: the bound S and the noise against the signal
        ratio = record["noise_norm"] / max(record["update_norm"], 1e-12)
        parts.append(f"clip {record['client_clip']:.3g}, noise/update {ratio:.2f}")
    elif record.get("client_clip") is not None:  # distributed DP: the sum's noise is nobody's to measure
        parts.append(f"clip {record['client_clip']:.3g}, planned noise norm {record['noise_norm']:.3g}")
    if record.get("delta_to_base"):  # a set-up that moves the weights: its largest step against the base weight
        layer, ratio = max(record["delta_to_base"].items(), key=lambda item: item[1])
        parts.append(f"||initial delta||/||W0|| up to {ratio:.2g} ({layer})")
    parts.append(f"{record['seconds']:.1f} s")
    return f"round {r}/{rounds}{' (set-up)' if r == 0 else ''}: {', '.join(parts)}"


def client_eval_lines(client_eval: dict | None) -> list[str]:
    """Federated evaluation as lines: each client's metrics and examples, then their example-weighted mean and
    the clients that could not evaluate."""
    if not client_eval:
        return []

    def shown(metrics: dict) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples" and "/" not in k) \
            + f" ({metrics['examples']:,} examples)"
    lines = [f"client {c}: {shown(m)}" for c, m in client_eval["clients"].items()]
    if client_eval["clients"]:
        lines.append(f"clients' mean, weighted by examples: {shown(client_eval['mean'])}")
    lines += [f"client {c}: not evaluated: {why}" for c, why in client_eval["failed"].items()]
    return lines
