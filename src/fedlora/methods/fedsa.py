"""FedSA-LoRA: A is shared and averaged; every client keeps its own B (a personalised adapter).

The server never sees a B: its global model, evaluated and exported, is the averaged A and head with B as
initialised (zero), the same in every runtime. Each client's own B is kept by the runtime that runs the
client (the simulator's trainer, a Flower node's state) and handed back when the client trains again.
"""
from .base import Method


class FedSALoRA(Method):
    name = "fedsa"
    exact = False
    trains = ("lora_A", "lora_B")
    uploads = downloads = ("lora_A",)
    keeps_own_state = True

    def own_part(self, trained):
        return {k: trained[k] for k in self.adapted.keys_of(("lora_B",), head=False)}
