"""LoRA-SB initialisation: B, R, A from a truncated SVD of the approximate first full fine-tuning step, and
the client and server computations of Fed-SB's set-up exchange (`fedsb.init`, see methods/fedsb.py).

    dense        each client sends G_i = sum of dL/dW0 over its set-up examples;
                 M = -eta sign(sum_i G_i)                         (LoRA-SB's Adam-step approximation)
    signs        each client sends sign(G_i) as int8 votes; M = -eta sign(sum_i sign(G_i))  (majority vote)
    sketch       randomized SVD of M = -(eta / N) sum_i G_i       (the SGD step on the mean gradient)
    sign_sketch  randomized SVD of M = -(eta / n) sum_i sign(G_i) (the mean vote)
M ~ U_r S_r V_r^T  ->  B = U_r, R = S_r, A = V_r^T, s = 1.

The randomized SVD runs across the federation in two phases, each a sum over clients: with the test matrix
Omega (d_in x k, k = r + fedsb.oversampling) derived from the run's seed on both sides, each client sends
Y_i = G_i Omega; the server takes Q = orth(sum_i Y_i) and sends Q; each client sends Z_i = Q^T G_i; the
server takes the SVD of sum_i Z_i = U S V^T and B = Q U_r, R = S_r, A = V_r^T. That is the centralised
randomized SVD of sum_i G_i with the same Omega, at k (d_in + d_out) numbers up per client and layer.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .adapters import AdaptedModel
from .privacy.grad_sample import NormPath, for_base_weights
from .seeding import generator as seeded_generator

Losses = Callable[[dict], torch.Tensor]  # batch -> per-example losses


def _quantised(adapted: AdaptedModel) -> bool:
    """Whether the base weights hold integers (model.quantization): they take no gradient themselves."""
    return any(not layer.base.weight.dtype.is_floating_point for layer in adapted.layers.values())


def _track_input(module, args):
    # A quantised W0 cannot require grad; an input that requires it makes the layer's output carry the
    # output gradient that dL/dW0 = sum_t g_t x_t^T needs. Inputs that do not track grad are leaves.
    if not args[0].requires_grad:
        args[0].requires_grad_(True)


@contextmanager
def _base_weights_trainable(adapted: AdaptedModel):
    model = adapted.model
    weights = {name: layer.base.weight for name, layer in adapted.layers.items()}
    quantised = _quantised(adapted)
    was_training = model.training
    model.train()
    handles = []
    if quantised:
        handles = [layer.base.register_forward_pre_hook(_track_input) for layer in adapted.layers.values()]
    else:
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
    try:
        yield weights
    finally:
        for h in handles:
            h.remove()
        if not quantised:
            for w in weights.values():
                w.requires_grad_(False)
                w.grad = None
        model.train(was_training)


def _recorded_sums(adapted: AdaptedModel, batches: Iterable[dict], example_losses: Losses, clip_norm: float,
                   path: NormPath, project=None) -> dict[str, torch.Tensor]:
    """The sum over examples of every example's dL/dW0 (all layers together) clipped to clip_norm, from the
    recorded layer inputs and output gradients, in each weight's own layout (see private_gradient_sum)."""
    with _base_weights_trainable(adapted):
        total, _ = for_base_weights(adapted, path).clipped_sums(batches, example_losses, clip_norm, project=project)
    return total


def gradient_sums(adapted: AdaptedModel, batches: Iterable[dict], example_losses: Losses) -> dict[str, torch.Tensor]:
    """Sum over examples of dL/dW0 for every adapted layer (as d_out x d_in), the model in training mode. On a
    quantised base, the gradient at the dequantised W0, summed from the recorded per-token products."""
    if _quantised(adapted):
        sums = _recorded_sums(adapted, batches, example_losses, math.inf, "ghost")  # unclipped
        return {name: g.T if adapted.layers[name].transposed else g for name, g in sums.items()}
    with _base_weights_trainable(adapted) as weights:
        for batch in batches:
            example_losses(batch).sum().backward()
        return {name: (w.grad.T if adapted.layers[name].transposed else w.grad).detach().clone()
                for name, w in weights.items()}


def private_gradient_sum(adapted: AdaptedModel, batches: Iterable[dict], example_losses: Losses, clip_norm: float,
                         noise_multiplier: float, generator: torch.Generator, path: NormPath = "auto",
                         project: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None
                         ) -> dict[str, torch.Tensor]:
    """The same sum with every example's whole gradient (all layers together) clipped to clip_norm and
    Gaussian noise of std noise_multiplier * clip_norm added once: a release that is private on its own.
    With `project` (layer -> (L or None, R or None)) each example's gradient G_e is replaced by its sketch
    L^T G_e R before clipping, and the noise is drawn in the sketch's shape: the release is the sketch."""
    total = _recorded_sums(adapted, batches, example_losses, clip_norm, path, project)
    out = {}
    for name, layer in adapted.layers.items():
        device = layer.lora_A.device
        if project is None:  # the weight's own layout (from the layer: a quantised weight is packed)
            shape = (layer.d_in, layer.d_out) if layer.transposed else (layer.d_out, layer.d_in)
        else:  # the recorder sees (output gradient, input): the sketch L^T G R in d_out x d_in orientation
            left, right = project[name]
            shape = (layer.d_out if left is None else left.shape[1], layer.d_in if right is None else right.shape[1])
        g = total.get(name, torch.zeros(shape, device=device))
        g = g + torch.randn(shape, generator=generator, device=generator.device).to(g.device) * noise_multiplier * clip_norm
        out[name] = g.T if layer.transposed and project is None else g
    return out


@dataclass
class PrivateRelease:
    """How a client's set-up reply is made private: per-example clipping, Gaussian noise, drawn from `generator`."""
    clip_norm: float
    noise_multiplier: float
    generator: torch.Generator
    path: NormPath = "auto"


def sketch_columns(k: int, layer) -> int:
    """A layer's sketch width: k, or fewer for a layer narrower than that."""
    return min(k, layer.d_in, layer.d_out)


def sketch_matrix(layer, k: int, seed: int, layer_index: int) -> torch.Tensor:
    """Omega for one layer: d_in x k standard normal, the same on the server and every client."""
    return torch.randn(layer.d_in, sketch_columns(k, layer), generator=seeded_generator(seed, "sketch", layer_index))


def reply_from_gradients(adapted: AdaptedModel, grads: dict[str, torch.Tensor], request) -> dict[str, torch.Tensor]:
    """A set-up reply computed from a client's (dense, possibly privately released) gradient sums: the
    request's `phase` is 'gradient-sum', 'signs', 'range' (G Omega) or 'project' (Q^T G, Q in its arrays);
    the two sketch phases act on sign(G) when the request asks for signs."""
    out = {}
    for i, (name, layer) in enumerate(adapted.layers.items()):
        G = grads[name].float()
        if request.phase == "gradient-sum":
            out[f"{name}.grad_sum"] = G
            continue
        if request.phase == "signs":
            out[f"{name}.signs"] = torch.sign(G).to(torch.int8)
            continue
        M = torch.sign(G) if request.signs else G
        if request.phase == "range":
            out[f"{name}.range"] = M @ sketch_matrix(layer, request.sketch_size, request.sketch_seed, i).to(M.device)
        elif request.phase == "project":
            out[f"{name}.projection"] = request.arrays[f"{name}.basis"].to(M.device).float().T @ M
        else:
            raise ValueError(f"unknown set-up phase '{request.phase}'")
    return out


def reply_bound(adapted: AdaptedModel, request) -> float | None:
    """The largest magnitude an entry of any client's reply to `request` can take, whatever its data: a sign
    vote is at most 1; sign(G) Omega at most the largest column sum of |Omega|; Q^T sign(G) at most that of
    |Q|. None for the replies that carry gradient sums themselves, which nothing bounds."""
    if request.phase == "signs":
        return 1.0
    if not request.signs:
        return None
    bound = 0.0
    for i, (name, layer) in enumerate(adapted.layers.items()):
        if request.phase == "range":
            columns = sketch_matrix(layer, request.sketch_size, request.sketch_seed, i)
        else:
            columns = request.arrays[f"{name}.basis"]
        bound = max(bound, columns.float().abs().sum(0).max().item())
    return bound


def client_reply(adapted: AdaptedModel, request, batches: Iterable[dict], example_losses: Losses,
                 private: PrivateRelease | None = None) -> dict[str, torch.Tensor]:
    """What a client sends for one phase of the set-up exchange, computed over `batches` (its set-up
    examples). Under DP a sketch of the gradients is released as such: each example's sketch of all layers
    is clipped and the noise is added in the space sent; the sign variants release the clipped, noised
    dense sum and send its signs (post-processing)."""
    if private is None:
        return reply_from_gradients(adapted, gradient_sums(adapted, batches, example_losses), request)
    if request.phase in ("range", "project") and not request.signs:
        project = {}
        for i, (name, layer) in enumerate(adapted.layers.items()):
            if request.phase == "range":
                project[name] = (None, sketch_matrix(layer, request.sketch_size, request.sketch_seed, i))
            else:
                project[name] = (request.arrays[f"{name}.basis"].float(), None)
        sketches = private_gradient_sum(adapted, batches, example_losses, private.clip_norm, private.noise_multiplier,
                                        private.generator, private.path, project)
        suffix = "range" if request.phase == "range" else "projection"
        return {f"{name}.{suffix}": v for name, v in sketches.items()}
    grads = private_gradient_sum(adapted, batches, example_losses, private.clip_norm, private.noise_multiplier,
                                 private.generator, private.path)
    return reply_from_gradients(adapted, grads, request)


def orthonormal_basis(Y: torch.Tensor) -> torch.Tensor:
    """Q with orthonormal columns spanning the columns of Y (d_out x k)."""
    return torch.linalg.qr(Y.double()).Q.float()


def factors_from_projection(Q: torch.Tensor, Z: torch.Tensor, rank: int, scale: float,
                            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, R, A) of the rank-r truncated SVD of scale * Q Z (Z = Q^T M): the randomized SVD's last step."""
    U, S, Vh = torch.linalg.svd(scale * Z.double(), full_matrices=False)
    B = Q.double() @ U[:, :rank]
    return B.contiguous().to(dtype), torch.diag(S[:rank]).to(dtype), Vh[:rank].contiguous().to(dtype)


def lora_sb_factors(grad_sum: torch.Tensor, rank: int, eta: float, niter: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, R, A) of the rank-r truncated SVD of G = -eta sign(grad_sum)."""
    G = -eta * torch.sign(grad_sum.float())
    q = min(rank + 8, *G.shape)  # a few extra directions make the randomized SVD's top r accurate
    with torch.random.fork_rng(devices=[G.device] if G.is_cuda else []):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(G, q=q, niter=niter)
    dtype = grad_sum.dtype
    return U[:, :rank].contiguous().to(dtype), torch.diag(S[:rank]).to(dtype), V[:, :rank].T.contiguous().to(dtype)
