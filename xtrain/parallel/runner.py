"""Step runners: what runs forward and backward in one optimizer step.

``MicroBatchRunner`` is the plain loop: each micro-batch of this rank's batch
runs forward and backward through the whole model, and gradients accumulate
as the mean over them. The pipeline executor
(``xtrain.parallel.pipeline.executor``) is the other runner: it runs a
schedule's action lists over stages. Both expose ``chunks`` (the model pieces
whose gradients a data-parallel flavour reduces) and wrap the last backward
of each chunk in ``strategy.grads_final(chunk)``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from xtrain.data import split_micro


class MicroBatchRunner:
    """Every micro-batch through the whole model, forward then backward."""

    def __init__(self, strategy, model: nn.Module):
        self.strategy, self.model = strategy, model
        self.chunks = [model]

    def forward_backward(self, x, y, micro_batches: int, autocast) -> torch.Tensor:
        """The mean loss over ``micro_batches`` slices of this rank's batch
        (detached); the gradients are that mean's."""
        loss_fn, total = self.strategy.loss_fn, torch.zeros((), device=x.device)
        xs, ys = split_micro(x, micro_batches), split_micro(y, micro_batches)
        for i, (xb, yb) in enumerate(zip(xs, ys)):
            last = i == micro_batches - 1
            with self.strategy.grads_final(self.model) if last else contextlib.nullcontext():
                with autocast:
                    loss = loss_fn(self.model(xb, self.strategy.positions(xb)), yb)
                (loss / micro_batches).backward()
            total += loss.detach()
        return total / micro_batches

    @torch.no_grad()
    def eval_loss(self, x, y) -> torch.Tensor:
        return self.strategy.loss_fn(self.model(x, self.strategy.positions(x)), y)
