"""Process-group helpers shared by both comm implementations.

``SOLO`` stands for a one-member group: every collective on it is the
identity. The mesh hands it out for axes of degree 1, because torch reads
``group=None`` as the whole world. Labels name a group by its mesh axes
("dp", "tp", "dpxcp") so the ledger and error messages can say which one.
"""

from __future__ import annotations

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
_labels: dict[int, str] = {}


def label_group(group, label: str) -> None:
    """Name ``group`` (first name wins: the same group may serve several axes)."""
    _labels.setdefault(id(group), label)


def group_label(group) -> str:
    if group is SOLO:
        return "solo"
    if group is None or group is dist.group.WORLD:
        return _labels.get(id(dist.group.WORLD), "world")
    return _labels.get(id(group), "group")


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
