"""Split backward (I then W) equals the fused backward on a pipeline stage:
the input gradient after I, and every parameter's gradient after W, in fp32,
for plain layers and under bf16 autocast; hooks see one accumulation each."""

import torch

from xtrain.model import ModelConfig, build_model
from xtrain.parallel.pipeline.weight_grad import WeightGradStore


def _stage():
    model = build_model(ModelConfig(n_layers=3, tie_embeddings=False), seed=0)
    return model.part([1, 2], first=False, last=True)  # a middle-to-last stage: hidden in, logits out


def _grads(stage):
    return {n: p.grad.clone() for n, p in stage.named_parameters()}


def test_input_grad_then_weight_grad_equals_the_fused_backward():
    torch.manual_seed(0)
    h = torch.randn(2, 16, 64)
    target = torch.randn(2, 16, 256)

    fused = _stage()
    x = h.clone().requires_grad_()
    (fused(x) * target).sum().backward()
    ref_dx, ref = x.grad.clone(), _grads(fused)

    split, store = _stage(), WeightGradStore()
    calls = {}
    for n, p in split.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    x = h.clone().requires_grad_()
    with store.mode(split, (1, 0)):
        out = split(x)
    (out * target).sum().backward()  # I: what the executor runs (norms get their gradients here)
    assert torch.allclose(x.grad, ref_dx, atol=1e-6, rtol=1e-5)  # I: the input gradient is complete
    assert split.blocks[1].attn.wq.weight.grad is None  # its weight gradient waits for W
    store.run((1, 0))
    assert store.pending == {}
    got = _grads(split)
    for n, g in ref.items():
        assert torch.allclose(got[n], g, atol=1e-6, rtol=1e-5), n
    assert set(calls.values()) == {1} and calls.keys() == ref.keys()


def test_split_backward_under_bf16_autocast_tracks_the_fused_one():
    torch.manual_seed(0)
    h = torch.randn(2, 16, 64)
    fused, split, store = _stage(), _stage(), WeightGradStore()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(h.clone().requires_grad_()).float().square().mean().backward()
        with store.mode(split, (0, 0)):
            out = split(h.clone().requires_grad_()).float().square().mean()
    out.backward()
    store.run((0, 0))
    for n, p in split.named_parameters():
        ref = dict(fused.named_parameters())[n].grad
        assert p.grad.dtype == torch.float32
        assert (p.grad - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-6, n
