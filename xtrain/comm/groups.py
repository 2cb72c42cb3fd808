"""Process-group helpers shared by both comm implementations.

``SOLO`` stands for a one-member group: every collective on it is the
identity. The mesh hands it out for axes of degree 1, because torch reads
``group=None`` as the whole world.

Labels name a group in the ledger and in error messages. A group the mesh
named (``label_group``) carries its mesh axes ("dp", "tp", "dpxcp"); the
world is "world"; any other group is named by its global ranks in group
order, ``g[0,2]``. Two distinct groups over the same ranks never share a
label: the second one created is ``g[0,2]#2``, the third ``g[0,2]#3``
(creation order is the same on every rank, since ``new_group`` is called by
all of them, so every member reads the same label). Labels are cached per
group object, so a label costs one dictionary lookup per call.

``not_member(group)`` is torch's test for a rank calling a collective on a
group it does not belong to (``new_group`` hands such a rank the sentinel
``GroupMember.NON_GROUP_MEMBER``); those calls return without communicating.
"""

from __future__ import annotations

import warnings

import torch.distributed as dist


class SoloGroup:
    """A one-member process group: collectives on it move nothing."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "SOLO"


SOLO = SoloGroup()
NON_MEMBER = dist.GroupMember.NON_GROUP_MEMBER
_labels: dict[int, str] = {}
# id(group) -> (group, label): the group is held so that its id is never reused for another
_derived: dict[int, tuple[object, str]] = {}


def label_group(group, label: str) -> None:
    """Name ``group`` (first name wins: the same group may serve several axes)."""
    _labels.setdefault(id(group), label)
    _derived.pop(id(group), None)


def not_member(group) -> bool:
    """True where this rank is not in ``group`` (torch's ``_rank_not_in_group``)."""
    return group is not None and group.__class__ is int and group == NON_MEMBER


def warn_not_member(op: str) -> None:
    """torch's warning for a collective called on a group this rank is not in."""
    rank = dist.get_rank() if dist.is_initialized() else -1
    warnings.warn(f"Running {op} on global rank {rank} which does not belong to the given group.", stacklevel=4)


def group_label(group) -> str:
    if group is SOLO:
        return "solo"
    if group is None or group is dist.group.WORLD:
        return _labels.get(id(dist.group.WORLD), "world")
    key = id(group)
    label = _labels.get(key)
    if label is not None:
        return label
    hit = _derived.get(key)
    if hit is not None:
        return hit[1]
    label = _ranks_label(group)
    _derived[key] = (group, label)
    return label


def _ranks_label(group) -> str:
    if not_member(group):
        return "non-member"
    try:
        ranks = dist.get_process_group_ranks(group)
    except Exception:  # noqa: BLE001 - not a registered process group
        return "group"
    label = "g[" + ",".join(str(r) for r in ranks) + "]"
    # Other groups over the same ranks, in creation order (the same on every member).
    try:
        from torch.distributed.distributed_c10d import _world

        twins = [pg for pg, members in _world.pg_group_ranks.items() if sorted(members) == sorted(ranks)]
        if dist.group.WORLD is not None and sorted(ranks) == list(range(dist.get_world_size())):
            twins = [pg for pg in twins if pg is not dist.group.WORLD]
        k = next((i for i, pg in enumerate(twins) if pg is group), 0)
    except Exception:  # noqa: BLE001 - private API; fall back to the plain label
        k = 0
    return label if k == 0 else f"{label}#{k + 1}"


def group_size(group=None) -> int:
    if group is SOLO:
        return 1
    if not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    if group is SOLO:
        return 0
    if not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def group_ranks(group=None) -> list[int]:
    """Global ranks of the members of ``group``, in group-rank order."""
    if group is SOLO or not dist.is_initialized():
        return [dist.get_rank() if dist.is_initialized() else 0]
    return dist.get_process_group_ranks(group or dist.group.WORLD)


def to_global(group, group_rank_: int) -> int:
    """Global rank of group rank ``group_rank_`` of ``group`` (``None``: the world)."""
    if group is None or group is SOLO or group is dist.group.WORLD:
        return dist.get_rank() if group is SOLO else group_rank_
    return dist.get_global_rank(group, group_rank_)


def canonical_rank(group, global_rank, group_rank_, name: str, default=None) -> int | None:
    """torch's ``src``/``group_src`` (``dst``/``group_dst``) rule: one of the two, as a global rank.

    ``default`` is the global rank torch takes when neither is given (0 for
    gather and scatter); without one, a missing rank is an error, as in torch.
    """
    if group_rank_ is not None:
        if global_rank is not None:
            raise ValueError(f"Can't specify both {name} and group_{name} (got {name}={global_rank}, group_{name}={group_rank_})")
        return to_global(group, group_rank_)
    if global_rank is None:
        if default is None:
            raise ValueError(f"Must specify {name} or group_{name} (torch.distributed has no default for it either)")
        return default
    return global_rank
