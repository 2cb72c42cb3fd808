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
never wait for a whole chunk. Cost per rank (alpha-beta model, S bytes):

    reduce-scatter, all-gather:  (n-1)(alpha + S/n beta)        [+ (m-1) alpha pipeline fill]
    all-reduce:                 2(n-1)(alpha + S/n beta)

so each rank sends (n-1)/n S (reduce-scatter, all-gather) or 2(n-1)/n S
(all-reduce), which the ledger test checks against the bytes measured.
"""

from __future__ import annotations

import math

import torch

from xtrain.comm import reduce_ops
from xtrain.comm.p2p import Channel

# Bytes per pipeline segment. On gloo over loopback with oversubscribed cores
# every message costs a wake-up round trip, so segments must be large: 1 MiB
# ran at ~0.6x the built-in all-reduce on 4 ranks, 4 MiB at ~1x (see
# docs/collectives.md). Smaller segments overlap more but pay more per message.
SEGMENT_BYTES = 4 << 20


def segment_count(chunk_numel: int, element_size: int) -> int:
    """Segments per chunk; a function of global quantities, so equal on every rank."""
    return max(1, math.ceil(chunk_numel * element_size / SEGMENT_BYTES))


def run_ring(ch: Channel, steps: int, segments: int, send_seg, recv_seg, on_recv=None) -> None:
    """The pipelined ring engine.

    At step k every rank sends ``send_seg(k, j)`` to its successor and receives
    ``recv_seg(k, j)`` from its predecessor, for every segment j. Step k+1 of
    segment j is posted once step k of segment j has arrived and
    ``on_recv(k, j)`` has run; before a segment's next receive is posted, its
    previous send is complete, so a buffer that alternates between sending
    and receiving is never overwritten while in flight.
    """
    if steps <= 0:
        return
    nxt, prv = ch.peer(1), ch.peer(-1)
    sends, recvs = [None] * segments, [None] * segments
    for j in range(segments):
        sends[j], recvs[j] = ch.exchange([(send_seg(0, j), nxt)], [(recv_seg(0, j), prv)])
    for k in range(steps):
        for j in range(segments):
            ch.wait(recvs[j])
            if on_recv is not None:
                on_recv(k, j)
            if k + 1 < steps:
                ch.wait(sends[j])
                sends[j], recvs[j] = ch.exchange([(send_seg(k + 1, j), nxt)], [(recv_seg(k + 1, j), prv)])
    for w in sends:
        ch.wait(w)


def _segments(flat: torch.Tensor, m: int) -> list[torch.Tensor]:
    return list(flat.tensor_split(m))


def _scratch(like: torch.Tensor, copies: int, m: int, seg_numel: int) -> torch.Tensor:
    """Receive buffers: ``copies`` x ``m`` disjoint segment slots."""
    return torch.empty((copies, m, seg_numel), dtype=like.dtype, device=like.device)


def all_reduce(ch: Channel, flat: torch.Tensor, op) -> None:
    """In-place ring all-reduce of a contiguous 1-D tensor of any length."""
    n, r = ch.size, ch.rank
    if n == 1:
        return
    chunks = list(flat.tensor_split(n))
    m = segment_count(chunks[0].numel(), flat.element_size())
    segs = [_segments(c, m) for c in chunks]
    seg_max = max(s.numel() for s in segs[0]) if flat.numel() else 0
    scratch = _scratch(flat, 1, m, seg_max)[0]

    def send_seg(k, j):
        # reduce-scatter steps send the partial sums, all-gather steps the finished chunks
        c = (r - k - 1) % n if k < n - 1 else (r - (k - n + 1)) % n
        return segs[c][j]

    def recv_seg(k, j):
        if k < n - 1:
            return scratch[j, : segs[(r - k - 2) % n][j].numel()]
        return segs[(r - (k - n + 1) - 1) % n][j]

    def on_recv(k, j):
        if k < n - 1:
            mine = segs[(r - k - 2) % n][j]
            reduce_ops.combine(op, mine, mine, scratch[j, : mine.numel()])
            if k == n - 2:
                reduce_ops.finish(op, mine, n)

    run_ring(ch, 2 * (n - 1), m, send_seg, recv_seg, on_recv)


def reduce_scatter(ch: Channel, out_flat: torch.Tensor, in_flat: torch.Tensor, op) -> None:
    """Ring reduce-scatter: ``out_flat`` (1-D) gets chunk ``rank`` of the reduced ``in_flat``.

    ``in_flat`` is read only; partial sums alternate between two scratch
    buffers (one being sent while the next arrives).
    """
    n, r = ch.size, ch.rank
    if n == 1:
        out_flat.copy_(in_flat)
        reduce_ops.finish(op, out_flat, n)
        return
    chunks = list(in_flat.tensor_split(n))
    m = segment_count(out_flat.numel(), out_flat.element_size())
    segs = [_segments(c, m) for c in chunks]
    out_segs = _segments(out_flat, m)
    seg_max = max(s.numel() for s in out_segs) if out_flat.numel() else 0
    scratch = _scratch(out_flat, 2, m, seg_max)

    def send_seg(k, j):
        if k == 0:
            return segs[(r - 1) % n][j]
        return scratch[(k - 1) % 2, j, : out_segs[j].numel()]

    def recv_seg(k, j):
        return scratch[k % 2, j, : out_segs[j].numel()]

    def on_recv(k, j):
        got = recv_seg(k, j)
        mine = segs[(r - k - 2) % n][j]
        if k < n - 2:
            reduce_ops.combine(op, got, got, mine)
        else:
            reduce_ops.combine(op, out_segs[j], got, mine)
            reduce_ops.finish(op, out_segs[j], n)

    run_ring(ch, n - 1, m, send_seg, recv_seg, on_recv)


def all_gather(ch: Channel, chunks: list[torch.Tensor]) -> None:
    """Ring all-gather: ``chunks[rank]`` holds this rank's piece; fills the others.

    ``chunks`` are contiguous 1-D tensors of equal length (views into one
    output tensor, or the members of a list).
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
