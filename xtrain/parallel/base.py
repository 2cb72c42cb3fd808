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
from xtrain.mesh import Mesh
from xtrain.optim import build_optimizer


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

    def no_sync(self, model: nn.Module):
        """Context for micro-batches whose gradients are not yet reduced."""
        return contextlib.nullcontext()

    def reduce_gradients(self, model: nn.Module) -> None:
        pass

    def grad_norm_group(self):
        """Group over which gradient shards are partitioned (SOLO: grads are whole here)."""
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
        if grads:  # one fused kernel per dtype, as torch's clip_grad_norm_
            norm_sq = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
        else:
            norm_sq = torch.zeros((), device=next(model.parameters()).device)
        group = self.grad_norm_group()
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
        """Files this rank writes: name -> content. Replicated state: rank 0 only."""
        if self.mesh.rank != 0:
            return {}
        params, optim = self.full_state(model, optimizer)
        return {"model.safetensors": params, "optim.safetensors": optim_to_flat_dict(optim)}

    def full_state(self, model: nn.Module, optimizer):
        """(parameters by name, AdamW state by name), whole, on CPU."""
        names = {id(p): n for n, p in model.named_parameters()}
        params = {n: p.detach().cpu() for n, p in model.named_parameters()}
        optim = {
            names[id(p)]: {k: v.detach().cpu() for k, v in st.items() if k in OPTIM_KEYS}
            for p, st in optimizer.state.items()
        }
        return params, optim

    @torch.no_grad()
    def load_full_state(self, model: nn.Module, optimizer, params: dict, optim: dict) -> None:
        check_names(model, params)
        for n, p in model.named_parameters():
            p.copy_(params[n])
        for n, p in model.named_parameters():
            if n in optim:
                optimizer.state[p] = {k: v.clone().to(p.device) if k != "step" else v.clone() for k, v in optim[n].items()}

    def full_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter, whole, on CPU (gathers shards where a strategy has them)."""
        return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


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
