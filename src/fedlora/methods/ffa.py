"""FFA-LoRA: A frozen at its random init (one seed, a different A per layer), only B trained and sent.

Aggregation is exact: (sum w_i B_i) A = sum w_i B_i A. A is derived from the run's seed on every
client and on the server, so it never travels. With adapter.client_ranks client i trains and sends the
first r_i columns of B; the zero-padded average stays exact: (sum w_i [B_i 0]) A = sum w_i B_i A[:r_i].
"""
from .base import Method


class FFALoRA(Method):
    name = "ffa"
    exact = True
    trains = uploads = downloads = ("lora_B",)
    heterogeneous_ranks = True
