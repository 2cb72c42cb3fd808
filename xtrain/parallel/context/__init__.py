"""Context parallelism: causal attention over sequences cut across the cp axis.

- ``layout.py``: which columns each rank holds (zigzag or contiguous) and
  which attention blocks it computes or skips (pure data);
- ``kernels.py``: one block with its log-sum-exp (the device's fused kernel,
  or plain math), its backward, and the fp32 merge;
- ``attention.py``: ring, all-gather and Ulysses attention as autograd functions;
- ``transform.py``: the transform that swaps the model's inner attention,
  and the config checks.
"""

from xtrain.parallel.context.attention import VARIANTS, CPGroup, context_attention
from xtrain.parallel.context.layout import (
    LAYOUTS,
    SequenceLayout,
    check_layout,
    ring_table,
)
from xtrain.parallel.context.transform import (
    ContextParallelAttention,
    SequenceShard,
    check_context_parallel,
    context_parallel_transform,
)

__all__ = [
    "LAYOUTS",
    "VARIANTS",
    "CPGroup",
    "ContextParallelAttention",
    "SequenceLayout",
    "SequenceShard",
    "check_context_parallel",
    "check_layout",
    "context_attention",
    "context_parallel_transform",
    "ring_table",
]
