"""Parallel strategies, each a transform applied from outside to a plain model.

``STRATEGIES`` maps ``strategy.name`` to its class. The model transforms apply
in this order for every strategy (torchtitan's): the pipeline split (each rank
keeps its stages), then tensor parallel, then context parallel (the inner
attention swapped; no parameter changes), then expert parallel (experts
sharded over ep, the dispatcher swapped), then MoE balancing (a step hook), so the data-parallel flavours see
this rank's local shards as the parameters.
"""

from xtrain.parallel.base import Single, Strategy
from xtrain.parallel.context import context_parallel_transform
from xtrain.parallel.data import (
    ContextParallel,
    DataParallel,
    DistributedDataParallel,
    ExpertParallel,
    PipelineParallel,
    TensorParallel,
)
from xtrain.parallel.expert import expert_parallel_transform, moe_transform
from xtrain.parallel.pipeline.stages import pipeline_transform
from xtrain.parallel.tensor import tensor_parallel_transform
from xtrain.parallel.zero import Zero1, Zero2, Zero3

Strategy.transforms = (
    pipeline_transform,
    tensor_parallel_transform,
    context_parallel_transform,
    expert_parallel_transform,
    moe_transform,
)

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Single, DataParallel, DistributedDataParallel, TensorParallel, PipelineParallel, ContextParallel, ExpertParallel, Zero1, Zero2, Zero3)}

__all__ = ["STRATEGIES", "Strategy"]
