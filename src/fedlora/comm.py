"""Communication accounting: bytes of the tensors that cross the network."""
from __future__ import annotations

from pathlib import Path

import torch


def payload_bytes(payload: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensor data in a payload (safetensors adds only a small JSON header to this); a peer's
    entries that are no tensors count nothing (the checks refuse them)."""
    return sum(t.numel() * t.element_size() for t in payload.values() if isinstance(t, torch.Tensor))


def payload_params(payload: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in payload.values())


def round_traffic(method, num_clients: int, round_: int, client: int = 0) -> dict[str, int]:
    """Parameters client `client` sends and receives in round `round_`, found by running the method's own
    download, upload and aggregation on tensors of the real shapes (meta tensors work: nothing is computed)."""
    adapted = method.adapted
    method.global_state = adapted.state()
    payloads = [method.upload(c, adapted.state(), round_) for c in range(num_clients)]
    down = payload_params(method.download(client))
    weights = [1.0 / num_clients] * num_clients
    broadcast = method.aggregate(payloads, weights, list(range(num_clients)), round_).broadcast
    return {"params_up": payload_params(payloads[client]), "params_down": down + payload_params(broadcast)}



def communication_report(model: str, method: str, rank: int, clients: int = 1, dtype: str = "float32",
                         target_modules: list[str] | None = None, settings=None) -> dict:
    """Per-client traffic of a method on a model's real shapes, the model built on the meta device.
    `settings` (a fedlora Config) sets method options that change the traffic, e.g. fedsb.init_data."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .adapters import AdaptedModel
    from .config import Config
    from .errors import ConfigError
    from .methods import METHODS
    from .models import PRESETS, default_target_modules, head_modules, meta_config

    if method not in METHODS:
        raise ConfigError(f"--method: unknown method '{method}' (known: {', '.join(METHODS)})")
    method_cls = METHODS[method]
    settings = settings or Config()
    method_cls.check_config(settings)
    if clients < 1 or rank < 1:
        raise ConfigError("--clients and --rank must be positive")
    if model in PRESETS:
        config, task = meta_config(model), PRESETS[model].task
    elif Path(model).is_dir():
        config = AutoConfig.from_pretrained(model)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        task = "causal-lm" if causal else "classification"
    else:
        raise ConfigError(f"--model: '{model}' is neither a preset ({', '.join(PRESETS)}) nor a local folder")
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        net = auto.from_config(config)
    adapted = AdaptedModel(net, parameterisation=method_cls.parameterisation, rank=rank, scaling=1.0,
                           target_modules=target_modules or default_target_modules(config.model_type),
                           head_modules=head_modules(net) if task == "classification" else [])
    m = method_cls(adapted, settings, [1] * clients)
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()

    def with_bytes(up: int, down: int) -> dict:
        return {"params_up": up, "params_down": down, "bytes_up": up * itemsize, "bytes_down": down * itemsize}

    def sized(payload: dict) -> int:  # floats at --dtype, anything else (sign votes) as it is
        return sum(t.numel() * (itemsize if t.is_floating_point() else t.element_size()) for t in payload.values())

    init_up, init_down = m.init_traffic()
    per_round, even = round_traffic(m, clients, 1), round_traffic(m, clients, 2)
    report = {"model": model, "method": method, "rank": rank, "clients": clients, "dtype": dtype,
              "layers": len(adapted.layer_names),
              "head_params": sum(p.numel() for p in adapted.head_params.values()),
              "round": with_bytes(per_round["params_up"], per_round["params_down"]),
              "init": {"params_up": payload_params(init_up), "params_down": payload_params(init_down),
                       "bytes_up": sized(init_up), "bytes_down": sized(init_down)}}
    if even != per_round:  # RoLoRA: odd and even rounds send different factors
        report["even_rounds"] = with_bytes(even["params_up"], even["params_down"])
    if m.cfg.adapter.client_ranks is not None:  # a round of all the clients, per client by its rank
        if max(m.ranks) > rank:
            raise ConfigError(f"adapter.client_ranks: rank {max(m.ranks)} is above --rank {rank}")
        report["by_rank"] = {}
        for r in sorted(set(m.ranks)):
            traffic = round_traffic(m, len(m.ranks), 1, m.ranks.index(r))
            report["by_rank"][str(r)] = with_bytes(traffic["params_up"], traffic["params_down"])
    return report
