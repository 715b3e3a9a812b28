"""Privacy accounting with Opacus' maintained accountants: one per client, composed over every DP-SGD
step the client takes in every round (and the private LoRA-SB initialisation, if any)."""
from __future__ import annotations

import warnings

from ..errors import ConfigError

Segment = tuple[float, int, float | None]  # (sample rate, steps, its own noise multiplier or None)


def _accountant(kind: str):
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError:
        raise ConfigError("privacy needs Opacus' accountants: pip install opacus") from None
    return {"rdp": RDPAccountant, "prv": PRVAccountant}[kind]()


# Beyond this epsilon no bound means anything, and PRV's discretisation grows without bound (it can take
# minutes): "auto" keeps RDP's figure there.
_PRV_LIMIT = 100.0


def epsilon_of(kind: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a history of (noise multiplier, sample rate, steps) for the given delta. "auto": the
    smaller of the RDP and PRV bounds, both valid upper bounds (Opacus' PRV figure is the upper end of its
    error interval), so the smaller one is too."""
    if not history:
        return 0.0
    if kind == "auto":
        rdp = epsilon_of("rdp", history, delta)
        return rdp if rdp > _PRV_LIMIT else min(rdp, epsilon_of("prv", history, delta))
    accountant = _accountant(kind)
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' note that the optimal RDP order is the largest one
        return float(accountant.get_epsilon(delta))


def planned_epsilon(kind: str, noise_multiplier: float, plans: list[list[Segment]], delta: float) -> float:
    """The largest epsilon any client's plan would spend."""
    unique = {tuple(p) for p in plans if p}
    return max((epsilon_of(kind, [(sigma or noise_multiplier, q, n) for q, n, sigma in plan], delta)
                for plan in unique), default=0.0)


def calibrate_noise(kind: str, target_epsilon: float, delta: float, plans: list[list[Segment]],
                    tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to `tolerance` in epsilon) with which no client exceeds the target."""
    lo, hi = 0.0, 1.0
    while planned_epsilon(kind, hi, plans, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError(f"privacy.epsilon {target_epsilon} cannot be met by the planned training")
    for _ in range(60):
        eps = planned_epsilon(kind, hi, plans, delta)
        if eps >= target_epsilon * (1 - tolerance):
            break
        mid = (lo + hi) / 2
        if planned_epsilon(kind, mid, plans, delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


class PrivacyLedger:
    """Each client's accountant history; epsilon spent per client; checkpointable."""

    def __init__(self, kind: str, delta: float, noise_multiplier: float):
        self.kind = kind
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self.history: dict[int, list[tuple[float, float, int]]] = {}
        self._epsilon: dict[int, float] = {}

    def charge(self, client: int, sample_rate: float, steps: int = 1, noise_multiplier: float | None = None) -> None:
        sigma = noise_multiplier or self.noise_multiplier
        history = self.history.setdefault(client, [])
        if history and history[-1][:2] == (sigma, sample_rate):
            history[-1] = (sigma, sample_rate, history[-1][2] + steps)
        else:
            history.append((sigma, sample_rate, steps))
        self._epsilon.pop(client, None)

    def epsilon(self, client: int) -> float:
        if client not in self._epsilon:
            self._epsilon[client] = epsilon_of(self.kind, self.history.get(client, []), self.delta)
        return self._epsilon[client]

    def max_epsilon(self) -> float:
        return max((self.epsilon(c) for c in self.history), default=0.0)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "history": self.history}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PrivacyLedger":
        ledger = cls(state["kind"], state["delta"], state["noise_multiplier"])
        ledger.history = {int(c): [tuple(h) for h in hist] for c, hist in state["history"].items()}
        return ledger
