"""FedSA-LoRA: A is shared and averaged; every client keeps its own B (a personalised adapter).

The server never sees a B. For evaluation and export the simulator shows a global view: the averaged A
with the example-weighted mean of the clients' own B (clients that never trained hold B = 0).
"""
from .base import Method, weighted_sum


class FedSALoRA(Method):
    name = "fedsa"
    trains = ("lora_A", "lora_B")
    uploads = downloads = ("lora_A",)
    keeps_own_state = True

    def __init__(self, adapted, cfg, client_sizes):
        super().__init__(adapted, cfg, client_sizes)
        self.own_B: dict[int, dict] = {}

    def client_state(self, client, round_):
        return self.global_state | self.own_B.get(client, {})

    def upload(self, client, trained, round_):
        self.own_B[client] = {k: trained[k] for k in self.adapted.keys_of(("lora_B",), head=False)}
        return super().upload(client, trained, round_)

    def eval_state(self):
        if not self.own_B:
            return self.global_state
        clients = sorted(self.own_B)
        sizes = [self.client_sizes[c] for c in clients]
        total = sum(sizes)
        B = [self.own_B[c] for c in clients]
        return self.global_state | {k: weighted_sum(B, [n / total for n in sizes], k) for k in B[0]}

    def own_state(self, client):
        return self.own_B.get(client, {})

    def load_own_state(self, client, state):
        if state:
            self.own_B[client] = state

    def state_dict(self):
        return {"global": self.global_state, "own_B": self.own_B}

    def load_state_dict(self, state):
        self.global_state, self.own_B = state["global"], state.get("own_B", {})
