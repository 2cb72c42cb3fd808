"""The strategy interface: transforms applied from outside to a plain model,
its optimizer and its training step.

``parallelize`` applies the model transforms in a fixed order (pipeline
split, tensor parallel, context parallel, expert parallel, MoE balancing;
torchtitan's order), builds the step runner
(the plain micro-batch loop, or the pipeline executor), then the data-parallel
flavour of the subclass. The trainer then calls, per optimizer step::

    x, y = strategy.take_columns(x, y)        # cp: this rank's columns of each sequence
    strategy.begin_step(x, y, micro_batches, autocast)
    loss = strategy.runner.forward_backward(x, y, micro_batches, autocast)
    strategy.reduce_gradients(model)
    norm = strategy.clip_grad_norm_(model, max_norm)
    strategy.optimizer_step(optimizer)
    figures = strategy.end_step()             # step hooks: MoE balancing's global load
    strategy.zero_grad(model, optimizer)

The runner wraps the last backward of each model chunk in the step in
``strategy.grads_final(chunk)``: the data-parallel flavours start their
gradient reduction there (ddp arms that chunk's buckets).

Everything generic here reads the parameters' placement marks
(``xtrain.parallel.placement``), never a mesh axis by name: each transform
marks what it changes, adds the axes it splits the model over to
``model_axes``, the axes that split the batch to ``batch_axes`` (rows) or
``seq_layout`` (columns) and ``data_axes`` (each rank's loss a share of the
mean: gradients average there), and may replace ``loss_fn`` or
``runner_cls`` or add a step hook.
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
from xtrain.parallel import placement as pl
from xtrain.parallel.runner import MicroBatchRunner


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class Strategy:
    name = "base"
    # Mesh axes this strategy knows how to use with a degree above 1.
    supported_axes: tuple[str, ...] = ()
    # Whether it runs without torch.distributed (only `single`).
    single_process = False
    # Model transforms, in the order they apply: functions (strategy, model) -> model
    # that return the model unchanged when their axis has degree 1 (set in xtrain.parallel).
    transforms: tuple = ()

    def __init__(self, mesh: Mesh, comm: Comm, options):
        self.mesh, self.comm, self.options = mesh, comm, options
        self.loss_fn = cross_entropy  # a transform may replace it (tp: vocab-parallel)
        self.model_axes: list[str] = []  # axes the model is split over: the grad norm sums there
        self.loss_counts = True  # whether this rank's loss enters the global mean
        self.eval_loss_counts = True  # the same for the validation loss (a pipeline's eval path may differ)
        self.seq_parts = 1  # parts this rank's sequence activations are split into between blocks (sp)
        self.batch_axes: list[str] = ["dp"]  # axes the batch's sequences are split over (ep joins)
        self.data_axes: list[str] = ["dp"]  # axes each rank's loss is one share of: gradients average there (cp, ep join)
        self.step_hooks: list = []  # objects with begin(x, y, micro_batches, autocast) and end() -> figures (MoE balancing)
        self.seq_layout = None  # which columns of each sequence this rank holds (cp); None: all
        self.runner_cls = MicroBatchRunner
        self.runner = None
        self.canonical: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # the whole model's parameters

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
        """This rank's slice of the batch's sequences (over ``batch_axes``)."""
        return self.mesh.ranks(tuple(self.batch_axes)).index(self.mesh.rank)

    @property
    def dp_size(self) -> int:
        return self.mesh.size(self.batch_axes)

    @property
    def data_group(self):
        """The group gradients are averaged over (and ZeRO shards over): ``data_axes``."""
        return self.mesh.group(tuple(self.data_axes))

    @property
    def data_size(self) -> int:
        return self.mesh.size(self.data_axes)

    @property
    def data_rank(self) -> int:
        return self.mesh.ranks(tuple(self.data_axes)).index(self.mesh.rank)

    def replica_axes(self, p: torch.Tensor) -> tuple[str, ...]:
        """The data axes ``p`` is replicated over: its gradient is summed there
        (an expert sharded over ep is summed over dp x cp only)."""
        return tuple(a for a in self.data_axes if not isinstance(pl.placement(p, a), (pl.Shard, pl.Owned)))

    def grad_scale(self, axes: tuple[str, ...]) -> float:
        """What an average over ``axes`` must be multiplied by to be the gradient:
        |axes| / |data axes| (1 unless ``p`` is sharded over some data axis:
        its holders see all the shares of those axes' ranks already)."""
        return self.mesh.size(axes) / self.data_size

    def begin_step(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int, autocast) -> None:
        for hook in self.step_hooks:
            hook.begin(x, y, micro_batches, autocast)

    def end_step(self) -> dict:
        """After the optimizer step: every hook's figures for metrics.jsonl (collective)."""
        figures = {}
        for hook in self.step_hooks:
            figures.update(hook.end())
        return figures

    def take_columns(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's columns of a batch of whole sequences (all of them unless cp)."""
        if self.seq_layout is None:
            return x, y
        cols = self.seq_layout.columns(x.shape[1])
        return x[:, cols], y[:, cols]

    def positions(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rotary positions of the columns of ``x`` (this rank's tokens); None: 0..T-1."""
        return None if self.seq_layout is None else self.seq_layout.positions(x.shape[1], x.device)

    def loss_weight(self, eval: bool = False) -> float:
        """1 if this rank's (training or validation) loss counts in the global mean
        (0 for replicas of another's, or a rank that computes no loss)."""
        return 1.0 if (self.eval_loss_counts if eval else self.loss_counts) else 0.0

    # -- the transform ------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        self.canonical = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
        for transform in self.transforms:
            model = transform(self, model)
        self.runner = self.runner_cls(self, model)
        return self.apply_data_parallel(model)

    def apply_data_parallel(self, model: nn.Module) -> nn.Module:
        """The data-parallel flavour, over the runner's chunks (subclasses)."""
        return model

    def grads_final(self, chunk: nn.Module):
        """Context for the last backward of ``chunk`` in this step: its gradients
        are complete once it exits, so their reduction may start."""
        return contextlib.nullcontext()

    def reduce_gradients(self, model: nn.Module) -> None:
        self.reduce_partial_grads(model)

    def reduce_partial_grads(self, model: nn.Module) -> None:
        """Sum every gradient marked Partial over its group (norms under sequence
        parallel, a tied embedding's two pipeline copies)."""
        pl.reduce_partial_grads([(p, p.grad) for p in model.parameters()], self.comm, self.mesh)

    def grad_norm_groups(self) -> list:
        """Groups over which this rank's counted gradients are partitioned."""
        return [self.mesh.group(a) for a in self.model_axes]

    def local_grads(self, model: nn.Module) -> list[torch.Tensor]:
        """Every gradient the optimizer on this rank will step with."""
        return [p.grad for p in model.parameters() if p.grad is not None]

    def counted_grads(self, model: nn.Module) -> list[torch.Tensor]:
        """The gradients that enter the norm on this rank, so that summing over
        ``grad_norm_groups`` counts every element once (a replica counts on its
        first holder only)."""
        return [
            p.grad for p in model.parameters() if p.grad is not None and pl.counts_in_norm(p, self.model_axes, self.mesh)
        ]

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global-norm clipping that is correct across shards: the squared norm is
        summed locally, reduced over the shard groups, and every rank applies the
        same scale min(1, max_norm / (norm + 1e-6)) (as torch's clip_grad_norm_)."""
        grads, counted = self.local_grads(model), self.counted_grads(model)
        device = grads[0].device if grads else next((b.device for b in model.buffers()), None)
        if counted:  # one fused kernel per dtype, as torch's clip_grad_norm_
            norm_sq = torch.stack(torch._foreach_norm(counted)).float().pow(2).sum()
        else:
            norm_sq = torch.zeros((), device=device)
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
        """Files this rank writes: name -> content. Each tensor is written whole,
        once, by its primary holder (every rank joins the gathers of shards
        first); rank 0's files are ``model.safetensors`` and ``optim.safetensors``,
        another primary's (a pipeline stage's) carry its rank."""
        params, optim = self.full_state(model, optimizer)
        primary = [n for n, p in model.named_parameters() if pl.is_primary(p, self.mesh)]
        if not primary:
            return {}
        suffix = "" if self.mesh.rank == 0 else f"_rank{self.mesh.rank}"
        return {
            f"model{suffix}.safetensors": {n: params[n] for n in primary},
            f"optim{suffix}.safetensors": optim_to_flat_dict({n: optim[n] for n in primary if n in optim}),
        }

    def buffer_files(self, model: nn.Module) -> dict[str, object]:
        """The persistent buffers this rank writes (a router's selection bias):
        replicated state outside the optimizer, written by its primary holder."""
        mine = {n: b.detach().cpu().clone() for n, b in persistent_buffers(model) if pl.is_primary(b, self.mesh)}
        if not mine:
            return {}
        return {f"buffers{'' if self.mesh.rank == 0 else f'_rank{self.mesh.rank}'}.safetensors": mine}

    @torch.no_grad()
    def load_buffers(self, model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
        for n, b in persistent_buffers(model):
            if n in buffers:
                b.copy_(buffers[n])

    def _whole(self, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``t`` (a parameter or a state shaped like it) whole: gathered over its shard axes."""
        return pl.whole(t, p, self.comm, self.mesh)

    def full_state(self, model: nn.Module, optimizer):
        """(parameters by name, AdamW state by name) held here, whole, on CPU.
        Collective over the shard axes."""
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
        """Load the canonical form: each rank keeps its piece of every tensor it holds."""
        check_names(self.canonical, params)
        for n, p in model.named_parameters():
            p.copy_(pl.local_piece(params[n], p))
            if n in optim:
                optimizer.state[p] = {
                    k: v.clone() if k == "step" else pl.local_piece(v, p).to(p.device).clone()
                    for k, v in optim[n].items()
                }

    def local_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter held here, whole, on CPU in fp32 (collective over shard axes)."""
        return {n: self._whole(p, p).float().cpu().clone() for n, p in model.named_parameters()}

    def full_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter of the whole model, on CPU in fp32, complete on rank 0
        (other ranks get those they hold). A collective."""
        local = self.local_parameters(model)
        if self.mesh.world_size == 1:
            return local
        return self._collect_on_rank0(local, {n for n, p in model.named_parameters() if pl.is_primary(p, self.mesh)})

    def _collect_on_rank0(self, local: dict, primary: set) -> dict:
        """Bring to rank 0 the tensors that only other ranks hold: every rank names
        the primary holder of each canonical parameter (one all-reduce), then
        each holder sends its tensors to rank 0."""
        names = sorted(self.canonical)
        device = next(iter(self.runner.chunks[0].parameters())).device if self.runner else torch.device("cpu")
        mine = [n in primary for n in names]
        owner = torch.tensor([self.mesh.rank + 1 if m else 0 for m in mine] + [float(m) for m in mine],
                             dtype=torch.float64, device=device)
        self.comm.all_reduce(owner, op=ReduceOp.SUM)
        owner, holders = owner.long().tolist()[: len(names)], owner.long().tolist()[len(names):]
        wrong = [f"{n} ({h} primary holders)" for n, h in zip(names, holders) if h != 1]
        if wrong:  # a transform's marks are inconsistent: fail on every rank instead of waiting forever
            raise RuntimeError(f"full_parameters: each parameter needs one primary holder: {', '.join(wrong[:5])}")
        out = dict(local)
        for n, o in zip(names, owner):
            src = o - 1
            if src == 0:
                continue
            if self.mesh.rank == src:
                self.comm.send(local[n].to(device), dst=0)
            elif self.mesh.rank == 0:
                buf = torch.empty(self.canonical[n][0], dtype=torch.float32, device=device)
                self.comm.recv(buf, src=src)
                out[n] = buf.cpu()
        return out


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


def persistent_buffers(model: nn.Module):
    """(name, buffer) of every buffer a state_dict would hold (not the rope tables)."""
    for mod_name, mod in model.named_modules():
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{n}" if mod_name else n), b


def check_names(expected_names, params: dict) -> None:
    """A checkpoint must hold exactly the whole model's parameters."""
    expected = set(expected_names)
    missing, extra = expected - params.keys(), params.keys() - expected
    if missing or extra:
        raise ValueError(f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")


class Single(Strategy):
    """One process, no torch.distributed: the reference every strategy must match."""

    name = "single"
    single_process = True
