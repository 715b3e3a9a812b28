"""RoLoRA (Chen et al., NeurIPS 2025): alternating rounds, each training and averaging one LoRA factor.

Odd rounds (1, 3, ...): a client trains B (and the head) with A frozen and sends B; the server averages B.
Even rounds: a client trains A (and the head) with B frozen and sends A; the server averages A.
Every client holds the same frozen factor, so each round's average is exact:
(sum w_i B_i) A = sum w_i B_i A, and B (sum w_i A_i) = sum w_i B A_i.
Round 1 starts from PEFT's LoRA init (A random from the run's seed, B = 0), so B moves first (with B = 0 the
gradient of A is zero). A sampled client downloads A, B and the head every round, since it may have missed
the rounds in which either changed (the paper, with every client in every round, sends only the averaged
factor back). The factor of a round is set by its number alone, so a resumed run keeps the alternation.
"""
from .base import Method


class RoLoRA(Method):
    name = "rolora"
    exact = True
    trains = uploads = downloads = ("lora_A", "lora_B")  # over two rounds; trains_in says which
    carries_optimizer_state = False  # a kept state would belong to the other factor

    def trains_in(self, round_):
        return ("lora_B",) if round_ % 2 == 1 else ("lora_A",)

    def uploads_in(self, round_):
        return self.trains_in(round_)
