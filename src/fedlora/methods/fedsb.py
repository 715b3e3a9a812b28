"""Fed-SB: LoRA-SB adapters W0 + B R A with B and A fixed from the clients' first-step gradient; only the
r x r matrix R is trained and sent, so averaging is exact: B (sum w_i R_i) A.

Initialisation, an exchange of its own before round 1 (round 0), chosen by `fedsb.init`; each client works
on its share of `fedsb.init_examples` and every upload is a sum the server only adds up:
- "sign_sketch" (the default): a federated randomized SVD of M = -(eta / n) sum_i sign(G_i) (G_i: the
  client's sum of dL/dW0; the mean of the n clients' sign votes: LoRA-SB's Adam-step approximation, voted).
  Phase 1: each client sends sign(G_i) Omega (Omega: d_in x k from the run's seed, k = rank +
  fedsb.oversampling); the server takes Q = orth(sum). Phase 2: the server sends Q, each client sends
  Q^T sign(G_i); the server takes the SVD of the sum. k (d_in + d_out) numbers up per layer.
- "sketch": the same on G_i itself, M = -(eta / N) sum_i G_i over the N set-up examples (the SGD first step).
- "signs": each client sends sign(G_i) as int8 votes; M = -eta sign(sum of votes), the majority.
- "dense": each client sends G_i; M = -eta sign(sum_i G_i), LoRA-SB's Adam-step approximation.
Then M ~ U_r S_r V_r^T, B = U_r, R = S_r, A = V_r^T, and the server broadcasts B and A once to every client.
Under DP each reply is clipped per example and noised in the space it is sent in (the sign variants send
the signs of a clipped, noised dense sum); each release is charged to the client's budget. With
`fedsb.init_data = "public"` the server runs the same computation on public data and no client sends anything.
"""
import torch

from ..errors import ConfigError, RoundFailed
from ..init_sb import factors_from_projection, lora_sb_factors, orthonormal_basis, sketch_columns
from ..seeding import derive_seed
from .base import Exchange, Method, Request, SetUpPlan


def set_up_step(cfg) -> float:
    """eta, the learning rate of the approximate first step the set-up factorises: fedsb.init_lr, else the
    reference's rule. LoRA-SB's train_glue.py (and Fed-SB's fed/CR/train_cr_fed.py) divide lr by the warmup
    steps, Fed-SB's DP/SNLI/fed_trainer.py (no warmup) by the total steps, both counted over the whole
    training set, which in a federation is every client's steps: lr / (clients_per_round x warmup_steps), or
    lr / (clients_per_round x rounds x local_steps). A small first step, as LoRA's B A = 0 is."""
    if cfg.fedsb.init_lr is not None:
        return cfg.fedsb.init_lr
    steps = cfg.train.warmup_steps or cfg.federation.rounds * cfg.train.local_steps
    return cfg.train.lr / (cfg.federation.clients_per_round * steps)


class FedSB(Method):
    name = "fedsb"
    settings = ("fedsb",)
    exact = True
    parameterisation = "lorasb"
    trains = uploads = downloads = ("lora_R",)

    @classmethod
    def check_secure(cls, cfg):
        super().check_secure(cfg)
        if cfg.fedsb.init_data == "clients" and cfg.fedsb.init in ("dense", "sketch"):
            raise ConfigError(f"secagg: fedsb.init = '{cfg.fedsb.init}' sends the clients' gradient sums, which no "
                              "clipping range of SecAgg+ bounds; use 'sign_sketch' (the default) or 'signs', whose "
                              "sums it carries, or fedsb.init_data = 'public'")

    def initialise(self, ctx):
        head = self.seed_state(ctx.generator)
        self.adapted.load_state(head)  # the gradient is taken through the head every client starts from
        if self.init_reads_client_data():
            ask_sum, clients = ctx.ask_sum, list(ctx.clients)
        else:
            def ask_sum(request, _):
                return {k: v.float() for k, v in ctx.ask_public(request).items()}, [-1]
            clients = [-1]
        variant = self.cfg.fedsb.init
        if variant in ("sketch", "sign_sketch"):
            factors, answered = self._sketched(ask_sum, clients, signs=variant == "sign_sketch")
        else:
            factors, answered = self._summed(ask_sum, clients, variant)
        state, broadcast = {}, {}
        for layer, (B, R, A) in factors.items():
            state |= {f"{layer}.lora_B": B, f"{layer}.lora_R": R, f"{layer}.lora_A": A}
            broadcast |= {f"{layer}.lora_B": B, f"{layer}.lora_A": A}
        self.global_state = state | head
        return Exchange(broadcast=broadcast, clients=sorted(answered) if self.init_reads_client_data() else [],
                        delta_to_base=self.adapted.delta_to_base(state))

    def _summed(self, ask_sum, clients, variant):
        """dense / signs: one phase; the server adds the uploads and takes the SVD of -eta sign(sum)."""
        key = "grad_sum" if variant == "dense" else "signs"
        total, answered = self._sum(ask_sum, self._request("gradient-sum" if variant == "dense" else "signs"),
                                    clients)
        eta = set_up_step(self.cfg)
        factors = {layer: lora_sb_factors(total[f"{layer}.{key}"], self.adapted.rank, eta, self.cfg.fedsb.svd_niter,
                                          derive_seed(self.cfg.seed, "svd", i))
                   for i, layer in enumerate(self.adapted.layers)}
        return factors, answered

    def _sketched(self, ask_sum, clients, signs):
        """sketch / sign_sketch: the randomized SVD in two phases, each reply summed by the server."""
        ranges, answered = self._sum(ask_sum, self._request("range", signs=signs), clients)
        bases = {f"{layer}.basis": orthonormal_basis(ranges[f"{layer}.range"]) for layer in self.adapted.layers}
        # the sign variant sends the signs of the same private release twice; the sketch releases anew
        projections, answered = self._sum(ask_sum, self._request("project", bases, signs=signs,
                                                                 release=0 if signs else 1), answered)
        eta = set_up_step(self.cfg)
        scale = -eta / (len(answered) if signs else self.cfg.fedsb.init_examples)
        factors = {layer: factors_from_projection(bases[f"{layer}.basis"], projections[f"{layer}.projection"],
                                                  self.adapted.rank, scale)
                   for layer in self.adapted.layers}
        return factors, answered

    @staticmethod
    def _sum(ask_sum, request, clients):
        total, answered = ask_sum(request, clients)
        if not answered:
            raise RoundFailed(f"round 0: no client sent a valid reply to Fed-SB's set-up phase '{request.phase}'")
        return total, answered

    def _request(self, phase, arrays=None, signs=False, release=0) -> Request:
        """The request of one phase, with the keys, shapes and dtypes a valid reply has."""
        expected = {}
        k = self.adapted.rank + self.cfg.fedsb.oversampling
        for name, layer in self.adapted.layers.items():
            k_layer = sketch_columns(k, layer)
            shape, dtype, key = {
                "gradient-sum": ((layer.d_out, layer.d_in), torch.float32, "grad_sum"),
                "signs": ((layer.d_out, layer.d_in), torch.int8, "signs"),
                "range": ((layer.d_out, k_layer), torch.float32, "range"),
                "project": ((k_layer, layer.d_in), torch.float32, "projection"),
            }[phase]
            expected[f"{name}.{key}"] = torch.empty(shape, dtype=dtype, device="meta")
        return Request(phase, expected, arrays or {}, release=release, signs=signs,
                       sketch_seed=self.cfg.seed, sketch_size=k)

    def seed_state(self, generator):
        return self.adapted.head_init(generator)  # B, R, A come from the clients' gradients

    def init_reads_client_data(self):
        return self.cfg.fedsb.init_data == "clients"

    @classmethod
    def set_up_plan(cls, cfg):
        s = cfg.fedsb
        if s.init_data != "clients":
            return None
        # the sketch releases its two phases anew; the sign variants send the signs of one release
        return SetUpPlan(s.init_examples, 2 if s.init == "sketch" else 1, s.init_noise_multiplier)

    def init_traffic(self):
        if not self.init_reads_client_data():
            up, down = {}, {}
        elif self.cfg.fedsb.init in ("sketch", "sign_sketch"):
            up = self._request("range").expected | self._request("project").expected
            k = self.adapted.rank + self.cfg.fedsb.oversampling
            down = {f"{name}.basis": torch.empty(layer.d_out, sketch_columns(k, layer), device="meta")
                    for name, layer in self.adapted.layers.items()}
        else:
            up = self._request("gradient-sum" if self.cfg.fedsb.init == "dense" else "signs").expected
            down = {}
        ba = {f"{name}.lora_{f}": torch.empty(shape, device="meta") for name, layer in self.adapted.layers.items()
              for f, shape in (("B", (layer.d_out, layer.rank)), ("A", (layer.rank, layer.d_in)))}
        return up, down | ba
