"""FedIT: FedAvg of both LoRA factors. Inexact: sum w_i B_i A_i != (sum w_i B_i)(sum w_i A_i)."""
from .base import Method


class FedIT(Method):
    name = "fedit"
    trains = uploads = downloads = ("lora_A", "lora_B")
