"""One rank grid over named axes: coordinates, process groups, ring neighbours and pipeline roles.

The grid is ``arange(world).view(pp, dp, cp, ep, tp)`` (picotron's layout):
tp varies fastest, so tensor-parallel peers are neighbours on a node. A
rank's coordinate on an axis is its index along that dimension; its group on
an axis (or a tuple of axes) is the set of ranks that share every other
coordinate. Every strategy asks the mesh; nobody computes ranks by hand.

All groups are created once, in a fixed order, by every rank (torch requires
every process to take part in each ``new_group``), so later strategies add
axes or combinations without changing callers.

Roles (picotron's ``pp_is_first_stage``, ``pp_next_rank``): along an axis, the
previous and next rank without wrap-around (None at the ends), first and last;
and named role groups that are subsets of an axis: ``pp_ends`` is the first and
last pipeline rank of this rank's pp line (Megatron's embedding group, which
sums a tied embedding's two gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from xtrain.comm.groups import SOLO, label_group

AXES = ("pp", "dp", "cp", "ep", "tp")


class MeshError(ValueError):
    pass


def resolve_degrees(world_size: int, **degrees) -> dict[str, int]:
    """The grid's degrees: dp filled in (when absent or -1) from the world size.

    Expert parallelism borrows its ranks from data parallelism (torchtitan,
    Megatron): ``dp`` is the whole data-parallel degree, ep of those ranks hold
    different experts, so ep never multiplies the world size and must divide
    dp. The grid's dp dimension is then dp / ep (each expert's replicas).

    Raises MeshError with a message that names every degree when they cannot
    tile the world.
    """
    unknown = set(degrees) - set(AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; axes are {list(AXES)}")
    d = {a: int(degrees.get(a) if degrees.get(a) is not None else (-1 if a == "dp" else 1)) for a in AXES}
    for a, v in d.items():
        if v == 0 or v < -1 or (v == -1 and a != "dp"):
            raise MeshError(f"mesh degree {a}={v} is invalid (use a positive integer{'; -1 infers dp' if a == 'dp' else ''})")
    others = d["pp"] * d["cp"] * d["tp"]
    if d["dp"] == -1:
        if world_size % others:
            raise MeshError(
                f"world size {world_size} is not divisible by pp*cp*tp = "
                f"{d['pp']}*{d['cp']}*{d['tp']} = {others}, so dp cannot be inferred"
            )
        d["dp"] = world_size // others
    if others * d["dp"] != world_size:
        shown = "*".join(f"{a}={d[a]}" for a in AXES if a != "ep")
        raise MeshError(f"mesh degrees {shown} = {others * d['dp']} do not match world size {world_size}")
    if d["dp"] % d["ep"]:
        raise MeshError(
            f"ep={d['ep']} does not divide the data-parallel degree dp={d['dp']} "
            f"(expert parallelism borrows its ranks from dp)"
        )
    d["dp"] //= d["ep"]
    return d


@dataclass
class Mesh:
    """The rank grid of one job. Build it with ``Mesh.build``."""

    world_size: int
    rank: int
    degrees: dict[str, int]
    grid: torch.Tensor  # shape (pp, dp, cp, ep, tp) of global ranks
    _groups: dict[tuple[str, ...], object] = field(default_factory=dict, repr=False)
    _group_ranks: dict[tuple[str, ...], list[int]] = field(default_factory=dict, repr=False)
    _by_partition: dict[tuple, object] = field(default_factory=dict, repr=False)
    _timeout: object = field(default=None, repr=False)
    _coords: dict | None = field(default=None, repr=False)
    _roles: dict[str, tuple[object, list[int]]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, world_size: int, rank: int, combos=(("dp", "cp"), ("dp", "ep"), ("dp", "cp", "ep")), timeout=None,
              **degrees) -> "Mesh":
        """Resolve degrees and create a process group for every axis and combination.

        ``combos`` lists the multi-axis groups to create as well (the data axes:
        dp x cp x ep for dense gradients, dp x cp for experts' under ep).
        ``timeout`` (a timedelta) bounds collectives on the subgroups; by
        default they inherit the world group's, never torch's 30-minute default.
        """
        d = resolve_degrees(world_size, **degrees)
        grid = torch.arange(world_size).view(*(d[a] for a in AXES))
        mesh = cls(world_size, rank, d, grid)
        mesh._timeout = timeout if timeout is not None else _world_timeout()
        for axes in [(a,) for a in AXES] + [tuple(c) for c in combos]:
            mesh._make_group(axes)
        mesh._make_role("pp_ends", lambda line, i: {line[0], line[-1]}, "pp")
        mesh._make_role("pp_mirror", lambda line, i: {line[i], line[-1 - i]}, "pp")
        return mesh

    # -- coordinates ---------------------------------------------------
    @property
    def coords(self) -> dict[str, int]:
        if self._coords is None:  # read every step (batch slicing, loss weight): compute once
            self._coords = dict(zip(AXES, (self.grid == self.rank).nonzero()[0].tolist()))
        return dict(self._coords)

    def coord(self, axis: str) -> int:
        return self.coords[axis]

    def size(self, axes) -> int:
        n = 1
        for a in _as_axes(axes):
            n *= self.degrees[a]
        return n

    def __getattr__(self, name):
        # mesh.dp, mesh.tp_rank ... as conveniences over degrees and coords.
        if name in AXES:
            return self.degrees[name]
        if name.endswith("_rank") and name[:-5] in AXES:
            return self.coord(name[:-5])
        raise AttributeError(name)

    # -- groups --------------------------------------------------------
    def ranks(self, axes) -> list[int]:
        """Global ranks of this rank's group along ``axes``, ordered by coordinate."""
        axes = _as_axes(axes)
        return self._group_ranks[axes] if axes in self._group_ranks else self._ranks_of(axes, self.rank)

    def group(self, axes):
        """The process group along ``axes``. A one-member group is ``SOLO``, on
        which every xtrain.comm collective is the identity (never None, which
        torch reads as the whole world)."""
        axes = _as_axes(axes)
        if axes not in self._groups:
            raise KeyError(f"no group for axes {axes}; create it with Mesh.build(combos=...)")
        return self._groups[axes]

    def group_label(self, axes) -> str:
        return "x".join(_as_axes(axes))

    def neighbours(self, axis: str) -> tuple[int, int]:
        """(previous, next) global ranks on the ring along ``axis`` (wrapping around)."""
        ranks = self.ranks(axis)
        i = ranks.index(self.rank)
        return ranks[(i - 1) % len(ranks)], ranks[(i + 1) % len(ranks)]

    # -- roles along a line (no wrap-around: a pipeline, not a ring) -----------
    def prev_rank(self, axis: str) -> int | None:
        """The global rank before this one along ``axis``; None on the first."""
        ranks, i = self.ranks(axis), self.coord(axis)
        return ranks[i - 1] if i > 0 else None

    def next_rank(self, axis: str) -> int | None:
        """The global rank after this one along ``axis``; None on the last."""
        ranks, i = self.ranks(axis), self.coord(axis)
        return ranks[i + 1] if i + 1 < len(ranks) else None

    def is_first(self, axis: str) -> bool:
        return self.coord(axis) == 0

    def is_last(self, axis: str) -> bool:
        return self.coord(axis) == self.degrees[axis] - 1

    def rank_at(self, axis: str, coord: int) -> int:
        """The global rank with this rank's coordinates but ``coord`` on ``axis``."""
        return self.ranks(axis)[coord]

    def role_group(self, role: str):
        """The process group of a named role (``pp_ends``); SOLO when it has one member."""
        if role not in self._roles:
            raise KeyError(f"unknown mesh role {role!r}; roles are {sorted(self._roles)}")
        group, members = self._roles[role]
        if self.rank not in members:
            raise KeyError(f"rank {self.rank} is not in role {role} (members {members})")
        return group

    def role_ranks(self, role: str) -> list[int]:
        """Global ranks of this rank's role group (those of its line, if it is not a member)."""
        if role not in self._roles:
            raise KeyError(f"unknown mesh role {role!r}; roles are {sorted(self._roles)}")
        return self._roles[role][1]

    def _make_role(self, role: str, members_of, axis: str) -> None:
        """A role group partition along ``axis``: ``members_of(line, i)`` gives the
        role members for the rank at index i of a line (a list of global ranks).
        Every rank takes the same branch, as torch needs for ``new_group``."""
        partition, mine = [], None
        for r in range(self.world_size):
            line = self._ranks_of((axis,), r)
            members = sorted(members_of(line, line.index(r)))
            if members not in partition:
                partition.append(members)
            if r == self.rank:
                mine = members
        lines = {tuple(self._ranks_of((axis,), r)) for r in range(self.world_size)}
        if self.rank not in mine:
            group = None  # this rank has no part in the role (a middle stage for pp_ends)
        elif len(mine) == 1:
            group = SOLO
        elif {tuple(m) for m in partition} == lines:
            group = self.group(axis)  # the role is the whole line (pp=2)
        else:
            group = None
        if all(len(m) == 1 for m in partition) or {tuple(m) for m in partition} == lines:
            pass
        elif not dist.is_initialized():
            raise MeshError(f"role {role} needs torch.distributed to be initialized")
        else:
            made, _ = dist.new_subgroups_by_enumeration(partition, timeout=self._timeout)
            if self.rank in mine and len(mine) > 1:
                group = made
                label_group(group, role)
        self._roles[role] = (group, mine)

    def _ranks_of(self, axes, rank) -> list[int]:
        idx = (self.grid == rank).nonzero()[0].tolist()
        index = [slice(None) if a in axes else idx[i] for i, a in enumerate(AXES)]
        # members ordered by grid position (the earlier axis in AXES varies slowest)
        return self.grid[tuple(index)].flatten().tolist()

    def _make_group(self, axes):
        axes = _as_axes(axes)
        if axes in self._groups:
            return
        partition = []
        for r in range(self.world_size):
            members = self._ranks_of(axes, r)
            if members not in partition:
                partition.append(members)
        mine = self._ranks_of(axes, self.rank)
        self._group_ranks[axes] = mine
        key = tuple(map(tuple, partition))
        if len(mine) == 1:
            group = SOLO
        elif key in self._by_partition:  # e.g. (dp, cp) with cp=1 is the dp group
            group = self._by_partition[key]
        elif not dist.is_initialized():
            raise MeshError(f"a {len(mine)}-rank group on {axes} needs torch.distributed to be initialized")
        elif mine == list(range(self.world_size)):
            group = dist.group.WORLD
        else:
            group, _ = dist.new_subgroups_by_enumeration(partition, timeout=self._timeout)
        self._by_partition[key] = group
        self._groups[axes] = group
        if group is not SOLO:
            label_group(group, self.group_label(axes))

    def describe(self) -> str:
        text = " ".join(f"{a}={self.degrees[a]}" for a in AXES)
        if self.degrees["ep"] > 1:  # the grid's dp is each expert's replicas; say the data-parallel degree too
            text += f" (data parallel dp*ep = {self.degrees['dp'] * self.degrees['ep']})"
        return text


def _world_timeout():
    """The world group's collective timeout (None when it cannot be read)."""
    if not dist.is_initialized():
        return None
    try:
        return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # noqa: BLE001 - a backend without CPU options: torch's default applies
        return None


def _as_axes(axes) -> tuple[str, ...]:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    for a in axes:
        if a not in AXES:
            raise KeyError(f"unknown mesh axis {a!r}; axes are {list(AXES)}")
    return axes


def single_process_mesh() -> Mesh:
    return Mesh.build(1, 0)


__all__ = ["AXES", "Mesh", "MeshError", "resolve_degrees", "single_process_mesh"]
