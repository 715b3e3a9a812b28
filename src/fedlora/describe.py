"""What `fedlora methods` and `fedlora show` print: every registered method as its class declares it, and a
finished run as its folder records it (summary.json and rounds.jsonl)."""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .run_folder import ROUNDS_LOG, read_log, read_summary

FACTORS = {"lora_A": "A", "lora_B": "B", "lora_R": "R", "weight": "the target weights"}


def privacy_spent(privacy: dict | None) -> str:
    """The privacy a run spent, from its summary's privacy section: '; epsilon 2.93 (delta 1e-05, per example,
    the most any client spent)', or '' without DP."""
    if privacy is None:
        return ""
    if privacy.get("unit") == "client":
        return f"; epsilon {privacy['epsilon']:.3g} (delta {privacy['delta']:g}, per client)"
    return f"; epsilon {privacy['epsilon_max']:.3g} (delta {privacy['delta']:g}, per example, the most any client spent)"


def _factors(kinds) -> str:
    return ", ".join([FACTORS.get(k, k) for k in kinds] + ["head"])


def method_line(name: str, method) -> str:
    """One method's line: what a client trains and sends, whether its aggregation is exact, whether it runs under
    client-level DP and SecAgg+ (each checked against the method's default config)."""
    from .config import build_config

    cfg = build_config({"method": {"name": name}})
    exact = ("personalised (each client keeps its own part)" if method.keeps_own_state
             else "not stated" if method.exact is None else "yes" if method.exact else "no")
    if not method.summed:
        client_dp = "no (its server rule is not a sum)"
    elif method.set_up_plan(cfg) is not None:
        client_dp = "yes, with a set-up that reads no client data"
    else:
        client_dp = "yes"
    try:
        method.check_secure(cfg)
        secagg = "yes"
    except ConfigError:
        secagg = "no" if not method.summed else "not with its default settings"
    return (f"{name}: trains {_factors(method.trains)}; sends {_factors(method.uploads)}; exact aggregation: "
            f"{exact}; client-level DP: {client_dp}; SecAgg+: {secagg}")


def method_lines() -> list[str]:
    from .methods import METHODS

    return [method_line(name, method) for name, method in METHODS.items()]


def run_lines(folder: str | Path) -> list[str]:
    """A finished run: its config in brief, rounds, final metrics, privacy spent, bytes and wall time."""
    folder = Path(folder)
    summary = read_summary(folder)
    rows = read_log(folder / ROUNDS_LOG)
    cfg = summary["config"]
    data, fed, train, adapter = cfg["data"], cfg["federation"], cfg["train"], cfg["adapter"]
    source = data.get("name") or data.get("path") or data.get("hub_id") or "data in memory"
    ran = [r for r in rows if r["round"] > 0 and not r.get("failed")]
    final = ", ".join(f"{k} {v:.4f}" for k, v in (summary["final_eval"] or {}).items())
    if summary.get("baselines"):
        final += (f" (chance {summary['baselines']['chance']:.4f}, majority class "
                  f"{summary['baselines']['majority']:.4f})")
    spent = privacy_spent(summary.get("privacy")).removeprefix("; ") or "none"
    seconds = sum(r.get("seconds") or 0 for r in rows)
    return [
        f"{folder}: {summary['method']}, {len(ran)} of {summary['rounds']} rounds logged, model {summary['model_source']}",
        f"config: data {source} ({data['partition']} partition), {fed['num_clients']} clients, "
        f"{fed['clients_per_round']} per round; adapter rank {adapter['rank']}; {train['local_steps']} local steps "
        f"of batch {train['batch_size']} at lr {train['lr']:g}; seed {cfg['seed']}",
        f"final: {final or 'not evaluated'}",
        f"privacy: {spent}",
        f"traffic: {summary['bytes_up_total']:,} bytes up, {summary['bytes_down_total']:,} bytes down",
        f"wall time: {seconds:.1f} s over the logged rounds ({summary['seconds_this_session']:.1f} s in the session "
        "that finished it)",
    ]
