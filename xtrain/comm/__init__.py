"""Collectives behind one interface, selected by ``comm=xtrain|torch``.

    from xtrain import comm
    c = comm.get_comm("xtrain")      # or "torch"
    c.all_reduce(t, op=comm.ReduceOp.SUM, group=mesh.group("dp"))

Strategies receive a Comm object and never call torch.distributed's
collectives themselves; both implementations record into a ledger.

Scripts written against torch.distributed switch to the hand-written
collectives with one line: ``import xtrain.comm.dist as dist`` (see
``xtrain.comm.dist``).
"""

from __future__ import annotations

from torch.distributed import ReduceOp

from xtrain.comm.base import CollectiveTimeout, Comm, CommError, P2POp, Work
from xtrain.comm.groups import (
    SOLO,
    group_label,
    group_rank,
    group_ranks,
    group_size,
    label_group,
)
from xtrain.comm.ledger import Ledger

IMPLEMENTATIONS = ("xtrain", "torch")


def get_comm(name: str, ledger: Ledger | None = None) -> Comm:
    """A fresh Comm of the named implementation, with its own ledger."""
    if name == "torch":
        from xtrain.comm.torch_comm import TorchComm

        return TorchComm(ledger)
    if name == "xtrain":
        from xtrain.comm.xtrain_comm import XtrainComm

        return XtrainComm(ledger)
    raise ValueError(f"unknown comm implementation {name!r}; choose one of {IMPLEMENTATIONS}")


__all__ = [
    "IMPLEMENTATIONS",
    "SOLO",
    "CollectiveTimeout",
    "Comm",
    "CommError",
    "Ledger",
    "P2POp",
    "ReduceOp",
    "Work",
    "get_comm",
    "group_label",
    "group_rank",
    "group_ranks",
    "group_size",
    "label_group",
]
