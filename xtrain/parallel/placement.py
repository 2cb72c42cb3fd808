"""Placements: how a parameter lies on each mesh axis, the one vocabulary every
parallel transform marks its parameters with (as DTensor's ``Shard(dim)``,
``Replicate()`` and ``Partial()`` in torchtitan).

- ``Replicate()`` (the default for an unmarked axis): every rank of the axis
  holds the same tensor and computes the same, complete gradient.
- ``Partial(role=None)``: the same tensor on every holder, but each holder's
  gradient is a partial sum; the sum over the axis group (or over the mesh's
  ``role`` group, a subset of the axis: the pipeline's first and last stage for
  a tied embedding) is the true gradient.
- ``Shard(dim, parts, rank, full_size)``: this rank holds chunk ``rank`` of
  ``parts`` equal chunks along ``dim`` of a tensor ``full_size`` long there
  (chunks are ceil(full_size / parts); the last is zero-padded: the vocabulary).
- ``Owned()``: only this rank of the axis holds the parameter (a pipeline
  stage's layers): it is whole here and absent elsewhere.

Generic code (gradient-norm counting, clipping, whole tensors for checkpoints,
loading, partial-gradient reduction) reads these marks and never names an axis;
a new axis is a new transform that marks its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xtrain.comm import SOLO, ReduceOp
from xtrain.comm.groups import group_size

MARKS = "_xtrain_placements"


@dataclass(frozen=True)
class Replicate:
    pass


@dataclass(frozen=True)
class Partial:
    role: str | None = None  # a mesh role group (subset of the axis); None: the whole axis


@dataclass(frozen=True)
class Shard:
    dim: int
    parts: int
    rank: int
    full_size: int

    @property
    def chunk(self) -> int:
        return -(-self.full_size // self.parts)

    @property
    def start(self) -> int:
        return self.rank * self.chunk


@dataclass(frozen=True)
class Owned:
    pass


REPLICATE = Replicate()


def mark(p: torch.Tensor, axis: str, placement) -> torch.Tensor:
    """Record ``placement`` of ``p`` on ``axis``; returns ``p``."""
    marks = dict(getattr(p, MARKS, {}))
    marks[axis] = placement
    setattr(p, MARKS, marks)
    return p


def carry_marks(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Give ``new`` (a parameter a transform made from ``old``) ``old``'s marks on
    other axes, so a later transform keeps what an earlier one said; returns ``new``."""
    for axis, pl in getattr(old, MARKS, {}).items():
        if axis not in getattr(new, MARKS, {}):
            mark(new, axis, pl)
    return new


def placement(p: torch.Tensor, axis: str):
    return getattr(p, MARKS, {}).get(axis, REPLICATE)


def placements(p: torch.Tensor) -> dict:
    return dict(getattr(p, MARKS, {}))


def shard_specs(p: torch.Tensor) -> list[tuple[str, Shard]]:
    return [(a, pl) for a, pl in getattr(p, MARKS, {}).items() if isinstance(pl, Shard)]


def partial_groups(p: torch.Tensor) -> list[tuple[str, str | None]]:
    """(axis, role) of every group over which ``p``'s gradient is a partial sum."""
    return [(a, pl.role) for a, pl in getattr(p, MARKS, {}).items() if isinstance(pl, Partial)]


# -- shards <-> whole tensors -------------------------------------------------------------


def shard_tensor(full: torch.Tensor, spec: Shard) -> torch.Tensor:
    """Chunk ``spec.rank`` of ``full`` along ``spec.dim`` (a copy, zero-padded at the end)."""
    if full.shape[spec.dim] != spec.full_size:
        raise ValueError(f"full tensor has size {full.shape[spec.dim]} along dim {spec.dim}, expected {spec.full_size}")
    padded = spec.chunk * spec.parts
    if padded != spec.full_size:
        pad_shape = list(full.shape)
        pad_shape[spec.dim] = padded - spec.full_size
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=spec.dim)
    return full.narrow(spec.dim, spec.start, spec.chunk).clone()


def local_piece(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` laid out like ``p`` (every Shard applied); ``full`` if none."""
    for _, spec in shard_specs(p):
        full = shard_tensor(full, spec)
    return full


def gather_along(local: torch.Tensor, dim: int, comm, group) -> torch.Tensor:
    """Concatenate every rank's ``local`` along ``dim`` (group-rank order). Collective."""
    n = group_size(group)
    if n == 1:
        return local
    x0 = local.movedim(dim, 0).contiguous()
    out = torch.empty((n * x0.shape[0], *x0.shape[1:]), dtype=x0.dtype, device=x0.device)
    comm.all_gather_into_tensor(out, x0, group=group)
    return out.movedim(0, dim).contiguous()


def whole(t: torch.Tensor, p: torch.Tensor, comm, mesh) -> torch.Tensor:
    """``t`` (``p`` itself, its gradient, or an optimizer state shaped like it) whole
    over every axis ``p`` is sharded on. Collective over those axes' groups."""
    t = t.detach()
    for axis, spec in reversed(shard_specs(p)):
        t = gather_along(t, spec.dim, comm, mesh.group(axis)).narrow(spec.dim, 0, spec.full_size)
    return t


# -- who counts, who writes ---------------------------------------------------------------


def _first_holder(pl, axis: str, mesh) -> bool:
    if isinstance(pl, Partial) and pl.role is not None:
        return mesh.role_ranks(pl.role)[0] == mesh.rank
    return mesh.coord(axis) == 0


def counts_in_norm(p: torch.Tensor, axes, mesh) -> bool:
    """Whether this rank adds ``p``'s gradient to the squared norm that is summed
    over ``axes``, so that each element counts once: shards and owned tensors on
    every rank, replicas on their first holder only."""
    return all(
        isinstance(pl, (Shard, Owned)) or _first_holder(pl, a, mesh) for a in axes for pl in (placement(p, a),)
    )


def is_primary(p: torch.Tensor, mesh) -> bool:
    """Whether this rank writes ``p`` whole (after gathering its shards): the first
    holder on every axis where it is not owned outright."""
    return all(
        isinstance(pl, Owned) or _first_holder(pl, a, mesh)
        for a, d in mesh.degrees.items()
        if d > 1
        for pl in (placement(p, a),)
    )


@torch.no_grad()
def reduce_partial_grads(grads_by_param, comm, mesh) -> None:
    """Sum over its group every gradient marked partial: one flat all-reduce per
    (axis, role) group, in a fixed order. ``grads_by_param`` is [(param, grad)];
    every holder in a group must call this with the same parameters in order."""
    buckets: dict[tuple[str, str | None], list[torch.Tensor]] = {}
    for p, g in grads_by_param:
        if g is None:
            continue
        for key in partial_groups(p):
            buckets.setdefault(key, []).append(g)
    for (axis, role), grads in sorted(buckets.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        group = mesh.role_group(role) if role is not None else mesh.group(axis)
        if group is SOLO:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        comm.all_reduce(flat, op=ReduceOp.SUM, group=group)
        for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(piece.view_as(g))
