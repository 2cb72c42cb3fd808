"""The context-parallel transform: every attention's inner kernel becomes one
that attends across the cp line, and each cp rank keeps its columns of every
sequence (``strategy.seq_layout``: its tokens, its targets, its rotary
positions).

cp holds no parameter shards: every parameter is replicated over cp, and its
gradient is averaged over dp × cp together (each cp rank's loss is the mean
over its own, equally many, tokens), so ``cp`` joins ``strategy.data_axes``.
"""

from __future__ import annotations

import torch
from torch import nn

from xtrain.parallel.context.attention import VARIANTS, CPGroup, context_attention
from xtrain.parallel.context.kernels import KERNELS
from xtrain.parallel.context.layout import LAYOUTS, SequenceLayout, check_layout


class ContextParallelAttention(nn.Module):
    """``Attention.inner_attention`` under context parallelism: q (B,H,Tl,E),
    k/v (B,K,Tl,E) of this rank's columns in, this rank's outputs out."""

    def __init__(self, cp: CPGroup, variant: str):
        super().__init__()
        self.cp, self.variant = cp, variant

    def forward(self, q, k, v):
        return context_attention(q, k, v, self.cp, self.variant)

    def extra_repr(self) -> str:
        return f"variant={self.variant}, layout={self.cp.layout.kind}, cp={self.cp.size}"


class SequenceShard:
    """Which columns of each sequence this rank holds (``Strategy.seq_layout``)."""

    def __init__(self, layout: SequenceLayout, rank: int):
        self.layout, self.rank = layout, rank
        self._cache: dict = {}

    def columns(self, seq_len: int) -> torch.Tensor:
        return self.layout.columns(self.rank, seq_len)

    def positions(self, local_len: int, device) -> torch.Tensor:
        """Rotary positions of a local sequence of ``local_len`` columns."""
        key = (local_len, str(device))
        if key not in self._cache:
            self._cache[key] = self.columns(local_len * self.layout.cp).to(device)
        return self._cache[key]


def options_of(options) -> tuple[str, str, str]:
    return (
        str(options.get("cp_attn", "ring")),
        str(options.get("cp_layout", "zigzag")),
        str(options.get("cp_kernel", "auto")),
    )


def context_parallel_transform(strategy, model: nn.Module) -> nn.Module:
    """Swap every ``inner_attention`` for the cp kernel; record the column layout."""
    mesh = strategy.mesh
    n = mesh.degrees["cp"]
    if n == 1:
        return model
    variant, kind, kernel = options_of(strategy.options)
    prev, nxt = mesh.neighbours("cp")
    layout = SequenceLayout(kind, n)
    cp = CPGroup(strategy.comm, mesh.group("cp"), mesh.coord("cp"), n, prev, nxt, layout, kernel)
    for module in model.modules():
        if hasattr(module, "inner_attention"):
            module.inner_attention = ContextParallelAttention(cp, variant)
    strategy.seq_layout = SequenceShard(layout, mesh.coord("cp"))
    strategy.data_axes.append("cp")
    return model


def check_context_parallel(options, cp: int, seq_len: int, model_cfg, tp: int = 1, sp: bool = False) -> list[str]:
    """Every reason this cp configuration cannot run (static: before any process group)."""
    variant, kind, kernel = options_of(options)
    problems = []
    if variant not in VARIANTS:
        problems.append(f"strategy.cp_attn={variant!r} is not one of {list(VARIANTS)}")
    if kernel not in KERNELS:
        problems.append(f"strategy.cp_kernel={kernel!r} is not one of {list(KERNELS)}")
    if kind not in LAYOUTS:
        problems.append(f"strategy.cp_layout={kind!r} is not one of {list(LAYOUTS)}")
    if cp == 1:
        return problems
    if kind in LAYOUTS:
        problems += check_layout(kind, cp, seq_len)
    if sp and seq_len % cp == 0 and (seq_len // cp) % tp:
        problems.append(
            f"sequence parallel splits each rank's {seq_len // cp} columns (train.seq_len={seq_len} / cp={cp}) "
            f"over tp={tp}: not divisible"
        )
    if variant == "ulysses" and model_cfg is not None:
        H, K = model_cfg.n_heads, model_cfg.n_kv_heads
        h, k = (H // tp if H % tp == 0 else H), (K // tp if K % tp == 0 else 1)
        per = f" per tp rank (tp={tp})" if tp > 1 else ""
        if h % cp or k % cp:
            problems.append(
                f"strategy.cp_attn=ulysses shards attention heads over cp={cp}: n_heads {h} and n_kv_heads {k}{per} "
                f"must both be divisible by cp (model.n_heads={H}, model.n_kv_heads={K}); use cp_attn=ring or allgather"
            )
    return problems
