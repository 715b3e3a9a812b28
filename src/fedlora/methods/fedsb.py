"""Fed-SB: LoRA-SB adapters W0 + B R A with B and A fixed from the clients' first-step gradient; only the
r x r matrix R is trained and sent, so averaging is exact: B (sum w_i R_i) A.

Initialisation, as one extra exchange before round 1: each client sums dL/dW0 over its share of
`fedsb.init_examples` and uploads it (under DP: clipped per example, noised, charged to its budget);
the server adds the sums, takes -eta * sign, the rank-r SVD, and broadcasts B and A once to every
client (both counted). R starts at the singular values S_r. With `fedsb.init_data = "public"` the
server takes the gradient on a public data set instead and no client uploads anything.
"""
from ..init_sb import lora_sb_factors
from ..seeding import derive_seed
from .base import Exchange, Method


class FedSB(Method):
    name = "fedsb"
    parameterisation = "lorasb"
    trains = uploads = downloads = ("lora_R",)

    def initialise(self, ctx):
        head = self.seed_state(ctx.generator)
        self.adapted.load_state(head)  # the gradient is taken through the head every client starts from
        if self.init_reads_client_data():
            uploads = sums = [ctx.gradient_sum(c) for c in ctx.clients]
        else:
            uploads, sums = [], [ctx.public_gradient_sum()]
        eta = self.cfg.fedsb.init_lr or self.cfg.train.lr
        state, broadcast = {}, {}
        for i, layer in enumerate(self.adapted.layers):
            total = sum(g[layer] for g in sums)
            B, R, A = lora_sb_factors(total, self.adapted.rank, eta, self.cfg.fedsb.svd_niter,
                                      derive_seed(self.cfg.seed, "svd", i))
            state |= {f"{layer}.lora_B": B, f"{layer}.lora_R": R, f"{layer}.lora_A": A}
            broadcast |= {f"{layer}.lora_B": B, f"{layer}.lora_A": A}
        self.global_state = state | head
        return Exchange(uploads=[{f"{k}.grad_sum": v for k, v in u.items()} for u in uploads],
                        broadcast=broadcast, clients=list(ctx.clients) if uploads else [])

    def seed_state(self, generator):
        return self.adapted.head_init(generator)  # B, R, A come from the clients' gradients

    def init_reads_client_data(self):
        return self.cfg.fedsb.init_data == "clients"

    def init_traffic(self):
        layers = self.adapted.layers.values()
        return (sum(layer.d_out * layer.d_in for layer in layers) if self.init_reads_client_data() else 0,
                sum(layer.rank * (layer.d_out + layer.d_in) for layer in layers))
