"""Data parallelism: every rank holds the whole model and a slice of the batch.

``dp``: after backward, every gradient is all-reduced (averaged) over the dp
axis, one collective per parameter (the textbook version; see ``ddp`` for
bucketing and overlap). Per rank, a ring all-reduce of Ψ fp32 gradients moves
2Ψ·(dp-1)/dp elements each way per step.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from xtrain.comm import ReduceOp
from xtrain.parallel.base import Strategy


class DataParallel(Strategy):
    name = "dp"
    supported_axes = ("dp",)

    @torch.no_grad()
    def reduce_gradients(self, model: nn.Module) -> None:
        group = self.mesh.group("dp")
        for p in model.parameters():
            if p.grad is not None:
                self.comm.all_reduce(p.grad, op=ReduceOp.AVG, group=group)
