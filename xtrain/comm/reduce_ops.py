"""Element-wise reductions for the hand-written collectives.

Partial results are combined in the tensor's own dtype, one pair at a time,
as gloo does (so bf16/fp16 sums round at every step, and the order of the
ring differs from the built-in's: float sums agree within round-off, integer
sums and MAX/MIN bitwise). AVG is SUM followed by a division by the group
size on the rank that finishes a chunk.

Which op takes which dtype follows torch on gloo:

| op | dtypes |
|---|---|
| SUM | every dtype (bool: logical or) |
| AVG | floating point and complex (an integer average is refused, as gloo refuses it) |
| PRODUCT | real dtypes (bool: logical and) |
| MAX, MIN | real dtypes (bool: or / and) |
| BAND, BOR, BXOR | integers and bool (floating point refused: "non-integral dtype") |
| PREMUL_SUM | refused (gloo has none; it is NCCL's) |

Checks run before any message moves, so every rank of a group refuses alike.
"""

from __future__ import annotations

import torch
from torch.distributed import ReduceOp

_SUPPORTED = ("SUM", "AVG", "PRODUCT", "MAX", "MIN", "BAND", "BOR", "BXOR")
_BITWISE = ("BAND", "BOR", "BXOR")
_NAMES = {getattr(ReduceOp, n): n for n in _SUPPORTED}


class UnsupportedReduction(TypeError, RuntimeError):
    """A reduce op that does not apply to the tensor's dtype (a TypeError, and a
    RuntimeError as torch's gloo raises)."""


def op_name(op) -> str:
    """``"SUM"``, ``"BAND"``, ... for a ``ReduceOp``; a clear error for anything else."""
    key = getattr(op, "op", op)  # a ReduceOp instance wraps its RedOpType
    try:
        name = _NAMES.get(key)
    except TypeError:  # unhashable: certainly not a ReduceOp
        name = None
    if name is not None:
        return name
    if key == ReduceOp.PREMUL_SUM:
        raise ValueError(
            "ReduceOp.PREMUL_SUM is not supported by xtrain's collectives (nor by torch's gloo backend; "
            "it is NCCL's): scale the tensor and use ReduceOp.SUM"
        )
    raise ValueError(f"reduce op {op!r} is not supported; use a torch.distributed.ReduceOp: one of {', '.join(_SUPPORTED)}")


def check(op, dtype: torch.dtype) -> None:
    """Raise before any message moves, so every rank fails alike."""
    name = op_name(op)
    if dtype.is_complex:
        if name not in ("SUM", "AVG"):
            raise UnsupportedReduction(f"ReduceOp.{name} does not apply to complex tensors ({dtype}); only SUM and AVG do")
        return
    if name == "AVG" and not dtype.is_floating_point:
        raise UnsupportedReduction(f"ReduceOp.AVG needs a floating-point tensor, got {dtype} (torch's gloo backend refuses it too)")
    if name in _BITWISE and dtype.is_floating_point:
        raise UnsupportedReduction(f"Cannot use ReduceOp.{name} with non-integral dtype {dtype}: it needs an integer or bool tensor")


def combine(op, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a (op) b``; ``out`` may alias ``a`` or ``b``."""
    name = op_name(op)
    if name in ("SUM", "AVG"):
        if out.dtype == torch.bool:
            torch.logical_or(a, b, out=out)
        else:
            torch.add(a, b, out=out)
    elif name == "PRODUCT":
        if out.dtype == torch.bool:
            torch.logical_and(a, b, out=out)
        else:
            torch.mul(a, b, out=out)
    elif name == "MAX":
        torch.maximum(a, b, out=out)
    elif name == "MIN":
        torch.minimum(a, b, out=out)
    elif name == "BAND":
        torch.bitwise_and(a, b, out=out)
    elif name == "BOR":
        torch.bitwise_or(a, b, out=out)
    else:
        torch.bitwise_xor(a, b, out=out)


def finish(op, t: torch.Tensor, n: int) -> None:
    """Turn a complete SUM into AVG where asked."""
    if n > 1 and op_name(op) == "AVG":
        t.div_(n)
