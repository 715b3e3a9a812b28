"""The server's checks of what clients upload, before anything may touch the global state: one path for a
round's updates and for the set-up exchange's gradient sums, whatever runtime carried them.

Always: the keys, shapes and dtypes of the untrained reference, and finite values. Then the size of the
change from the reference (its L2 norm over all tensors), by `server.max_update_norm`:
- "auto" (default): refused when larger than `server.norm_factor` (10) times the median of the round's
  norms, once a round has at least 3 well-formed uploads; and, at any count, when larger than what honest
  local training can reach (`training_bound`: AdamW's bounded steps, or clipped SGD's, times the learning
  rate and the local steps);
- a number: refused when larger than that number (a round's updates; set-up sums get the "auto" rule);
- "off": no size check.
The set-up's gradient sums (`check_gradient_sums`): without DP the relative rule on the norm per example
summed; under DP the bound that clipping and the noise put on an honest sum.
"""
from __future__ import annotations

import math
import statistics

import numpy as np
import torch

# what a peer may name as a tensor's dtype (torch's names); nothing else is looked up
PAYLOAD_DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}

# P(||N(0, I_d)|| > sqrt(d) + t) <= exp(-t^2 / 2): 2e-22 for this t
_GAUSS_T = 10.0


def payload_dtype(name: str) -> torch.dtype:
    """The torch dtype a peer named, from the allow-list; ValueError for any other name."""
    if not isinstance(name, str) or name not in PAYLOAD_DTYPES:
        raise ValueError(f"dtype {str(name)[:40]!r} is not one of {', '.join(PAYLOAD_DTYPES)}")
    return PAYLOAD_DTYPES[name]


def _shape_problem(payload, start: dict[str, torch.Tensor]) -> str | None:
    if not isinstance(payload, dict):
        return f"the update is a {type(payload).__name__}, not a mapping of tensors"
    missing, extra = sorted(start.keys() - payload.keys()), sorted(payload.keys() - start.keys())
    if missing:
        return f"missing tensors {_few(missing)}"
    if extra:
        return f"unexpected tensors {_few([str(k) for k in extra])}"
    for key, ref in start.items():
        value = payload[key]
        if not isinstance(value, torch.Tensor):
            return f"'{key}' is a {type(value).__name__}, not a tensor"
        if value.shape != ref.shape:
            return f"'{key}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"'{key}' has dtype {value.dtype}, expected {ref.dtype}"
        if not torch.isfinite(value).all():
            return f"'{key}' holds NaN or infinite values"
    return None


def distance(payload: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """The L2 norm of payload - start over all tensors (in float64); a reference on the meta device (a
    template of shapes and dtypes) counts as zeros."""
    squared = 0.0
    for key, ref in start.items():
        change = payload[key].double() if ref.is_meta else payload[key].to(ref.device).double() - ref.double()
        squared += change.pow(2).sum().item()
    return math.sqrt(squared)


def upload_problems(payloads: list, references: list[dict[str, torch.Tensor]], *, max_norm: float | None = None,
                    factor: float | None = None, bounds: list[float | None] | None = None,
                    scales: list[float] | None = None, setting: str = "server.max_update_norm") -> list[str | None]:
    """Why each payload cannot be aggregated, or None where it can. references[i] is what uploader i would
    have sent untrained (or zeros for a sum): it fixes the keys, shapes and dtypes, and the change is
    measured from it (from zero for a template on the meta device). max_norm: a fixed bound on the change. bounds[i]: the most honest work can change
    payload i. factor: refuse a change above factor x the median change of the well-formed payloads (at
    least 3 of them), each change first divided by scales[i] (e.g. the examples a sum adds up)."""
    reasons = [_shape_problem(p, ref) for p, ref in zip(payloads, references)]
    norms = [None if why else distance(p, ref) for p, ref, why in zip(payloads, references, reasons)]
    for i, norm in enumerate(norms):
        if norm is None:
            continue
        if max_norm is not None and norm > max_norm:
            reasons[i] = f"update norm {norm:.4g} exceeds {setting} {max_norm:g}"
        elif bounds is not None and bounds[i] is not None and norm > bounds[i]:
            reasons[i] = (f"update norm {norm:.4g} exceeds {bounds[i]:.4g}, the most an honest client can "
                          f"reach with these settings ({setting} = 'auto')")
    scaled = {i: n / (scales[i] if scales else 1.0) for i, n in enumerate(norms) if n is not None}
    if factor is not None and len(scaled) >= 3:
        median = statistics.median(scaled.values())
        for i, n in scaled.items():
            if reasons[i] is None and median > 0 and n > factor * median:
                per = " per example" if scales else ""
                reasons[i] = (f"update norm{per} {n:.4g} exceeds {factor:g} x the round's median {median:.4g} "
                              f"({setting} = 'auto', server.norm_factor)")
    return reasons


def update_problem(payload, start: dict[str, torch.Tensor], max_norm: float | None = None) -> str | None:
    """Why one `payload` cannot be aggregated under a fixed bound (a number; a setting such as "auto" sets
    none here), or None when it can."""
    fixed = float(max_norm) if isinstance(max_norm, (int, float)) else None
    return upload_problems([payload], [start], max_norm=fixed)[0]


def adam_step_bound(betas: tuple[float, float] = (0.9, 0.999), steps: int | None = None) -> float:
    """The most one Adam(W) step (weight decay aside) moves a coordinate, in units of the learning rate,
    whatever the gradients, within the optimizer's first `steps` steps (None: ever). By Cauchy-Schwarz
    |m_t| / sqrt(v_t) <= (1-b1) sqrt(sum_k<t rho^k / (1-b2)), rho = b1^2/b2; times the bias corrections
    sqrt(1-b2^t) / (1-b1^t). Gradients growing as (b2/b1)^k reach it."""
    b1, b2 = betas
    rho = b1 * b1 / b2
    if rho >= 1:
        return math.inf
    t = np.arange(1, min(steps or 10 ** 6, 10 ** 6) + 1, dtype=np.float64)
    f = (1 - b1) / (1 - b1 ** t) * np.sqrt((1 - b2 ** t) / (1 - b2)) * np.sqrt((1 - rho ** t) / (1 - rho))
    ever = (1 - b1) / math.sqrt((1 - b2) * (1 - rho))
    return float(f.max() if steps is not None and steps <= 10 ** 6 else max(f.max(), ever))


def training_bound(cfg, reference: dict[str, torch.Tensor], private: bool) -> float | None:
    """The largest L2 change honest local training (cfg: the Config) can make to an upload that starts at
    `reference`, whatever the data; None where the settings allow no bound (SGD without gradient
    clipping, or with DP noise, or with weight decay). The learning rate is at most train.lr at any step."""
    t = cfg.train
    steps, lr = t.local_steps, t.lr
    size = sum(v.numel() for v in reference.values())
    if t.optimizer == "adamw":
        if lr * t.weight_decay >= 1:
            return None
        start = math.sqrt(sum(v.double().pow(2).sum().item() for v in reference.values()))
        decay = start * (1 - (1 - lr * t.weight_decay) ** steps)  # AdamW's decoupled decay toward 0
        # a client's optimizer restarts every round unless it keeps its state
        per_step = adam_step_bound(steps=None if t.keep_optimizer_state else steps)
        bound = decay + steps * lr * per_step * math.sqrt(size)
    elif t.max_grad_norm is not None and not private and t.weight_decay == 0:
        bound = steps * lr * t.max_grad_norm / (1 - t.momentum)  # the momentum buffer is at most g / (1 - mu)
    else:
        return None
    return bound * 1.01 + 1e-6  # float rounding of the steps themselves


def check_updates(cfg, payloads: list, references: list[dict[str, torch.Tensor]]) -> list[str | None]:
    """A round's uploads under the config's server.max_update_norm; per upload, why it is refused or None."""
    setting = cfg.server.max_update_norm
    if setting == "auto":
        private = cfg.privacy.per_example
        return upload_problems(payloads, references, factor=cfg.server.norm_factor,
                               bounds=[training_bound(cfg, ref, private) for ref in references])
    if setting is None or setting == "off":
        return upload_problems(payloads, references)
    return upload_problems(payloads, references, max_norm=float(setting))


def check_gradient_sums(cfg, sums: list, references: list[dict[str, torch.Tensor]], examples: list[int],
                        noise_multiplier: float | None = None, most_examples: list[int] | None = None
                        ) -> list[str | None]:
    """The set-up exchange's uploads: sums of per-example gradients (references: zeros of their shapes and
    dtypes), client i summing examples[i] examples. Unless server.max_update_norm is "off": without DP a
    sum is refused when its norm per example exceeds server.norm_factor x the median's (3 or more sums);
    under DP (every example clipped to privacy.clip_norm, Gaussian noise of noise_multiplier x clip_norm
    added once, a Poisson draw of at most most_examples[i] examples) when it exceeds what those can sum to:
    most_examples x clip_norm plus the noise's norm bound (exceeded with probability below 1e-21)."""
    if cfg.server.max_update_norm is None or cfg.server.max_update_norm == "off":
        return upload_problems(sums, references)
    if noise_multiplier is None:
        return upload_problems(sums, references, factor=cfg.server.norm_factor, scales=[max(1, n) for n in examples])
    c = cfg.privacy.clip_norm
    bounds = [(n * c + noise_multiplier * c * (math.sqrt(sum(v.numel() for v in ref.values())) + _GAUSS_T)) * 1.01
              for n, ref in zip(most_examples or examples, references)]
    return upload_problems(sums, references, bounds=bounds)


def check_set_up_replies(cfg, request, replies: list, examples: list[int], noise_multiplier: float | None = None,
                         most_examples: list[int] | None = None) -> list[str | None]:
    """The replies to one phase of a set-up exchange (a methods.Request: `request.expected` holds a valid
    reply's keys, shapes and dtypes), client i having used examples[i] set-up examples (at most
    most_examples[i] under DP's Poisson draw). Sign votes must be -1, 0 or 1 and are held to the round's
    median (each counts alike, whatever its examples); replies that sum per-example quantities (gradient
    sums, sketches of them) go through check_gradient_sums."""
    references = [request.expected] * len(replies)
    if request.phase == "signs" or request.signs:
        reasons = _shape_problems(replies, references)
        for i, reply in enumerate(replies):
            if reasons[i] is None and request.phase == "signs":
                bad = next((k for k, v in reply.items() if ((v < -1) | (v > 1)).any()), None)
                if bad is not None:
                    reasons[i] = f"'{bad}' holds votes other than -1, 0 and 1"
        if cfg.server.max_update_norm is None or cfg.server.max_update_norm == "off":
            return reasons
        kept = [i for i, why in enumerate(reasons) if why is None]
        checked = upload_problems([replies[i] for i in kept], [references[i] for i in kept],
                                  factor=cfg.server.norm_factor)
        for i, why in zip(kept, checked):
            reasons[i] = why
        return reasons
    return check_gradient_sums(cfg, replies, references, examples, noise_multiplier, most_examples)


def _shape_problems(payloads: list, references: list[dict[str, torch.Tensor]]) -> list[str | None]:
    return [_shape_problem(p, ref) for p, ref in zip(payloads, references)]


def _few(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(f"'{k}'" for k in keys[:shown]) + more
