"""FedSVD (Lee et al., NeurIPS 2025): FFA-LoRA's training of B alone, with A re-learnt by the server's SVD.

A client trains only B (and the head) from the current global A and B, and sends B. The server averages B,
which is exact since every client holds the same A: (sum w_i B_i) A = sum w_i B_i A. It then re-factorises
that product, of rank at most r: B A = U S V^T, A <- V_r^T (r orthonormal rows: the leading right singular
vectors), B <- U_r S_r (the singular values go into B). B A, and so the update s B A with the adapter's own
scaling s, is unchanged; the rank stays r. Both factors change, so a sampled client downloads A, B and the
head; nothing is broadcast to the others. Round 1 starts from PEFT's LoRA init (A random from the run's seed,
B = 0), as FFA-LoRA.

As the authors' code (re-factorisation period 1, no warm-up: its defaults), every round is re-factorised;
the optional longer period and warm-up are not offered. The SVD is taken without forming the d_out x d_in
product: with B = Q_B R_B and A^T = Q_A R_A (reduced QR), B A = Q_B (R_B R_A^T) Q_A^T, and the SVD of the
r x r middle, U' S V'^T, gives U_r = Q_B U', V_r = Q_A V' (in float64, stored in the state's dtype).
"""
import torch

from .base import Aggregate, Method


def refactorise(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_r^T) of the SVD U S V^T of B A (B: d_out x r, A: r x d_in)."""
    Q_B, R_B = torch.linalg.qr(B.double())
    Q_A, R_A = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)
    return (Q_B @ (U * S)).to(B.dtype), (Vh @ Q_A.T).to(A.dtype)


class FedSVD(Method):
    name = "fedsvd"
    exact = True
    trains = uploads = ("lora_B",)
    downloads = ("lora_A", "lora_B")
    carries_optimizer_state = False  # B is expressed in a new basis after every round

    def aggregate(self, payloads, weights, clients, round_):
        super().aggregate(payloads, weights, clients, round_)  # B and the head
        for layer in self.adapted.layers:
            B, A = f"{layer}.lora_B", f"{layer}.lora_A"
            self.global_state[B], self.global_state[A] = refactorise(self.global_state[B], self.global_state[A])
        return Aggregate()
