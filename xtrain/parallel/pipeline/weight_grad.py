"""Split backward: input gradients now (I), weight gradients later (W).

Zero-bubble pipeline parallelism (Qi et al., 2023, arXiv:2401.10241) splits a
stage's backward in two: I computes the gradient with respect to the stage's
input, which the previous stage is waiting for; W computes the weight
gradients, which nobody waits for, so a schedule can run it in a bubble.

The split is made where the weight-gradient work is: every ``F.linear`` on a
chunk's parameters (the model's ``nn.Linear`` layers and the tensor-parallel
ones alike) runs, while a forward is recorded under ``store.mode(chunk, key)``
(a forward whose backward the schedule splits), as ``_DeferredLinear``, which
sees the weight and bias detached: autograd's backward of that forward (I)
computes dX = dY·W and keeps (W, b, X, dY) under the micro-batch's key,
without computing dW = dYᵀ·X and db = Σ dY and without touching the
parameters' gradients. ``store.run(key)`` (W) computes those and accumulates
them with one autograd call per parameter, so gradient hooks (ddp buckets,
ZeRO) see one accumulation each. Everything else (norms, the embedding) gets
its gradient during I: small next to the matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _DeferredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, store, key, params):
        device = x.device.type
        if torch.is_autocast_enabled(device):  # do autocast's cast here, and keep the cast copies
            dtype = torch.get_autocast_dtype(device)
            x, weight_c = x.to(dtype), weight.to(dtype)
            bias_c = bias.to(dtype) if bias is not None else None
        else:
            weight_c, bias_c = weight, bias
        ctx.save_for_backward(x, weight_c)
        # ``params``: the real (weight, bias), in a tuple so autograd makes no edge to them
        ctx.store, ctx.key, (ctx.weight, ctx.bias) = store, key, params
        with torch.autocast(device, enabled=False):
            return F.linear(x, weight_c, bias_c)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        keep = ctx.store.keep
        ctx.store.pending.setdefault(ctx.key, []).append((ctx.weight, ctx.bias, keep(x), keep(dy)))
        return (dy.to(w.dtype) @ w).to(dy.dtype), None, None, None, None, None


def _weight_grads(weight, bias, x, dy):
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    dw = (dy2.to(x2.dtype).t() @ x2).to(weight.dtype)
    db = dy2.sum(0).to(bias.dtype) if bias is not None else None
    return dw, db


class _Intercept(TorchFunctionMode):
    def __init__(self, store, params: dict[int, torch.Tensor], key):
        super().__init__()
        self.store, self.params, self.key = store, params, key

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if id(weight) in self.params and torch.is_grad_enabled():
                b = bias.detach() if bias is not None else None
                return _DeferredLinear.apply(x, weight.detach(), b, self.store, self.key, (weight, bias))
        return func(*args, **kwargs)


class WeightGradStore:
    """The deferred weight gradients of one rank's chunks, by (stage, micro-batch)."""

    def __init__(self):
        self.pending: dict[tuple[int, int], list] = {}
        # applied to every tensor held from I to W (X and dY): a measurement can count them
        self.keep = lambda t: t

    def mode(self, module: torch.nn.Module, key: tuple[int, int]):
        """Context for the forward of (stage, micro-batch) ``key`` whose backward
        is split: its linears' weight gradients wait for ``run(key)``."""
        return _Intercept(self, {id(p): p for p in module.parameters()}, key)

    @torch.no_grad()
    def run(self, key: tuple[int, int]) -> None:
        """W: compute the weight gradients kept under ``key`` and accumulate them,
        summed per parameter, in one autograd call (one hook call per parameter)."""
        sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for weight, bias, x, dy in self.pending.pop(key, []):
            dw, db = _weight_grads(weight, bias, x, dy)
            for p, g in ((weight, dw), (bias, db)):
                if p is not None:
                    sums[id(p)] = (p, g if id(p) not in sums else sums[id(p)][1] + g)
        if sums:
            params, grads = zip(*sums.values())
            with torch.enable_grad():
                torch.autograd.backward(list(params), list(grads))
