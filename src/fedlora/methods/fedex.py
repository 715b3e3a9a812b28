"""FedEx-LoRA: FedIT's averages plus the exact residual folded into W0 on every client.

residual = s (sum w_i B_i A_i - B A), with the adapter's own scaling s, added to W0 in the weight's own
layout (LowRankLayer.add_to_base transposes for GPT-2's Conv1D). The dense residual of every layer is
broadcast to every client after each round.
"""
from ..adapters import low_rank_delta
from .base import Aggregate, Method, weighted_sum


class FedExLoRA(Method):
    name = "fedex"
    exact = True
    summed = False
    trains = uploads = downloads = ("lora_A", "lora_B")
    changes_base = True

    def aggregate(self, payloads, weights, clients, round_):
        s = self.adapted.scaling
        residual = {}
        for layer in self.adapted.layers:
            exact = sum(w * low_rank_delta(p, layer, s) for p, w in zip(payloads, weights))
            B = weighted_sum(payloads, weights, f"{layer}.lora_B")
            A = weighted_sum(payloads, weights, f"{layer}.lora_A")
            residual[layer] = exact - s * (B @ A)
        super().aggregate(payloads, weights, clients, round_)
        self.adapted.add_to_base(residual)
        return Aggregate(base_change=residual,
                         broadcast={f"{layer}.residual": r for layer, r in residual.items()})

    def receive(self, broadcast):
        residual = {layer: broadcast[f"{layer}.residual"] for layer in self.adapted.layers}
        self.adapted.add_to_base(residual)
        return residual
