"""FlexLoRA (Bai et al., NeurIPS 2024): the server sums the clients' full-size updates and hands each client
the SVD truncation of the sum at the client's own rank.

Client i (rank r_i, `adapter.client_ranks`; adapter.rank r for all when not given) trains A_i (r_i x d_in)
and B_i (d_out x r_i) from the factors it received and sends them. Per layer the server forms
    DW = sum_i w_i B_i A_i                  (d_out x d_in; w_i the federation's weights)
and its SVD DW = U S V^T (in float64), and keeps the rank-r truncation (r = adapter.rank)
    B = U[:, :r] diag(S[:r]),   A = V[:, :r]^T
so all of S goes to B and A has orthonormal rows, as in the paper's code. Client i receives the first r_i
components, B[:, :r_i] and A[:r_i]: the best rank-r_i approximation of DW (truncations of one SVD nest).
The LoRA scaling s = alpha / adapter.rank is one number for every client whatever its rank (a client of
rank r_i is the rank-r model with its components beyond r_i zero), so the server factorises the sum of
the products and s multiplies every side alike: s B A is the rank-r truncation of sum_i w_i s B_i A_i.
Exact only when DW has rank <= r; `agg_error` is the truncation's share
sum_l ||DW_l - B_l A_l||_F / sum_l ||DW_l||_F. The head is averaged with the same weights.
"""
import torch

from .base import Aggregate, Method, weighted_sum


class FlexLoRA(Method):
    name = "flexlora"
    exact = False
    summed = False
    heterogeneous_ranks = True
    trains = uploads = downloads = ("lora_A", "lora_B")

    def aggregate(self, payloads, weights, clients, round_):
        payloads = [self.pad(p) for p in payloads]
        r = self.adapted.rank
        for layer in self.adapted.layers:
            B_key, A_key = f"{layer}.lora_B", f"{layer}.lora_A"
            dense = sum(w * (p[B_key].double() @ p[A_key].double()) for p, w in zip(payloads, weights))
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
            dtype = payloads[0][B_key].dtype
            self.global_state[B_key] = (U[:, :r] * S[:r]).to(dtype)
            self.global_state[A_key] = Vh[:r].to(dtype)
        for key in self.adapted.head_params:
            self.global_state[key] = weighted_sum(payloads, weights, key)
        return Aggregate()
