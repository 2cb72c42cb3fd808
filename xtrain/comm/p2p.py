"""The point-to-point layer every hand-written collective is built on.

A ``Channel`` is one collective's view of its process group: peers are
addressed by their rank *in the group* (``group_peer``), every message of the
collective carries the channel's tag, and the channel counts the bytes this
rank puts on and takes off the wire (the ledger's figures are measured here,
not computed from formulas).

The only torch.distributed calls used by ``xtrain.comm``'s algorithms are the
point-to-point ones, ``isend``/``irecv`` through ``batch_isend_irecv``: on gloo
that issues plain isend/irecv; on NCCL it groups a send and a receive so two
ranks exchanging with each other cannot deadlock on one stream.

Tags. All ranks issue collectives on a group in the same order, so a per-group
sequence number is the same on every member; it becomes the tag. Two
collectives in flight at once on the same group (``async_op=True``) therefore
never match each other's messages. Within one collective, messages between a
pair of ranks are matched in the order they are posted, which every algorithm
here keeps identical on both sides. (NCCL ignores tags and orders by issue, so
on NCCL concurrent collectives on one group are not supported; on different
groups they are.)

Zero-length messages are never sent: both ends of every message know its
length, so both skip it.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from xtrain.comm.groups import SOLO

# Collective tags live above user point-to-point tags (which are small by convention).
_TAG_BASE = 1 << 24
_sequence: dict[int, int] = {}
_sequence_lock = threading.Lock()


def _next_tag(pg) -> int:
    with _sequence_lock:
        seq = _sequence.get(id(pg), 0)
        _sequence[id(pg)] = seq + 1
    return _TAG_BASE + seq % _TAG_BASE


def default_timeout() -> timedelta | None:
    """The world process group's timeout (what ``init_process_group`` was given), if readable.

    Subgroups made by ``new_group`` without a timeout get torch's 30-minute
    default; xtrain's collectives wait at most the world's timeout instead.
    """
    try:
        return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # noqa: BLE001 - private API; fall back to each group's own timeout
        return None


class Channel:
    """One collective's group, tag and byte counts.

    ``group`` follows torch: ``None`` is the whole world; ``SOLO`` (and any
    one-member group) has ``size == 1`` and sends nothing. Every wait is
    bounded by ``timeout`` (else by the group's own timeout).
    """

    def __init__(self, group, timeout: timedelta | None = None):
        self.sent = 0
        self.recv = 0
        self.messages = 0
        self.timeout = timeout
        if group is SOLO:
            self.pg, self.size, self.rank, self.tag = None, 1, 0, 0
            return
        self.pg = dist.group.WORLD if group is None else group
        self.size = dist.get_world_size(self.pg)
        self.rank = dist.get_rank(self.pg)
        self.tag = _next_tag(self.pg)

    def peer(self, offset: int) -> int:
        """The group rank ``offset`` places after this one on the ring."""
        return (self.rank + offset) % self.size

    def global_rank(self, group_rank: int) -> int:
        if self.pg is None:
            return dist.get_rank() if dist.is_initialized() else 0
        return dist.get_global_rank(self.pg, group_rank)

    def group_rank_of(self, global_rank: int) -> int:
        """Translate a global rank (torch's ``src``/``dst``) to a rank in this group."""
        if self.pg is None:
            return 0
        return dist.get_group_rank(self.pg, global_rank)

    def exchange(self, sends=(), recvs=()):
        """Post ``(tensor, group_peer)`` sends and receives together; returns their works.

        The works come back in the order ``sends + recvs`` with ``None`` for
        empty tensors, so callers can index them.
        """
        ops, slots = [], []
        for t, peer in sends:
            if t.numel():
                ops.append(dist.P2POp(dist.isend, t, group=self.pg, tag=self.tag, group_peer=peer))
                self.sent += t.numel() * t.element_size()
                self.messages += 1
            slots.append(bool(t.numel()))
        for t, peer in recvs:
            if t.numel():
                ops.append(dist.P2POp(dist.irecv, t, group=self.pg, tag=self.tag, group_peer=peer))
                self.recv += t.numel() * t.element_size()
            slots.append(bool(t.numel()))
        works = dist.batch_isend_irecv(ops) if ops else []
        if len(works) != len(ops):
            # A coalescing backend (NCCL) returns one work for the whole batch.
            return [works[0] if live else None for live in slots]
        works = iter(works)
        return [next(works) if live else None for live in slots]

    def wait(self, work) -> None:
        """Wait for one work handle (``None`` stands for a skipped empty message)."""
        if work is None:
            return
        if self.timeout is None:
            work.wait()
        else:
            work.wait(self.timeout)

    def wait_all(self, works) -> None:
        for w in works:
            self.wait(w)

    def isend(self, t: torch.Tensor, peer: int):
        return self.exchange(sends=[(t, peer)])[0]

    def irecv(self, t: torch.Tensor, peer: int):
        return self.exchange(recvs=[(t, peer)])[0]

    def device(self) -> torch.device:
        """Where this group's messages live when no tensor says (barrier)."""
        if self.pg is not None and dist.get_backend(self.pg) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
