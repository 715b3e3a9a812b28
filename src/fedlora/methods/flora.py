"""FLoRA: stack the clients' factors, merge s B_s A_s = s sum w_i B_i A_i into W0, restart from a fresh LoRA.

B_s = [w_1 B_1 ... w_n B_n] (d_out x n r), A_s = [A_1; ...; A_n] (n r x d_in). The stacked factors are
broadcast to every client, which merges them into its W0. Each client starts every round with a fresh
LoRA (A random from the client's and round's seed, B = 0), so only the head is downloaded.
With adapter.client_ranks client i's fresh LoRA has rank r_i and it sends r_i components: B_s is
d_out x sum r_i, and the merge stays exact.
"""
import torch

from ..seeding import generator
from .base import Aggregate, Method


class FLoRA(Method):
    name = "flora"
    exact = True
    summed = False
    heterogeneous_ranks = True  # stacking takes factors of any rank: B_s is d_out x sum r_i
    trains = uploads = ("lora_A", "lora_B")
    downloads = ()
    changes_base = True

    def client_state(self, client, round_, own=None):
        fresh = self.adapted.lora_init(generator(self.cfg.seed, "fresh_lora", round_, client))
        return self.at_rank(self.global_state | fresh, client)

    def aggregate(self, payloads, weights, clients, round_):
        broadcast = {}
        for layer in self.adapted.layers:
            B_s = torch.cat([w * p[f"{layer}.lora_B"] for p, w in zip(payloads, weights)], dim=1)
            A_s = torch.cat([p[f"{layer}.lora_A"] for p in payloads], dim=0)
            broadcast[f"{layer}.stacked_B"], broadcast[f"{layer}.stacked_A"] = B_s, A_s
        for key in self.adapted.head_params:
            self.global_state[key] = sum(w * p[key] for p, w in zip(payloads, weights))
        return Aggregate(base_change=self._merge(broadcast), broadcast=broadcast)

    def receive(self, broadcast):
        return self._merge(broadcast)

    def _merge(self, stacked):
        """Merge s B_s A_s of every layer into W0 and zero the global B: all of the update is in W0 now."""
        s = self.adapted.scaling
        merged = {layer: s * (stacked[f"{layer}.stacked_B"] @ stacked[f"{layer}.stacked_A"])
                  for layer in self.adapted.layers}
        for key in self.adapted.keys_of(("lora_B",), head=False):
            self.global_state[key] = torch.zeros_like(self.global_state[key])
        self.adapted.add_to_base(merged)
        return merged
