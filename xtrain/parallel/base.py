"""The strategy interface: a transform applied from outside to a plain model,
its optimizer and its training step.

The trainer calls, per optimizer step::

    for each micro-batch:
        with strategy.no_sync(model) (all but the last):  loss.backward()
    strategy.reduce_gradients(model)
    norm = strategy.clip_grad_norm_(model, max_norm)
    strategy.optimizer_step(optimizer)
    strategy.zero_grad(model, optimizer)

A strategy reads its options and the mesh; it never reaches back into the
config or the launcher.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from xtrain.checkpoint import OPTIM_KEYS, optim_to_flat_dict
from xtrain.comm import SOLO, Comm, ReduceOp
from xtrain.data import split_micro
from xtrain.mesh import Mesh
from xtrain.optim import build_optimizer
from xtrain.parallel.tensor import (
    apply_tensor_parallel,
    gather_tp_tensor,
    shard_full_tensor,
    tp_grads_for_norm,
    tp_shard_spec,
)


class Strategy:
    name = "base"
    # Mesh axes this strategy knows how to use with a degree above 1.
    supported_axes: tuple[str, ...] = ()
    # Whether it runs without torch.distributed (only `single`).
    single_process = False

    def __init__(self, mesh: Mesh, comm: Comm, options):
        self.mesh, self.comm, self.options = mesh, comm, options
        self.tp_context = None  # set by apply_tp when tp > 1

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
        """1 if this rank's loss counts in the global mean (0 for replicas of
        another's: every tp rank computes the same loss)."""
        return 1.0 if self.mesh.coord("tp") == 0 else 0.0

    # -- the transform ------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        return model

    def apply_tp(self, model: nn.Module) -> nn.Module:
        """Tensor (and sequence) parallelism over the tp axis, applied first, so
        the data-parallel transforms see the local shards as the parameters."""
        if self.mesh.degrees["tp"] > 1:
            apply_tensor_parallel(model, self.mesh, self.comm, sequence_parallel=bool(self.options.get("sp", False)))
            self.tp_context = model.tp_context
        return model

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy, computed in fp32 (vocab-parallel under tp)."""
        if self.tp_context is not None:
            return self.tp_context.loss(logits, targets)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def forward_backward(self, model: nn.Module, x, y, micro_batches: int, autocast) -> torch.Tensor:
        """Run forward and backward over ``micro_batches`` slices of this rank's
        batch; gradients accumulate as the mean over all of them. Returns the
        mean loss (detached). Only the last micro-batch may communicate."""
        total = torch.zeros((), device=x.device)
        xs, ys = split_micro(x, micro_batches), split_micro(y, micro_batches)
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

    def no_sync(self, model: nn.Module):
        """Context for micro-batches whose gradients are not yet reduced."""
        return contextlib.nullcontext()

    def reduce_gradients(self, model: nn.Module) -> None:
        pass

    def grad_norm_groups(self) -> list:
        """Groups over which this rank's counted gradients are partitioned."""
        return [self.mesh.group("tp")] if self.tp_context is not None else []

    def local_grads(self, model: nn.Module) -> list[torch.Tensor]:
        """Every gradient the optimizer on this rank will step with."""
        return [p.grad for p in model.parameters() if p.grad is not None]

    def counted_grads(self, model: nn.Module) -> list[torch.Tensor]:
        """The gradients that enter the norm on this rank, so that summing over
        ``grad_norm_groups`` counts every element once (under tp, replicated
        parameters count on tp rank 0 only)."""
        if self.tp_context is not None:
            return tp_grads_for_norm(model, self.mesh.coord("tp"))
        return self.local_grads(model)

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global-norm clipping that is correct across shards: the squared norm is
        summed locally, reduced over the shard groups, and every rank applies the
        same scale min(1, max_norm / (norm + 1e-6)) (as torch's clip_grad_norm_)."""
        grads, counted = self.local_grads(model), self.counted_grads(model)
        if counted:  # one fused kernel per dtype, as torch's clip_grad_norm_
            norm_sq = torch.stack(torch._foreach_norm(counted)).float().pow(2).sum()
        else:
            norm_sq = torch.zeros((), device=grads[0].device if grads else None)
        for group in self.grad_norm_groups():
            if group is not SOLO:  # whole gradients on this rank: nothing to add up
                self.comm.all_reduce(norm_sq, op=ReduceOp.SUM, group=group)
        norm = norm_sq.sqrt()
        if max_norm and max_norm > 0 and grads:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
        return norm

    # -- optimizer ------------------------------------------------------------
    def build_optimizer(self, model: nn.Module, train_cfg) -> torch.optim.Optimizer:
        return build_optimizer(model, train_cfg)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def zero_grad(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    # -- accounting -------------------------------------------------------------
    def model_state_bytes(self, model: nn.Module, optimizer) -> dict[str, int]:
        """Bytes this rank holds now for parameters, gradients and optimizer
        states, measured from the live tensors (each storage counted once)."""
        return {
            "params": storage_bytes(self.param_tensors(model)),
            "grads": storage_bytes(self.grad_tensors(model)),
            "optim": storage_bytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)),
        }

    def param_tensors(self, model: nn.Module):
        return [p for p in model.parameters()]

    def grad_tensors(self, model: nn.Module):
        return [p.grad for p in model.parameters() if p.grad is not None]

    # -- checkpoints (canonical form: full tensors by parameter name) ---------------
    def checkpoint_files(self, model: nn.Module, optimizer) -> dict[str, object]:
        """Files this rank writes: name -> content. Replicated state: rank 0 only
        (every rank joins the gather of tp shards first)."""
        params, optim = self.full_state(model, optimizer)
        if self.mesh.rank != 0:
            return {}
        return {"model.safetensors": params, "optim.safetensors": optim_to_flat_dict(optim)}

    def _whole(self, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``t`` (a parameter or a state shaped like it) whole: gathered over tp if sharded."""
        if self.tp_context is None:
            return t.detach()
        return gather_tp_tensor(t, tp_shard_spec(p), self.comm, self.mesh.group("tp"))

    def full_state(self, model: nn.Module, optimizer):
        """(parameters by name, AdamW state by name), whole, on CPU. Collective under tp."""
        params, optim = {}, {}
        for n, p in model.named_parameters():
            params[n] = self._whole(p, p).cpu().clone()
            st = optimizer.state.get(p, {})
            for k in OPTIM_KEYS:
                if k in st:
                    optim.setdefault(n, {})[k] = (st[k].detach() if k == "step" else self._whole(st[k], p)).cpu().clone()
        return params, optim

    @torch.no_grad()
    def load_full_state(self, model: nn.Module, optimizer, params: dict, optim: dict) -> None:
        """Load the canonical form: each rank keeps its tp shard of every tensor."""
        check_names(model, params)
        for n, p in model.named_parameters():
            p.copy_(shard_full_tensor(params[n], p))
            if n in optim:
                optimizer.state[p] = {
                    k: v.clone() if k == "step" else shard_full_tensor(v, p).to(p.device).clone()
                    for k, v in optim[n].items()
                }

    def full_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter, whole, on CPU in fp32 (a collective where shards exist)."""
        return {n: self._whole(p, p).float().cpu().clone() for n, p in model.named_parameters()}


def storage_bytes(tensors) -> int:
    """Total bytes of the distinct storages behind ``tensors`` (views share one)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen and st.nbytes():
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def check_names(model: nn.Module, params: dict) -> None:
    expected = {n for n, _ in model.named_parameters()}
    missing, extra = expected - params.keys(), params.keys() - expected
    if missing or extra:
        raise ValueError(f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")


class Single(Strategy):
    """One process, no torch.distributed: the reference every strategy must match."""

    name = "single"
    single_process = True
