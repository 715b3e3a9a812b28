"""FFA-LoRA: A frozen at its random init (one seed, a different A per layer), only B trained and sent.

Aggregation is exact: (sum w_i B_i) A = sum w_i B_i A. A is derived from the run's seed on every
client and on the server, so it never travels.
"""
from .base import Method


class FFALoRA(Method):
    name = "ffa"
    trains = uploads = downloads = ("lora_B",)
