"""The point-to-point layer every hand-written collective is built on.

A ``Channel`` is one collective's view of its process group: peers are
addressed by their rank *in the group* (``group_peer``), every message of the
collective carries one of the channel's tags, and the channel counts the bytes this
rank puts on and takes off the wire (the ledger's figures are measured here,
not computed from formulas).

The only torch.distributed calls used by ``xtrain.comm``'s algorithms are the
point-to-point ones. On gloo each message is posted with the process group's
own ``send``/``recv`` (what ``dist.isend``/``dist.irecv`` call after checking
their arguments; a ring posts thousands of messages). On other backends they
go through ``batch_isend_irecv``, which on NCCL groups a send and a receive
so two ranks exchanging with each other cannot deadlock on one stream.

A work handle is waited exactly once: gloo's ``wait`` on a send or receive
consumes one completion, so a second wait on the same handle blocks.

Tags. All ranks issue collectives on a group in the same order, so a
per-group sequence number is the same on every member; it becomes the base
of the collective's tags. Two collectives in flight at once on the same group
(``async_op=True``) therefore never match each other's messages. Inside one
collective every step of an algorithm (a ring step, say) has its own tag,
``base + step``: gloo matches messages between a pair of ranks in posting
order *per tag*, so with one tag per step a receive can be posted several
steps before the data it waits for, while the messages of earlier steps are
still moving. Within one step and pair, messages are posted in the same order
on both sides. (NCCL ignores tags and orders by issue, so on NCCL
concurrent collectives on one group are not supported; on different groups
they are.)

Why post receives early: gloo's TCP transport sends an unbound buffer only
after the receiver has announced a matching receive (a "recv ready"
notification). A send posted before its receive waits for that round trip;
a send whose receive was posted a step earlier goes out at once.

Zero-length messages are never sent: both ends of every message know its
length, so both skip it.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from xtrain.comm.groups import SOLO

# Collective tags live above user point-to-point tags (which are small by convention):
# tag = 2^24 + (sequence mod 2^16) * 2^12 + step, below 2^29 (gloo takes a 32-bit int).
_TAG_BASE = 1 << 24
_STEP_BITS = 12
_SEQ_MOD = 1 << 16
_sequence: dict[int, int] = {}
_sequence_lock = threading.Lock()


def _next_tag(pg) -> int:
    with _sequence_lock:
        seq = _sequence.get(id(pg), 0)
        _sequence[id(pg)] = seq + 1
    return _TAG_BASE + ((seq % _SEQ_MOD) << _STEP_BITS)


# Post receives ahead of their sends where the backend allows it (switch for measurements).
POST_AHEAD = True

# Post every message as on NCCL (batch_isend_irecv, each receive together with
# its step's send) whatever the backend: a switch for tests, which run NCCL's
# posting discipline over gloo on CPU.
NCCL_STYLE = False

_direct_p2p: dict[int, bool] = {}


def _uses_direct_p2p(pg) -> bool:
    """True for gloo: post each message with the process group's own send/recv.

    ``batch_isend_irecv`` on gloo is a loop over ``isend``/``irecv``, which
    re-check their arguments and call ``ProcessGroup.send``/``recv``; the
    ring posts thousands of messages, so it calls those directly. Backends
    that coalesce (NCCL) keep ``batch_isend_irecv``.
    """
    if NCCL_STYLE:
        return False
    key = id(pg)
    if key not in _direct_p2p:
        try:
            _direct_p2p[key] = dist.get_backend(pg) == "gloo"
        except Exception:  # noqa: BLE001 - unusual group objects take the generic path
            _direct_p2p[key] = False
    return _direct_p2p[key]


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
            self._direct = self.post_ahead = False
            return
        self.pg = dist.group.WORLD if group is None else group
        self.size = dist.get_world_size(self.pg)
        self.rank = dist.get_rank(self.pg)
        self.tag = _next_tag(self.pg)
        self._direct = _uses_direct_p2p(self.pg)
        # Receives may be posted steps ahead of their sends only where tags keep
        # steps apart (gloo). NCCL matches by issue order on one stream per peer
        # pair, so there every receive is posted together with its step's send.
        self.post_ahead = self._direct and POST_AHEAD

    def step_tag(self, step: int) -> int:
        """The tag of step ``step`` of this collective (the same on every rank)."""
        return self.tag + step % (1 << _STEP_BITS)

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

    def exchange(self, sends=(), recvs=(), step: int = 0):
        """Post ``(tensor, group_peer)`` sends and receives together; returns their works.

        The works come back in the order ``sends + recvs`` with ``None`` for
        empty tensors, so callers can index them. All messages carry the tag
        of ``step``.
        """
        tag = self.step_tag(step)
        if self._direct:
            out = [self._post(True, t, peer, tag) for t, peer in sends]
            out += [self._post(False, t, peer, tag) for t, peer in recvs]
            return out
        ops, slots = [], []  # P2POp takes global ranks (its group_peer is newer than torch 2.4)
        for t, peer in sends:
            if t.numel():
                ops.append(dist.P2POp(dist.isend, t, self.global_rank(peer), group=self.pg, tag=tag))
                self.sent += t.numel() * t.element_size()
                self.messages += 1
            slots.append(bool(t.numel()))
        for t, peer in recvs:
            if t.numel():
                ops.append(dist.P2POp(dist.irecv, t, self.global_rank(peer), group=self.pg, tag=tag))
                self.recv += t.numel() * t.element_size()
            slots.append(bool(t.numel()))
        works = dist.batch_isend_irecv(ops) if ops else []
        if len(works) != len(ops):
            # A coalescing backend (NCCL) returns one work for the whole batch.
            return [works[0] if live else None for live in slots]
        works = iter(works)
        return [next(works) if live else None for live in slots]

    def _post(self, is_send: bool, t: torch.Tensor, peer: int, tag: int):
        """One message through the group's own ``send``/``recv`` (what ``isend``/``irecv`` call)."""
        if not t.numel():
            return None
        size = t.numel() * t.element_size()
        if t.is_complex():
            t = torch.view_as_real(t)
        if is_send:
            self.sent += size
            self.messages += 1
            return self.pg.send([t], peer, tag)
        self.recv += size
        return self.pg.recv([t], peer, tag)

    def send_to(self, t: torch.Tensor, peer: int, step: int = 0):
        """Post one send of step ``step``; returns its work (``None`` when empty)."""
        if self._direct:
            return self._post(True, t, peer, self.step_tag(step))
        return self.exchange(sends=[(t, peer)], step=step)[0]

    def recv_from(self, t: torch.Tensor, peer: int, step: int = 0):
        """Post one receive of step ``step``; returns its work (``None`` when empty)."""
        if self._direct:
            return self._post(False, t, peer, self.step_tag(step))
        return self.exchange(recvs=[(t, peer)], step=step)[0]

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
        return self.send_to(t, peer)

    def irecv(self, t: torch.Tensor, peer: int):
        return self.recv_from(t, peer)

    def device(self) -> torch.device:
        """Where this group's messages live when no tensor says (barrier)."""
        if self.pg is not None and dist.get_backend(self.pg) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
