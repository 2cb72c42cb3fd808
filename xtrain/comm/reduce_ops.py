"""Element-wise reductions for the hand-written collectives.

Partial results are combined in the tensor's own dtype, one pair at a time,
as gloo does (so bf16/fp16 sums round at every step, and the order of the
ring differs from the built-in's: float sums agree within round-off, integer
sums and MAX/MIN bitwise). AVG is SUM followed by a division by the group
size on the rank that finishes a chunk; like torch on gloo, AVG on an
integer tensor is an error.
"""

from __future__ import annotations

import torch
from torch.distributed import ReduceOp

_SUPPORTED = ("SUM", "AVG", "PRODUCT", "MAX", "MIN")


def op_name(op) -> str:
    for name in _SUPPORTED:
        if op == getattr(ReduceOp, name):
            return name
    raise ValueError(f"reduce op {op!r} is not supported; use one of {', '.join(_SUPPORTED)}")


def check(op, dtype: torch.dtype) -> None:
    """Raise before any message moves, so every rank fails alike."""
    name = op_name(op)
    if name == "AVG" and not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"ReduceOp.AVG needs a floating-point tensor, got {dtype} (torch's gloo backend refuses it too)")


def combine(op, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a (op) b``; ``out`` may alias ``a`` or ``b``."""
    name = op_name(op)
    if name in ("SUM", "AVG"):
        torch.add(a, b, out=out)
    elif name == "PRODUCT":
        torch.mul(a, b, out=out)
    elif name == "MAX":
        torch.maximum(a, b, out=out)
    else:
        torch.minimum(a, b, out=out)


def finish(op, t: torch.Tensor, n: int) -> None:
    """Turn a complete SUM into AVG where asked."""
    if op_name(op) == "AVG" and n > 1:
        t.div_(n)
