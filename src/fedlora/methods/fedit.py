"""FedIT: FedAvg of both LoRA factors. Inexact: sum w_i B_i A_i != (sum w_i B_i)(sum w_i A_i).

With adapter.client_ranks (HetLoRA's zero-padding with the plain weights): client i trains and sends the
first r_i components, the server averages the factors zero-padded to adapter.rank (a component beyond r_i
counts client i's zero), and client i receives the first r_i components of the average."""
from .base import Method


class FedIT(Method):
    name = "fedit"
    exact = False
    trains = uploads = downloads = ("lora_A", "lora_B")
    heterogeneous_ranks = True
