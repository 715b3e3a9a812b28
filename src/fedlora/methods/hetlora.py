"""HetLoRA (Cho et al., EMNLP 2024): clients of different ranks, zero-padded sparsity-weighted aggregation,
and rank self-pruning.

Client i holds rank r_i (`adapter.client_ranks`; adapter.rank = r_max, the global rank; all r_max when not
given). A round, per adapted layer:
1. client i receives the first r_i components of the global factors, B[:, :r_i] and A[:r_i];
2. it trains them with the pruning penalty  lambda sum_l ||B_l[:, k:r_i]||_F ||A_l[k:r_i]||_F  added to its
   loss, k = floor(gamma r_i) (lambda: `hetlora.penalty`, gamma: `hetlora.decay`), and sends its r_i
   components;
3. rank self-pruning: when that penalty's norm sum_l ||B_l,tail||_F ||A_l,tail||_F of what the client sends
   is below the same of what it received, the client's rank becomes k: its last r_i - k components are
   dropped from this round's aggregation and it trains, sends and receives k components from then on;
4. sparsity-weighted aggregation: with every client's factors zero-padded to r_max and dW_i = B_i A_i,
       p_i = ||dW_i||_F / sum_j ||dW_j||_F,   B = sum_i p_i B_i,   A = sum_i p_i A_i
   (the paper's weights: the updates' norms, not the clients' example counts). The head is averaged with
   the federation's weights.
Not exact: `agg_error` is the distance of s B A from the example-weighted sum_i w_i s B_i A_i of the factors
the clients trained.

Choices the paper leaves open, or simplifications, named:
- one rank per client, for all its layers together (the pruning test sums over the layers);
- the pruning test is made by the server on the uploaded factors against the ones the client started the
  round from (the same numbers the client holds, so no rank needs to be sent): the client's rank shrinks
  from the next round on, and the round it prunes in it still sends the dropped tail (counted in bytes_up);
- the penalty's gradient is added to the loss's after clipping (under DP, after the noise: it reads no data,
  so it costs no privacy); where its norm is zero, its gradient is taken as zero;
- a layer whose dW_i are all zero is averaged with the federation's weights.
"""
import math

import torch

from .base import Aggregate, Method, weighted_sum


class HetLoRA(Method):
    name = "hetlora"
    settings = ("hetlora",)
    exact = False
    summed = False
    heterogeneous_ranks = True
    trains = uploads = downloads = ("lora_A", "lora_B")

    def __init__(self, adapted, cfg, client_sizes):
        super().__init__(adapted, cfg, client_sizes)
        self.ranks = self.ranks or [adapted.rank] * len(client_sizes)  # pruning changes them

    def kept_rank(self, r: int) -> int:
        """k = floor(gamma r): the components a client of rank r keeps when it prunes (r: it never does)."""
        decay = self.cfg.hetlora.decay
        return r if decay == 1 or r == 1 else max(1, min(r - 1, math.floor(decay * r)))

    def tail_norm(self, state, k: int, r: int) -> torch.Tensor:
        """sum_l ||B_l[:, k:r]||_F ||A_l[k:r]||_F: the pruning penalty over lambda."""
        return sum(torch.linalg.norm(state[f"{layer}.lora_B"][:, k:r]) *
                   torch.linalg.norm(state[f"{layer}.lora_A"][k:r]) for layer in self.adapted.layers)

    def gradient_step(self, client, params):
        mask = super().gradient_step(client, params)
        r = self.rank_of(client)
        k, lam = self.kept_rank(r), self.cfg.hetlora.penalty
        if k == r or lam == 0:
            return mask
        pairs = [(params[f"{layer}.lora_B"], params[f"{layer}.lora_A"]) for layer in self.adapted.layers]

        def step():
            with torch.no_grad():  # d/dB_t lambda ||B_t|| ||A_t|| = lambda ||A_t|| B_t / ||B_t||, and alike for A_t
                for B, A in pairs:
                    B_t, A_t = B[:, k:r], A[k:r]
                    norm_B, norm_A = torch.linalg.norm(B_t), torch.linalg.norm(A_t)
                    if B.grad is not None and norm_B > 0:
                        B.grad[:, k:r] += lam * norm_A / norm_B * B_t
                    if A.grad is not None and norm_A > 0:
                        A.grad[k:r] += lam * norm_B / norm_A * A_t
            if mask is not None:
                mask()
        return step

    def aggregate(self, payloads, weights, clients, round_):
        payloads = [self.pad(p) for p in payloads]
        first = next(iter(self.adapted.layers))
        for i, c in enumerate(clients):
            r = self.rank_of(c)
            k = self.kept_rank(r)
            if k == r or payloads[i][f"{first}.lora_A"].is_meta:  # meta: `fedlora comm` counts, nothing prunes
                continue
            if self.tail_norm(payloads[i], k, r) < self.tail_norm(self.client_state(c, round_), k, r):
                self.ranks[c] = k
                payloads[i] = self.pad(self.cut(payloads[i], c))
        fallback = torch.tensor(weights, dtype=torch.float64)
        for layer in self.adapted.layers:
            B_key, A_key = f"{layer}.lora_B", f"{layer}.lora_A"
            norms = torch.stack([torch.linalg.norm(p[B_key].double() @ p[A_key].double()) for p in payloads])
            total = norms.sum()
            p = torch.where(total > 0, norms / total, fallback.to(norms.device))
            for key in (B_key, A_key):
                self.global_state[key] = sum(p_i.to(q[key].dtype) * q[key] for p_i, q in zip(p, payloads))
        for key in self.adapted.head_params:
            self.global_state[key] = weighted_sum(payloads, weights, key)
        return Aggregate()

    def take_download(self, client, download):
        self.ranks[client] = download[f"{next(iter(self.adapted.layers))}.lora_A"].shape[0]
        super().take_download(client, download)

    def state_dict(self):  # tensors only: a Flower node keeps it as an ArrayRecord
        return {"global": self.global_state, "ranks": torch.tensor(self.ranks)}

    def load_state_dict(self, state):
        self.global_state, self.ranks = state["global"], [int(r) for r in state["ranks"]]
