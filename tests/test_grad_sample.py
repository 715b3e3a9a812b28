"""Per-example gradients against torch.func (grad of one example's loss, each example on its own)."""
import pytest
import torch
from torch.func import functional_call, grad

from fedlora.adapters import AdaptedModel
from fedlora.config import build_config
from fedlora.methods import METHODS
from fedlora.privacy.grad_sample import for_base_weights, for_trainable

from conftest import tiny_bert, tiny_gpt2


def build(method, model_fn=tiny_bert, targets=("query", "value", "dense"), heads=("classifier",), round_=1):
    """The adapted model, and the keys the method trains in round `round_`."""
    model = model_fn()
    cls = METHODS[method]
    adapted = AdaptedModel(model, parameterisation=cls.parameterisation, rank=3, scaling=2.0,
                           target_modules=list(targets), head_modules=list(heads))
    g = torch.Generator().manual_seed(5)
    adapted.load_state({k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in adapted.state().items()})
    return adapted, cls(adapted, build_config({"method": {"name": method}}), [1]).trainable_keys(round_)


def padded_batch(vocab, lengths=(7, 4, 6, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    labels = torch.randint(0, 2, (len(lengths),), generator=g)
    return ids, mask, labels


def loss_of(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


def reference(adapted, params_by_key, ids, mask, labels):
    """torch.func.grad of each example's loss, computed on the example alone, without padding."""
    names = {id(p): n for n, p in adapted.model.named_parameters()}
    keyed = {k: names[id(p)] for k, p in params_by_key.items()}
    out = {k: [] for k in keyed}
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        def f(params):
            return loss_of(lambda **kw: functional_call(adapted.model, params, kwargs=kw),
                           ids[i:i + 1, :n], mask[i:i + 1, :n], labels[i:i + 1])
        g = grad(f)({keyed[k]: params_by_key[k].detach() for k in keyed})
        for k in keyed:
            out[k].append(g[keyed[k]])
    return {k: torch.stack(v) for k, v in out.items()}


def ours(adapted, recorder, ids, mask, labels, keys, clip=1e9):
    for p in adapted.set_trainable(keys):
        p.grad = None
    with recorder.recording(mask):
        loss_of(adapted.model, ids, mask, labels).backward()
    return recorder.per_example(), recorder.clipped_sum(clip)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("path", ["ghost", "materialise"])
@pytest.mark.parametrize("method,round_", [(m, 1) for m in METHODS] + [("rolora", 2)])  # RoLoRA: B, then A
def test_per_example_gradients_match_torch_func(method, round_, path):
    adapted, keys = build(method, round_=round_)
    ids, mask, labels = padded_batch(adapted.model.config.vocab_size)
    recorder = for_trainable(adapted, keys, path)
    per_example, (sums, norms) = ours(adapted, recorder, ids, mask, labels, keys)
    params = {k: adapted.parameters_by_key()[k] for k in keys}
    ref = reference(adapted, params, ids, mask, labels)
    for k in keys:
        assert ref[k].norm() > 0, k
        assert rel_err(per_example[k], ref[k]) < 1e-5, k
        assert rel_err(sums[k], ref[k].sum(0)) < 1e-5, k  # no clipping: the plain sum
    ref_norms = torch.stack([ref[k].flatten(1).pow(2).sum(1) for k in keys]).sum(0).sqrt()
    assert rel_err(norms, ref_norms) < 1e-5


@pytest.mark.parametrize("path", ["ghost", "materialise"])
def test_conv1d_and_base_weights(path):
    adapted, keys = build("fedit", tiny_gpt2, targets=("c_attn", "c_fc"), heads=("score",))
    ids, mask, labels = padded_batch(64)
    recorder = for_trainable(adapted, keys, path)
    per_example, _ = ours(adapted, recorder, ids, mask, labels, keys)
    ref = reference(adapted, {k: adapted.parameters_by_key()[k] for k in keys}, ids, mask, labels)
    for k in keys:
        assert rel_err(per_example[k], ref[k]) < 1e-5, k
    # W0 of Conv1D layers, as the private LoRA-SB initialisation needs
    recorder = for_base_weights(adapted, path)
    base = {n: layer.base.weight.requires_grad_(True) for n, layer in adapted.layers.items()}
    per_example, _ = ours(adapted, recorder, ids, mask, labels, [])
    ref = reference(adapted, base, ids, mask, labels)
    for k in base:
        assert rel_err(per_example[k], ref[k]) < 1e-5, k


def test_clipping_bounds_each_examples_contribution():
    adapted, keys = build("fedsb")
    ids, mask, labels = padded_batch(adapted.model.config.vocab_size)
    recorder = for_trainable(adapted, keys)
    per_example, (sums, norms) = ours(adapted, recorder, ids, mask, labels, keys, clip=1e9)
    clip = float(norms.min()) / 2  # every example is clipped
    _, (clipped, _) = ours(adapted, recorder, ids, mask, labels, keys, clip=clip)
    for k in keys:
        expected = sum(per_example[k][b] * clip / norms[b] for b in range(ids.shape[0]))
        assert rel_err(clipped[k], expected) < 1e-4
    assert torch.cat([clipped[k].flatten() for k in keys]).norm() <= clip * ids.shape[0] + 1e-6


def test_an_example_with_a_huge_gradient_moves_the_clipped_sum_by_at_most_clip_norm():
    adapted, keys = build("ffa")
    ids, mask, labels = padded_batch(adapted.model.config.vocab_size, lengths=(7, 4, 6, 2, 5))
    recorder = for_trainable(adapted, keys)
    adapted.set_trainable(keys)

    def clipped(scale_last):
        with recorder.recording(mask):
            logits = adapted.model(input_ids=ids, attention_mask=mask).logits
            losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            (losses * torch.tensor([1, 1, 1, 1, scale_last])).sum().backward()
        sums, norms = recorder.clipped_sum(0.5)
        return torch.cat([sums[k].flatten() for k in keys]), norms

    without, _ = clipped(0.0)  # the last example contributes nothing
    with_huge, norms = clipped(1e6)
    assert norms[-1] > 1e4
    assert (with_huge - without).norm() <= 0.5 + 1e-5


@pytest.mark.parametrize("path", ["ghost", "materialise"])
def test_every_lorasb_factor_at_once(path):
    """A, B and R of one LoRA-SB layer trained together (no method does, but the chain rule must hold)."""
    adapted, _ = build("fedsb")
    keys = adapted.keys_of(("lora_A", "lora_B", "lora_R"))
    ids, mask, labels = padded_batch(adapted.model.config.vocab_size)
    per_example, _ = ours(adapted, for_trainable(adapted, keys, path), ids, mask, labels, keys)
    ref = reference(adapted, {k: adapted.parameters_by_key()[k] for k in keys}, ids, mask, labels)
    for k in keys:
        assert rel_err(per_example[k], ref[k]) < 1e-5, k
