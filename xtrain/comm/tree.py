"""Rooted collectives: broadcast and reduce, by binomial tree or pipelined chain.

Small messages are latency-bound, so they take the binomial tree (MPICH's
choice for short broadcasts and reductions; Thakur, Rabenseifner & Gropp,
"Optimization of collective communication operations in MPICH", IJHPCA
2005): in round i, every rank that already has the data sends it to the rank
2^i places further on (relative to the root), so all n ranks have it after
ceil(log2 n) rounds. Cost: ceil(log2 n)(alpha + S beta).

Large messages are bandwidth-bound, so they take a pipelined chain root ->
root+1 -> ... -> root+n-1 with the message cut into m segments: each rank
forwards segment j as soon as it has it, and the time approaches one
message transfer. Cost: (n - 2 + m)(alpha + S/m beta). Each rank but the
last sends S bytes and each but the root receives S. Reduce runs the same
shapes backwards, combining on the way in (the root receives, non-roots send
their partial result). Which one a message takes follows the same model
(``use_tree``): the chain only where m (ceil(log2 n) - 1) >= n - 2 for its m
segments, so on 4 ranks a one-segment message (up to 4 MiB) takes the tree.

Broadcast has two more shapes where receives can be posted ahead of their
sends (gloo; ``broadcast_shape``): above 64 KiB and up to ``STAR_MAX_BYTES``
the root sends the whole message to every rank at once (one hop), and up to
``SCATTER_RING_MAX_BYTES`` it scatters n chunks and a ring all-gather that
skips the root completes them (van de Geijn): (n-1) S bytes on the wire in
all, like the tree, with a critical path of one chunk hop plus n-1 ring steps
of S/n. On NCCL broadcast keeps the tree/chain choice.
"""

from __future__ import annotations

import math

import torch

from xtrain.comm import reduce_ops
from xtrain.comm.p2p import Channel
from xtrain.comm.ring import segment_count

# Messages up to this size take the binomial tree; larger ones the chain.
TREE_MAX_BYTES = 64 << 10

# Where receives can be posted ahead (gloo), broadcasts above TREE_MAX_BYTES
# and up to STAR_MAX_BYTES go from the root straight to every rank (one hop);
# up to SCATTER_RING_MAX_BYTES they take scatter + ring all-gather; larger
# ones follow ``use_tree`` (the chain for multi-segment messages). Measured
# on 4 ranks, gloo, 2 cores (docs/collectives.md).
STAR_MAX_BYTES = 2 << 20
SCATTER_RING_MAX_BYTES = 16 << 20


def use_tree(nbytes: int, n: int, element_size: int = 1) -> bool:
    """Binomial tree for small messages, two ranks, or wherever the α–β model says it is faster.

    With m segments a chain takes (n - 2 + m) segment times and the tree
    ceil(log2 n) m, so the tree wins while m (ceil(log2 n) - 1) < n - 2: for
    n = 4 that is any message of one segment (up to ``ring.SEGMENT_BYTES``),
    where a chain would make three full hops against the tree's two rounds.
    """
    if nbytes <= TREE_MAX_BYTES or n <= 2:
        return True
    m = segment_count(nbytes // element_size, element_size)
    return m * (tree_rounds(n) - 1) < n - 2


def tree_rounds(n: int) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0


def tree_children(v: int, n: int) -> list[int]:
    """Relative ranks that relative rank ``v`` sends to in a binomial broadcast, in round order."""
    low = v & -v if v else 1 << tree_rounds(n)  # v's lowest set bit bounds its subtree
    kids, mask = [], 1
    while mask < low:
        if v + mask < n:
            kids.append(v + mask)
        mask <<= 1
    return kids[::-1]  # the biggest subtree first


def tree_parent(v: int) -> int:
    return v - (v & -v)


def broadcast_tree(ch: Channel, flat: torch.Tensor, root: int) -> None:
    n = ch.size
    v = (ch.rank - root) % n
    if v:
        ch.wait(ch.irecv(flat, (tree_parent(v) + root) % n))
    ch.wait_all(ch.exchange(sends=[(flat, (c + root) % n) for c in tree_children(v, n)]))


def broadcast_chain(ch: Channel, flat: torch.Tensor, root: int) -> None:
    n = ch.size
    pos = (ch.rank - root) % n
    segs = list(flat.tensor_split(segment_count(flat.numel(), flat.element_size())))
    nxt, prv = (ch.rank + 1) % n, (ch.rank - 1) % n
    if pos == 0:
        ch.wait_all(ch.exchange(sends=[(s, nxt) for s in segs]))
        return
    recvs = ch.exchange(recvs=[(s, prv) for s in segs])
    sends = []
    for s, w in zip(segs, recvs):
        ch.wait(w)
        if pos < n - 1:
            sends.append(ch.isend(s, nxt))
    ch.wait_all(sends)


def broadcast_scatter_ring(ch: Channel, flat: torch.Tensor, root: int) -> None:
    """Scatter from the root, then a ring all-gather that skips the root (van de Geijn).

    Chunk c (of n) belongs to relative rank c. The root sends chunk c to
    relative rank c (step 0) and, as the ring's first member, every chunk but
    chunk 1 to relative rank 1 (steps 1..n-1); relative rank v forwards at
    step k+1 the chunk it got at step k (its own scattered chunk at step 1);
    the last rank forwards nothing (its successor is the root). Every
    receive is posted before any send.
    """
    n = ch.size
    v = (ch.rank - root) % n
    chunks = flat.tensor_split(n)
    m = segment_count(chunks[0].numel(), flat.element_size())
    segs = [list(c.tensor_split(m)) for c in chunks]
    nxt, prv = ch.peer(1), ch.peer(-1)
    if v == 0:
        works = []
        for j in range(m):
            works.append(ch.send_to(segs[0][j], nxt, 1))  # the head of the ring's critical path
            works += [ch.send_to(segs[c][j], (c + root) % n, 0) for c in range(1, n)]
        for k in range(1, n - 1):
            works += [ch.send_to(segs[(-k) % n][j], nxt, k + 1) for j in range(m)]
        ch.wait_all(works)
        return
    mine = [ch.recv_from(segs[v][j], root, 0) for j in range(m)]
    ring = [[ch.recv_from(segs[(v - k - 1) % n][j], prv, k + 1) for j in range(m)] for k in range(n - 1)]
    last = v == n - 1
    sends = []
    for j in range(m):
        ch.wait(mine[j])
        if not last:
            sends.append(ch.send_to(segs[v][j], nxt, 1))
    for k in range(n - 1):
        for j in range(m):
            ch.wait(ring[k][j])
            if not last and k + 1 < n - 1:
                sends.append(ch.send_to(segs[(v - k - 1) % n][j], nxt, k + 2))
    ch.wait_all(sends)


def broadcast_star(ch: Channel, flat: torch.Tensor, root: int) -> None:
    """The root sends the whole message to every other rank at once: one hop of latency.

    The root sends (n-1) S, as many bytes as the binomial tree puts on the
    wire in all; on oversubscribed cores the copies cost the same, and the
    tree's second round of wake-ups is saved.
    """
    n = ch.size
    if ch.rank == root:
        ch.wait_all([ch.send_to(flat, (root + c) % n) for c in range(1, n)])
    else:
        ch.wait(ch.recv_from(flat, root))


def broadcast_shape(nbytes: int, n: int, element_size: int = 1, post_ahead: bool = True) -> str:
    """``"tree"``, ``"star"``, ``"scatter_ring"`` or ``"chain"`` for a broadcast of ``nbytes`` on ``n`` ranks.

    ``post_ahead`` is ``Channel.post_ahead``: without it (NCCL) only the tree
    and the chain, by the α–β model of ``use_tree``.
    """
    if nbytes <= TREE_MAX_BYTES or n <= 2:
        return "tree"
    if post_ahead and nbytes <= STAR_MAX_BYTES:
        return "star"
    if post_ahead and nbytes <= SCATTER_RING_MAX_BYTES:
        return "scatter_ring"
    return "tree" if use_tree(nbytes, n, element_size) else "chain"


_BROADCASTS = {
    "tree": broadcast_tree,
    "star": broadcast_star,
    "scatter_ring": broadcast_scatter_ring,
    "chain": broadcast_chain,
}


def broadcast(ch: Channel, flat: torch.Tensor, root: int) -> None:
    """``flat`` on group rank ``root`` to every rank of ``ch``."""
    if ch.size == 1:
        return
    nbytes = flat.numel() * flat.element_size()
    _BROADCASTS[broadcast_shape(nbytes, ch.size, flat.element_size(), ch.post_ahead)](ch, flat, root)


def reduce_tree(ch: Channel, flat: torch.Tensor, root: int, op) -> None:
    n = ch.size
    v = (ch.rank - root) % n
    acc = flat if v == 0 else flat.clone()  # non-roots keep their input untouched
    tmp = torch.empty_like(flat)
    for c in reversed(tree_children(v, n)):  # smallest subtree finishes first
        ch.wait(ch.irecv(tmp, (c + root) % n))
        reduce_ops.combine(op, acc, acc, tmp)
    if v:
        ch.wait(ch.isend(acc, (tree_parent(v) + root) % n))


def reduce_chain(ch: Channel, flat: torch.Tensor, root: int, op) -> None:
    n = ch.size
    pos = (ch.rank - root) % n
    m = segment_count(flat.numel(), flat.element_size())
    mine = list(flat.tensor_split(m))
    toward_root, away = (ch.rank - 1) % n, (ch.rank + 1) % n
    if pos == n - 1:  # the far end starts the chain with its own data
        ch.wait_all(ch.exchange(sends=[(s, toward_root) for s in mine]))
        return
    got = list(torch.empty_like(flat).tensor_split(m))
    recvs = ch.exchange(recvs=[(g, away) for g in got])
    sends = []
    for g, s, w in zip(got, mine, recvs):
        ch.wait(w)
        if pos == 0:
            reduce_ops.combine(op, s, s, g)
        else:
            reduce_ops.combine(op, g, g, s)
            sends.append(ch.isend(g, toward_root))
    ch.wait_all(sends)


def reduce(ch: Channel, flat: torch.Tensor, root: int, op) -> None:
    """Reduce every rank's ``flat`` into ``flat`` on group rank ``root``."""
    if ch.size > 1:
        nbytes = flat.numel() * flat.element_size()
        (reduce_tree if use_tree(nbytes, ch.size, flat.element_size()) else reduce_chain)(ch, flat, root, op)
    if ch.rank == root:
        reduce_ops.finish(op, flat, ch.size)
