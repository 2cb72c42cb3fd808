"""Ring collectives: reduce-scatter, all-gather and all-reduce, pipelined.

The bandwidth-optimal all-reduce is a reduce-scatter followed by an
all-gather around a ring (Patarasuk & Yuan, "Bandwidth optimal all-reduce
algorithms for clusters of workstations", JPDC 2009; the same schedule as
Thakur, Rabenseifner & Gropp 2005 for long messages). With n ranks the
buffer is cut into n chunks; at step k of the reduce-scatter, rank r sends
chunk (r-k-1) mod n to rank r+1 and receives chunk (r-k-2) mod n from rank
r-1, adding its own copy to it. After n-1 steps rank r holds chunk r fully
reduced; the all-gather then circulates the finished chunks for n-1 more
steps.

Pipelining: every chunk is further cut into m segments. Segment j of step
k+1 goes out as soon as segment j of step k has arrived and been reduced, so
the reduction of one segment overlaps the transfer of the next and the links
never wait for a whole chunk. Every step has its own tag, so receives are
posted ahead of the data (gloo sends a message only once the receiver has
announced the receive): all-gather steps land in place and are posted at
the start; reduce-scatter steps rotate through DEPTH scratch slots. Cost per
rank (alpha-beta model, S bytes):

    reduce-scatter, all-gather:  (n-1)(alpha + S/n beta)        [+ (m-1) alpha pipeline fill]
    all-reduce:                 2(n-1)(alpha + S/n beta)

so each rank sends (n-1)/n S (reduce-scatter, all-gather) or 2(n-1)/n S
(all-reduce), which the ledger test checks against the bytes measured.
"""

from __future__ import annotations

import math

import torch

from xtrain.comm import reduce_ops, scratch
from xtrain.comm.p2p import Channel

# Bytes per pipeline segment. On gloo over loopback with oversubscribed cores
# every message costs wake-ups, so segments must be large: 1 MiB and 256 KiB
# were no faster than 4 MiB for all-reduce on 4 ranks, and slower for the
# broadcast chain (see docs/collectives.md). Smaller segments overlap more but
# pay more per message.
SEGMENT_BYTES = 4 << 20

# Receive slots per segment for partial results (reduce-scatter steps): the
# receive of step k is posted as soon as the slot's previous occupant, step
# k - DEPTH, is done with, i.e. up to DEPTH steps before its data is sent.
DEPTH = 3


def segment_count(chunk_numel: int, element_size: int) -> int:
    """Segments per chunk; a function of global quantities, so equal on every rank."""
    return max(1, math.ceil(chunk_numel * element_size / SEGMENT_BYTES))


def run_ring(
    ch: Channel,
    steps: int,
    segments: int,
    send_seg,
    recv_seg,
    on_recv=None,
    *,
    staged: int = 0,
    depth: int = DEPTH,
    forwards_slot: bool = False,
) -> None:
    """The pipelined ring engine.

    At step k every rank sends ``send_seg(k, j)`` to its successor and receives
    ``recv_seg(k, j)`` from its predecessor, for every segment j; each step
    has its own tag. Step k+1 of segment j is sent once step k of segment j
    has arrived and ``on_recv(k, j)`` has run.

    Receives are posted ahead of the data. Those of steps ``>= staged`` go
    straight to their final place and are all posted at the start. Those of
    steps ``< staged`` land in ``depth`` rotating scratch slots (step k in
    slot k mod depth): a receive is posted once the slot's previous occupant
    (step k - depth) has been combined, or, with ``forwards_slot`` (the
    occupant is itself sent on at the next step), once that send completed.

    Without ``ch.post_ahead`` (NCCL, which matches messages by issue order)
    each receive is posted together with its step's send instead, the same
    slots being reused in the same order.
    """
    if steps <= 0:
        return
    if not ch.post_ahead:
        _run_ring_paired(ch, steps, segments, send_seg, recv_seg, on_recv, staged, forwards_slot)
        return
    nxt, prv = ch.peer(1), ch.peer(-1)
    m = segments
    recvs = [[None] * m for _ in range(steps)]
    sends = [[None] * m for _ in range(steps)]

    def post_recv(k, j):
        recvs[k][j] = ch.recv_from(recv_seg(k, j), prv, k)

    for k in range(steps):
        if k >= staged or k < depth:
            for j in range(m):
                post_recv(k, j)
    for j in range(m):
        sends[0][j] = ch.send_to(send_seg(0, j), nxt, 0)
    for k in range(steps):
        for j in range(m):
            ch.wait(recvs[k][j])
            if on_recv is not None:
                on_recv(k, j)
            if k + 1 < steps:
                sends[k + 1][j] = ch.send_to(send_seg(k + 1, j), nxt, k + 1)
            if forwards_slot:
                # step k+depth-1 reuses the slot of step k-1, which send k forwarded
                nk = k + depth - 1
                if k >= 1 and nk < staged:
                    ch.wait(sends[k][j])
                    sends[k][j] = None  # a gloo work must be waited exactly once
                    post_recv(nk, j)
            elif k + depth < staged:
                post_recv(k + depth, j)
    for row in sends:
        ch.wait_all(row)


def _run_ring_paired(ch, steps, m, send_seg, recv_seg, on_recv, staged, forwards_slot) -> None:
    """``run_ring`` for backends that match by issue order: one step's send and receive per batch."""
    nxt, prv = ch.peer(1), ch.peer(-1)
    sends, recvs = [None] * m, [None] * m
    for j in range(m):
        sends[j], recvs[j] = ch.exchange([(send_seg(0, j), nxt)], [(recv_seg(0, j), prv)], step=0)
    for k in range(steps):
        for j in range(m):
            ch.wait(recvs[j])
            if on_recv is not None:
                on_recv(k, j)
            if k + 1 < steps:
                ch.wait(sends[j])  # a forwarded slot is free again once its send is done
                sends[j], recvs[j] = ch.exchange(
                    [(send_seg(k + 1, j), nxt)], [(recv_seg(k + 1, j), prv)], step=k + 1
                )
    for w in sends:
        ch.wait(w)


def _segments(flat: torch.Tensor, m: int) -> list[torch.Tensor]:
    return list(flat.tensor_split(m))


def all_reduce(ch: Channel, flat: torch.Tensor, op) -> None:
    """In-place ring all-reduce of a contiguous 1-D tensor of any length.

    Receive buffers: the reduce-scatter steps land in ``min(DEPTH, n-1)``
    scratch slots; the all-gather steps land in place (their receives are
    posted at the start: a chunk's final value can only arrive after this
    rank's own contribution to it has been sent).
    """
    n, r = ch.size, ch.rank
    if n == 1:
        return
    chunks = list(flat.tensor_split(n))
    m = segment_count(chunks[0].numel(), flat.element_size())
    segs = [_segments(c, m) for c in chunks]
    seg_max = max(s.numel() for s in segs[0]) if flat.numel() else 0
    depth = min(DEPTH, n - 1)

    with scratch.Slots(flat, depth, m, seg_max) as slots:

        def send_seg(k, j):
            # reduce-scatter steps send the partial sums, all-gather steps the finished chunks
            c = (r - k - 1) % n if k < n - 1 else (r - (k - n + 1)) % n
            return segs[c][j]

        def recv_seg(k, j):
            if k < n - 1:
                return slots[k % depth, j, : segs[(r - k - 2) % n][j].numel()]
            return segs[(r - (k - n + 1) - 1) % n][j]

        def on_recv(k, j):
            if k < n - 1:
                mine = segs[(r - k - 2) % n][j]
                reduce_ops.combine(op, mine, mine, slots[k % depth, j, : mine.numel()])
                if k == n - 2:
                    reduce_ops.finish(op, mine, n)

        run_ring(ch, 2 * (n - 1), m, send_seg, recv_seg, on_recv, staged=n - 1, depth=depth)


def reduce_scatter(ch: Channel, out_flat: torch.Tensor, in_flat: torch.Tensor | None, op, chunks=None) -> None:
    """Ring reduce-scatter: ``out_flat`` (1-D) gets chunk ``rank`` of the reduced ``in_flat``.

    ``in_flat`` is read only; partial sums rotate through ``DEPTH`` scratch
    slots (one being sent on while later ones arrive). ``chunks`` (n
    contiguous 1-D tensors of ``out_flat``'s length, the list form) stands
    in for ``in_flat.tensor_split(n)``.
    """
    n, r = ch.size, ch.rank
    if chunks is None:
        chunks = list(in_flat.tensor_split(n))
    if n == 1:
        out_flat.copy_(chunks[0])
        reduce_ops.finish(op, out_flat, n)
        return
    m = segment_count(out_flat.numel(), out_flat.element_size())
    segs = [_segments(c, m) for c in chunks]
    out_segs = _segments(out_flat, m)
    seg_max = max(s.numel() for s in out_segs) if out_flat.numel() else 0
    depth = max(2, min(DEPTH, n - 1))

    with scratch.Slots(out_flat, depth, m, seg_max) as slots:

        def send_seg(k, j):
            if k == 0:
                return segs[(r - 1) % n][j]
            return slots[(k - 1) % depth, j, : out_segs[j].numel()]

        def recv_seg(k, j):
            return slots[k % depth, j, : out_segs[j].numel()]

        def on_recv(k, j):
            got = recv_seg(k, j)
            mine = segs[(r - k - 2) % n][j]
            if k < n - 2:
                reduce_ops.combine(op, got, got, mine)
            else:
                reduce_ops.combine(op, out_segs[j], got, mine)
                reduce_ops.finish(op, out_segs[j], n)

        run_ring(ch, n - 1, m, send_seg, recv_seg, on_recv, staged=n - 1, depth=depth, forwards_slot=True)


def all_gather(ch: Channel, chunks: list[torch.Tensor]) -> None:
    """Ring all-gather: ``chunks[rank]`` holds this rank's piece; fills the others.

    ``chunks`` are contiguous 1-D tensors of equal length (views into one
    output tensor, or the members of a list). Every receive lands in its
    final place, so all of them are posted at the start.
    """
    n, r = ch.size, ch.rank
    if n == 1:
        return
    m = segment_count(chunks[0].numel(), chunks[0].element_size())
    segs = [_segments(c, m) for c in chunks]
    run_ring(
        ch,
        n - 1,
        m,
        send_seg=lambda k, j: segs[(r - k) % n][j],
        recv_seg=lambda k, j: segs[(r - k - 1) % n][j],
    )
