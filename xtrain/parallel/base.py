"""The strategy interface: a transform applied from outside to a plain model,
its optimizer and its training step.

The trainer calls, per optimizer step::

    for each micro-batch:
        with strategy.no_sync(model) (all but the last):  loss.backward()
    strategy.reduce_gradients(model)
    norm = strategy.clip_grad_norm_(model, max_norm)
    optimizer.step()

A strategy reads its options and the mesh; it never reaches back into the
config or the launcher.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from xtrain.comm import Comm, ReduceOp
from xtrain.mesh import Mesh


class Strategy:
    name = "base"
    # Mesh axes this strategy knows how to use with a degree above 1.
    supported_axes: tuple[str, ...] = ()
    # Whether it runs without torch.distributed (only `single`).
    single_process = False

    def __init__(self, mesh: Mesh, comm: Comm, options):
        self.mesh, self.comm, self.options = mesh, comm, options

    # -- validation (static: runs before any process group exists) ---------
    @classmethod
    def check(cls, options, degrees: dict[str, int], world_size: int) -> list[str]:
        problems = []
        if cls.single_process and world_size != 1:
            problems.append(
                f"strategy={cls.name} runs one process, but the world size is {world_size}; "
                f"use a distributed strategy such as strategy=dp"
            )
        for axis, degree in degrees.items():
            if degree > 1 and axis not in cls.supported_axes:
                problems.append(f"strategy={cls.name} does not support {axis}={degree} (supports {list(cls.supported_axes) or 'none'})")
        return problems

    # -- data placement ----------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.mesh.coord("dp")

    @property
    def dp_size(self) -> int:
        return self.mesh.degrees["dp"]

    def loss_weight(self) -> float:
        """1 if this rank's loss counts in the global mean (0 for replicas of another's)."""
        return 1.0

    # -- the transform ------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        return model

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy, computed in fp32."""
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def forward_backward(self, model: nn.Module, x, y, micro_batches: int, autocast) -> torch.Tensor:
        """Run forward and backward over ``micro_batches`` slices of this rank's
        batch; gradients accumulate as the mean over all of them. Returns the
        mean loss (detached). Only the last micro-batch may communicate."""
        total = torch.zeros((), device=x.device)
        xs, ys = x.chunk(micro_batches), y.chunk(micro_batches)
        for i, (xb, yb) in enumerate(zip(xs, ys)):
            sync = i == micro_batches - 1
            with (contextlib.nullcontext() if sync else self.no_sync(model)):
                with autocast:
                    loss = self.loss(model(xb), yb)
                (loss / micro_batches).backward()
            total += loss.detach()
        return total / micro_batches

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, x, y) -> torch.Tensor:
        return self.loss(model(x), y)

    def full_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter, whole, on CPU (gathers shards where a strategy has them)."""
        return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}

    def no_sync(self, model: nn.Module):
        """Context for micro-batches whose gradients are not yet reduced."""
        return contextlib.nullcontext()

    def reduce_gradients(self, model: nn.Module) -> None:
        pass

    def grad_norm_group(self):
        """Group over which gradient shards are partitioned (SOLO: grads are whole here)."""
        from xtrain.comm import SOLO

        return SOLO

    def local_grads(self, model: nn.Module) -> list[torch.Tensor]:
        """The gradients this rank owns (each element counted once across the group)."""
        return [p.grad for p in model.parameters() if p.grad is not None]

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global-norm clipping that is correct across shards: the squared norm is
        summed locally, reduced over the shard group, and every rank applies the
        same scale min(1, max_norm / (norm + 1e-6)) (as torch's clip_grad_norm_)."""
        grads = self.local_grads(model)
        if grads:
            norm_sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
        else:
            norm_sq = torch.zeros((), device=next(model.parameters()).device)
        self.comm.all_reduce(norm_sq, op=ReduceOp.SUM, group=self.grad_norm_group())
        norm = norm_sq.sqrt()
        if max_norm and max_norm > 0:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        return norm

    # -- checkpoints -----------------------------------------------------------
    def checkpoint_files(self, model: nn.Module, optimizer) -> dict[str, object]:
        """Files this rank writes: name -> state. Replicated state is written by rank 0 only."""
        if self.mesh.rank != 0:
            return {}
        return {"model.safetensors": model, "optim.pt": optimizer.state_dict()}

    def load_checkpoint_files(self, model: nn.Module, optimizer, read) -> None:
        """``read(name)`` returns a file's content (a model is loaded into ``model``)."""
        read("model.safetensors", model)
        optimizer.load_state_dict(read("optim.pt"))


class Single(Strategy):
    """One process, no torch.distributed: the reference every strategy must match."""

    name = "single"
    single_process = True
