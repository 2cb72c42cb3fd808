"""ZeRO stages 1-3 (Rajbhandari et al., "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", SC 2020) over the dp axis.

Parameters are grouped into flat groups, one per (unit, decay class): a unit is
a transformer block, the embedding, or the head (see ``flat.model_units``).
Rank r of n owns slice r of every group's padded flat buffer, and only that
slice has AdamW state. For Ψ fp32 parameters, per rank:

| stage | parameters | gradients | optimizer | total |
|---|---|---|---|---|
| ddp | 4Ψ | 4Ψ | 8Ψ | 16Ψ |
| zero1 | 4Ψ | 4Ψ | 8Ψ/n | 8Ψ + 8Ψ/n |
| zero2 | 4Ψ | 4Ψ/n | 8Ψ/n | 4Ψ + 12Ψ/n |
| zero3 | 4Ψ/n | 4Ψ/n | 8Ψ/n | 16Ψ/n + the gathered live units |

- zero1: full gradients accumulate as in DDP; after the last micro-batch they
  are reduce-scattered, each rank steps its slice, and the updated slices are
  all-gathered back into the full parameters.
- zero2: as each group's gradients complete during backward, they are copied
  into a flat bucket, the parameter gradients are freed, and the bucket is
  reduce-scattered (asynchronously) into the rank's gradient slice.
- zero3: parameters are slices at rest. A unit is all-gathered just before the
  forward of the first module that uses it and freed after the last one; it is
  gathered again when backward reaches it and freed once its gradients are
  reduce-scattered. The next ``prefetch`` units' gathers are issued ahead, so
  they travel while the current unit computes.

Communication per rank and step, in elements, with n ranks: zero1 and zero2
move (n-1)/n·Ψ in the reduce-scatter and (n-1)/n·Ψ in the all-gather, the
same 2Ψ(n-1)/n as DDP's all-reduce; zero3 gathers twice and reduce-scatters
once, 3Ψ(n-1)/n = 1.5× DDP.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from xtrain.checkpoint import SHARDS
from xtrain.comm import ReduceOp
from xtrain.parallel import placement as pl
from xtrain.parallel.base import Strategy, check_names
from xtrain.parallel.data import check_reduce_dtype, reduce_dtype_of
from xtrain.parallel.flat import FlatGroup, decay_split, model_units

EMPTY = torch.empty(0)


class ShardGroup:
    """One flat group: its layout, this rank's master slice and its gradient slice."""

    def __init__(self, name: str, named, n: int, rank: int, decay: bool, kind: tuple = ()):
        self.name, self.decay = name, decay
        # the members' shared non-replicated placements, ((axis, "shard"|"partial"|...), ...):
        # a group never mixes, so its flat slices line up across the ranks of those axes
        self.kind = kind
        self.layout = FlatGroup([nm for nm, _ in named], [p for _, p in named], shards=n)
        self.lo, self.hi = self.layout.shard_range(rank)
        p0 = self.layout.params[0]
        self.dtype, self.device = p0.dtype, p0.device
        self.full: torch.Tensor | None = None  # zero1/2: the whole flat parameter buffer
        self.shard: nn.Parameter | None = None  # this rank's master slice (what AdamW steps)
        self.grad_buffer: torch.Tensor | None = None  # zero1: whole flat gradients
        self.bucket: torch.Tensor | None = None  # zero2/3: gradients on their way out
        self.rs_out: torch.Tensor | None = None
        self.rs_work = None
        self.grad_shard: torch.Tensor | None = None  # this rank's slice of the reduced gradient
        self.pending = len(self.layout.params)
        self.sent = False  # zero3: this group's gradients went out in this backward
        self.group = None  # the ranks that hold its slices (its replicas over the data axes)
        self.scale = 1.0  # applied to the averaged gradient (1/ep for an expert; Strategy.grad_scale)

    @property
    def params(self):
        return self.layout.params


class Zero(Strategy):
    name = "zero"
    stage = 0
    supported_axes = ("pp", "dp", "cp", "ep", "tp")

    @classmethod
    def check(cls, options, degrees, world_size):
        problems = super().check(options, degrees, world_size) + check_reduce_dtype(options)
        if int(options.get("prefetch", 1)) < 0:
            problems.append(f"strategy.prefetch must be >= 0, got {options.get('prefetch')}")
        return problems

    # -- set-up ----------------------------------------------------------------------
    @torch.no_grad()
    def apply_data_parallel(self, model: nn.Module) -> nn.Module:
        # after the model transforms: ZeRO shards the local (tp, stage) parameters over dp
        self.group = self.data_group  # dp, or dp x cp under context parallel
        self.n, self.r = self.data_size, self.data_rank
        self.reduce_dtype = reduce_dtype_of(self.options)
        self.units: dict[str, list[ShardGroup]] = {}
        for unit, named in model_units(model):
            self.units[unit] = []
            for decay, part in zip((True, False), decay_split(named)):
                kinds = sorted({_kind(p) for _, p in part})
                for kind in kinds:
                    members = [(n, p) for n, p in part if _kind(p) == kind]
                    name = f"{unit}.{'decay' if decay else 'no_decay'}" + "".join(f".{a}_{k}" for a, k in kind)
                    # an expert (sharded over ep) is sliced over its replicas only: dp (x cp)
                    axes = self.replica_axes(members[0][1])
                    ranks = self.mesh.ranks(axes)
                    g = ShardGroup(name, members, len(ranks), ranks.index(self.mesh.rank), decay, kind)
                    g.group, g.scale = self.mesh.group(axes), self.grad_scale(axes)
                    self.units[unit].append(g)
        self.groups = [g for gs in self.units.values() for g in gs]
        self.unit_of_group = {g.name: unit for unit, gs in self.units.items() for g in gs}
        for g in self.groups:
            full = g.layout.flatten([p.detach() for p in g.params])
            if self.stage == 3:
                g.shard = nn.Parameter(full[g.lo : g.hi].clone())
                for p in g.params:
                    p.data = EMPTY.to(g.device, g.dtype)
            else:
                g.full = full
                for p, view in zip(g.params, g.layout.views(full)):
                    p.data = view
                g.shard = nn.Parameter(full[g.lo : g.hi])  # a view: stepping it updates the full buffer
            if self.stage == 1:
                g.grad_buffer = torch.zeros_like(full)
                for p, view in zip(g.params, g.layout.views(g.grad_buffer)):
                    p.grad = view
            else:
                for i, p in enumerate(g.params):
                    p.register_post_accumulate_grad_hook(self._grad_ready_hook(g, i))
        return model

    def build_optimizer(self, model, train_cfg):
        decay = [g.shard for g in self.groups if g.decay]
        no_decay = [g.shard for g in self.groups if not g.decay]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=train_cfg.lr,
            betas=tuple(train_cfg.betas),
            eps=train_cfg.eps,
        )

    # -- gradients -------------------------------------------------------------------------
    def _grad_ready_hook(self, g: ShardGroup, i: int):
        def on_grad_ready(p: torch.Tensor) -> None:
            if g.bucket is None:
                self._finish_reduce(g)  # the previous micro-batch's reduce-scatter, if any
                g.bucket = torch.zeros(g.layout.padded_numel, dtype=self.reduce_dtype, device=g.device)
            o = g.layout.offsets[i]
            g.bucket[o : o + g.layout.numels[i]].view_as(p.grad).copy_(p.grad)
            p.grad = None  # this rank keeps only its slice of the gradient
            g.pending -= 1
            if g.pending == 0:
                self._start_reduce(g, g.bucket)
                g.bucket, g.pending = None, len(g.params)
                self._after_group_reduced(g)

        return on_grad_ready

    def _after_group_reduced(self, g: ShardGroup) -> None:
        pass

    def _start_reduce(self, g: ShardGroup, flat: torch.Tensor) -> None:
        g.rs_out = torch.empty(g.layout.shard_numel, dtype=flat.dtype, device=flat.device)
        g.rs_work = self.comm.reduce_scatter_tensor(g.rs_out, flat, op=ReduceOp.AVG, group=g.group, async_op=True)

    def _finish_reduce(self, g: ShardGroup) -> None:
        """Wait for the group's reduce-scatter and add it into the gradient slice."""
        if g.rs_work is None:
            return
        g.rs_work.wait()
        out = g.rs_out.to(g.dtype)
        if g.scale != 1:
            out.mul_(g.scale)
        if self.stage == 1:
            g.grad_buffer[g.lo : g.hi].copy_(out)  # the slice lives in the full buffer: no extra 4Ψ/n
            g.grad_shard = g.grad_buffer[g.lo : g.hi]
        elif g.grad_shard is None:
            g.grad_shard = out
        else:
            g.grad_shard += out
        g.rs_work = g.rs_out = None

    @torch.no_grad()
    def reduce_gradients(self, model: nn.Module) -> None:
        if self.stage == 1:
            for g in self.groups:
                flat = g.grad_buffer if self.reduce_dtype == g.dtype else g.grad_buffer.to(self.reduce_dtype)
                self._start_reduce(g, flat)
        for g in self.groups:
            if g.bucket is not None:  # some parameter got no gradient: send what there is
                self._start_reduce(g, g.bucket)
                g.bucket, g.pending = None, len(g.params)
            self._finish_reduce(g)
            g.shard.grad = g.grad_shard if g.grad_shard is not None else torch.zeros_like(g.shard)
        # replicated with partial gradients (norms under sp, a tied embedding under pp):
        # dp slices line up across the group's ranks, so the slices are summed as they are
        pl.reduce_partial_grads([(g.params[0], g.shard.grad) for g in self.groups], self.comm, self.mesh)

    def _norm_axes(self) -> list[str]:
        # Every rank holds distinct slices over the data axes (ep included), so those
        # sum in the data group; the model axes beyond them (tp, pp) sum as usual.
        return [a for a in self.model_axes if a not in self.data_axes]

    def grad_norm_groups(self) -> list:
        return [self.group, *(self.mesh.group(a) for a in self._norm_axes())]

    def local_grads(self, model: nn.Module) -> list[torch.Tensor]:
        return [g.shard.grad for g in self.groups if g.shard.grad is not None]

    def counted_grads(self, model: nn.Module) -> list[torch.Tensor]:
        return [
            g.shard.grad
            for g in self.groups
            if g.shard.grad is not None and pl.counts_in_norm(g.params[0], self._norm_axes(), self.mesh)
        ]

    def zero_grad(self, model: nn.Module, optimizer) -> None:
        for g in self.groups:
            g.shard.grad = None
            g.grad_shard = None
            if g.grad_buffer is not None:
                g.grad_buffer.zero_()

    # -- parameters ---------------------------------------------------------------------------
    @torch.no_grad()
    def optimizer_step(self, optimizer) -> None:
        optimizer.step()
        if self.stage == 3:
            return  # the slices are the parameters
        works = [
            self.comm.all_gather_into_tensor(g.full, g.full[g.lo : g.hi].clone(), group=g.group, async_op=True)
            for g in self.groups
        ]
        for w in works:
            w.wait()

    @torch.no_grad()
    def _gather_full(self, g: ShardGroup) -> torch.Tensor:
        if g.full is not None:
            return g.full
        full = torch.empty(g.layout.padded_numel, dtype=g.dtype, device=g.device)
        self.comm.all_gather_into_tensor(full, g.shard.detach(), group=g.group)
        return full

    @torch.no_grad()
    def _gather_slices(self, g: ShardGroup, t: torch.Tensor) -> torch.Tensor:
        full = torch.empty(g.layout.padded_numel, dtype=t.dtype, device=t.device)
        self.comm.all_gather_into_tensor(full, t.detach().contiguous(), group=g.group)
        return full

    def full_state(self, model, optimizer):
        """Whole tensors by name: the dp slices gathered, then the tp shards. Collective."""
        params, optim = self.local_parameters(model), {}
        for g in self.groups:
            st = optimizer.state.get(g.shard, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    for name, p, view in zip(g.layout.names, g.params, g.layout.views(self._gather_slices(g, st[key]))):
                        optim.setdefault(name, {})[key] = self._whole(view, p).cpu().clone()
            if "step" in st:
                for name in g.layout.names:
                    optim.setdefault(name, {})["step"] = st["step"].detach().cpu().clone()
        return params, optim

    def local_parameters(self, model):
        params = {}
        for g in self.groups:
            for name, p, view in zip(g.layout.names, g.params, g.layout.views(self._gather_full(g))):
                params[name] = self._whole(view, p).float().cpu().clone()
        return params

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint_files(self, model, optimizer):
        """Each rank writes its slice of every group; rank 0 writes the layout.
        Under tp, groups are per tp rank (``tp1/blocks.0.decay.tp_shard``) and the
        layout records how each name's tp shards join back (``tp_shards``);
        under pp, per stage (``pp1/head.decay``). The dp-rank-0 member of each
        dp line writes the manifest of its groups (rank 0's is ``shards.json``).
        When some groups are sliced over other ranks than the data line (experts
        under ep, over their replicas only), the manifest could not name their
        holders: the checkpoint is written whole instead (the canonical form)."""
        if any(g.group is not self.group for g in self.groups):
            return Strategy.checkpoint_files(self, model, optimizer)
        tp, t = self.mesh.degrees["tp"], self.mesh.coord("tp")
        # groups differ per tp rank and per pipeline stage: their names say whose they are
        prefix = (f"pp{self.mesh.coord('pp')}/" if self.mesh.degrees["pp"] > 1 else "") + (f"tp{t}/" if tp > 1 else "")
        tensors = {}
        for g in self.groups:
            tensors[f"{prefix}{g.name}/param"] = g.shard.detach()
            for key, v in optimizer.state.get(g.shard, {}).items():
                tensors[f"{prefix}{g.name}/{key}"] = v.detach().reshape(-1) if key == "step" else v.detach()
        files = {f"shard_rank{self.mesh.rank}.safetensors": tensors}
        if self.r == 0:  # one manifest per data line (dp, or dp x cp): its peers, in order, hold the slices
            holders = [f"shard_rank{rk}.safetensors" for rk in self.mesh.ranks(tuple(self.data_axes))]
            name = SHARDS if self.mesh.rank == 0 else SHARDS.replace(".json", f"_rank{self.mesh.rank}.json")
            files[name] = {
                "strategy": self.name,
                "dp": self.n,
                "tp": tp,
                "groups": {f"{prefix}{g.name}": {**g.layout.layout(), "files": holders, "tp_rank": t} for g in self.groups},
                "tp_shards": {
                    name: vars(spec)
                    for g in self.groups
                    for name, p in zip(g.layout.names, g.params)
                    if isinstance(spec := pl.placement(p, "tp"), pl.Shard)
                },
            }
        return files

    @torch.no_grad()
    def load_full_state(self, model, optimizer, params, optim):
        check_names(self.canonical, params)
        for g in self.groups:
            full = g.layout.flatten([pl.local_piece(params[n], p) for n, p in zip(g.layout.names, g.params)])
            g.shard.copy_(full[g.lo : g.hi])
            if g.full is not None:
                g.full.copy_(full)
            names = [n for n in g.layout.names if n in optim]
            if names:
                state = {
                    key: g.layout.flatten([pl.local_piece(optim[n][key], p) for n, p in zip(g.layout.names, g.params)])[
                        g.lo : g.hi
                    ].clone()
                    for key in ("exp_avg", "exp_avg_sq")
                }
                state["step"] = optim[names[0]]["step"].reshape(()).clone()
                optimizer.state[g.shard] = state

    # -- accounting ---------------------------------------------------------------------------------
    def param_tensors(self, model):
        return [g.full if g.full is not None else g.shard for g in self.groups]

    def grad_tensors(self, model):
        if self.stage == 1:
            return [g.grad_buffer for g in self.groups]
        return [g.shard.grad for g in self.groups]


def _kind(p) -> tuple:
    """A parameter's non-replicated placements, ((axis, "shard"|"partial"), ...), sorted."""
    return tuple(sorted((a, type(x).__name__.lower()) for a, x in pl.placements(p).items() if not isinstance(x, (pl.Replicate, pl.Owned))))


class Zero1(Zero):
    name = "zero1"
    stage = 1


class Zero2(Zero):
    name = "zero2"
    stage = 2


class Zero3(Zero):
    """Parameters sharded at rest; see the module docstring for the gather schedule."""

    name = "zero3"
    stage = 3
    supported_axes = ("dp", "cp", "ep")

    @torch.no_grad()
    def apply_data_parallel(self, model: nn.Module) -> nn.Module:
        # Consumers: the modules that use parameters, in forward order (the
        # embedding, each block, then the rest), and the units each one needs.
        unit_of = {}
        model = super().apply_data_parallel(model)
        for unit, gs in self.units.items():
            for g in gs:
                for p in g.params:
                    unit_of[id(p)] = unit
        children = dict(model.named_children())
        consumers = []
        for name, child in children.items():
            mods = list(child) if name == "blocks" else [child]
            for m in mods:
                needs = sorted({unit_of[id(p)] for p in m.parameters() if id(p) in unit_of}, key=list(self.units).index)
                if needs:
                    consumers.append((m, needs))
        self.consumers = consumers
        self.last_forward_use = {u: max(i for i, (_, needs) in enumerate(consumers) if u in needs) for u in self.units}
        self.state = dict.fromkeys(self.units, "free")  # free | gathering | gathered
        self.inflight: dict[str, list] = {}
        self.prefetch = int(self.options.get("prefetch", 1))
        self.gathered_bytes = self.peak_gathered_bytes = 0
        for i, (m, _) in enumerate(consumers):
            m.register_forward_pre_hook(self._pre_forward(i))
            m.register_forward_hook(self._post_forward(i))
        return model

    # gathering and freeing one unit
    def _start_gather(self, unit: str) -> None:
        if self.state[unit] != "free":
            return
        pending = []
        for g in self.units[unit]:
            full = torch.empty(g.layout.padded_numel, dtype=g.dtype, device=g.device)
            work = self.comm.all_gather_into_tensor(full, g.shard.detach(), group=g.group, async_op=True)
            pending.append((g, full, work))
            self.gathered_bytes += full.untyped_storage().nbytes()
        self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes)
        self.inflight[unit] = pending
        self.state[unit] = "gathering"

    def _ensure_gathered(self, unit: str) -> None:
        self._start_gather(unit)
        if self.state[unit] == "gathering":
            for g, full, work in self.inflight.pop(unit):
                work.wait()
                for p, view in zip(g.params, g.layout.views(full)):
                    p.data = view
            self.state[unit] = "gathered"

    def _free(self, unit: str) -> None:
        if self.state[unit] == "gathering":
            self._ensure_gathered(unit)
        if self.state[unit] == "gathered":
            for g in self.units[unit]:
                self.gathered_bytes -= g.params[0].untyped_storage().nbytes()  # the gathered flat buffer
                for p in g.params:
                    p.data = EMPTY.to(g.device, g.dtype)
            self.state[unit] = "free"

    # the hooks
    def _pre_forward(self, i: int):
        def hook(module, args):
            for unit in self.consumers[i][1]:
                self._ensure_gathered(unit)
            for j in range(i + 1, min(i + 1 + self.prefetch, len(self.consumers))):
                for unit in self.consumers[j][1]:
                    self._start_gather(unit)

        return hook

    def _post_forward(self, i: int):
        def hook(module, args, output):
            for unit in self.consumers[i][1]:
                if self.last_forward_use[unit] == i:
                    self._free(unit)
            if torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad:
                output.register_hook(self._pre_backward(i))
            return output

        return hook

    def _pre_backward(self, i: int):
        def hook(grad):
            with torch.no_grad():
                for unit in self.consumers[i][1]:
                    self._ensure_gathered(unit)
                for j in range(i - 1, max(i - 1 - self.prefetch, -1), -1):
                    for unit in self.consumers[j][1]:
                        self._start_gather(unit)
            return grad

        return hook

    def _after_group_reduced(self, g: ShardGroup) -> None:
        # Free the unit once every one of its groups has sent its gradients in this backward.
        g.sent = True
        unit = self.unit_of_group[g.name]
        if all(x.sent for x in self.units[unit]):
            for x in self.units[unit]:
                x.sent = False
            self._free(unit)

    def reduce_gradients(self, model):
        super().reduce_gradients(model)
        for unit in self.units:  # nothing stays gathered between steps
            self._free(unit)

    def model_state_bytes(self, model, optimizer):
        out = super().model_state_bytes(model, optimizer)
        out["gathered_peak"] = self.peak_gathered_bytes
        return out

    def param_tensors(self, model):
        return [g.shard for g in self.groups]

