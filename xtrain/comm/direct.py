"""Collectives where every rank talks to its peers directly.

- gather / scatter: the root posts one receive (send) per peer at once
  (linear algorithm; the root's link carries (n-1)/n of the data either way).
  Cost: (n-1) alpha + (n-1) S_piece beta at the root.
- all-to-all: pairwise exchange (Thakur, Rabenseifner & Gropp 2005): in
  step k = 1..n-1 rank r sends its block for r+k and receives from r-k. All
  steps are posted at once, so the transport overlaps them; per rank, the
  bytes sent are the blocks for the other ranks, (n-1)/n S for equal splits.
  Cost: (n-1)(alpha + S/n beta). On gloo every send is posted before any
  receive (see ``all_to_all``).
- all-reduce, two-shot: a reduce-scatter and then an all-gather, each as one
  direct exchange: every rank sends chunk p of its tensor to rank p, adds
  the n-1 chunks it receives into its own (chunk r, now complete), and sends
  that to every other rank. The bytes are the ring's, 2(n-1)/n S per rank,
  but in two dependent rounds instead of 2(n-1) ring steps. Cost:
  2 alpha + 2(n-1)/n S beta where a rank's links run at once (one host; a
  full-bisection switch), against the ring's 2(n-1)(alpha + S/n beta). The
  ring stays for large tensors, where it pipelines segments over
  neighbour links only, and for small ones (``use_two_shot``).
- barrier: dissemination (Hensgen, Finkel & Manber 1988): in round i every
  rank signals rank r+2^i and waits for r-2^i; after ceil(log2 n) rounds
  each rank has heard, transitively, from all. Cost: ceil(log2 n) alpha.
"""

from __future__ import annotations

import torch

from xtrain.comm import reduce_ops, scratch
from xtrain.comm.p2p import Channel

# Post all-to-all's sends before its receives where the backend posts messages
# one by one (gloo); a switch for measurements (scripts/bench_comm.py).
SENDS_FIRST = True

# On gloo an all-reduce takes the two-shot algorithm where its chunk, S/n
# bytes, lies within these bounds, and the ring elsewhere. Measured on 2
# cores, gloo, 4 and 8 ranks (docs/collectives.md): below, the concurrent
# messages cost more CPU than the ring's serial steps; above, the two are
# level on 4 ranks, and two-shot's scratch, (n-1)/n S, grows with the tensor
# where the ring's stays at three segments.
TWO_SHOT_MIN_CHUNK_BYTES = 256 << 10
TWO_SHOT_MAX_CHUNK_BYTES = 2 << 20


def use_two_shot(nbytes: int, n: int, post_ahead: bool = True) -> bool:
    """Whether an all-reduce of ``nbytes`` on ``n`` ranks takes the two-shot algorithm.

    Only where receives are posted ahead (gloo), where it was measured; on
    NCCL all-reduce keeps the ring. A function of global quantities, so
    every rank of the group chooses alike.
    """
    chunk = -(-nbytes // n)
    return post_ahead and n > 1 and TWO_SHOT_MIN_CHUNK_BYTES <= chunk <= TWO_SHOT_MAX_CHUNK_BYTES


def _post(ch: Channel, sends, recvs, step: int = 0) -> list:
    """Post a direct exchange of ``(tensor, peer)`` pairs; works in the order sends + recvs."""
    if ch.post_ahead and not SENDS_FIRST:
        recv_works = [ch.recv_from(t, p, step) for t, p in recvs]
        return [ch.send_to(t, p, step) for t, p in sends] + recv_works
    # Sends first, unlike the ring (whose data is not ready early): a send
    # posted before the peer's "recv ready" notice arrives is written by
    # gloo's event-loop thread when it does, while a send posted after it
    # is written by this thread holding the pair's lock, which the loop
    # thread busy-polls for. Sends first took 0.97-1.07 ms of CPU per
    # all-to-all against 1.19-1.33 ms (4 ranks, 4-256 KB; docs/collectives.md).
    # On NCCL the batch is grouped, so sends and receives together cannot deadlock.
    return ch.exchange(sends, recvs, step)


def gather(ch: Channel, piece: torch.Tensor, outputs: list[torch.Tensor] | None, root: int) -> None:
    """``outputs[i]`` on ``root`` gets group rank i's ``piece`` (all flat, contiguous)."""
    if ch.rank != root:
        ch.wait_all(ch.exchange(sends=[(piece, root)]))
        return
    outputs[root].copy_(piece)
    ch.wait_all(ch.exchange(recvs=[(outputs[p], p) for p in range(ch.size) if p != root]))


def scatter(ch: Channel, piece: torch.Tensor, inputs: list[torch.Tensor] | None, root: int) -> None:
    """Group rank i's ``piece`` gets ``inputs[i]`` from ``root``."""
    if ch.rank != root:
        ch.wait_all(ch.exchange(recvs=[(piece, root)]))
        return
    ch.wait_all(ch.exchange(sends=[(inputs[p], p) for p in range(ch.size) if p != root]))
    piece.copy_(inputs[root])


def all_to_all(ch: Channel, outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> None:
    """``outputs[i]`` gets group rank i's ``inputs[rank]`` (all flat, contiguous)."""
    n, r = ch.size, ch.rank
    sends = [(inputs[(r + k) % n], (r + k) % n) for k in range(1, n)]
    recvs = [(outputs[(r - k) % n], (r - k) % n) for k in range(1, n)]
    works = _post(ch, sends, recvs)
    outputs[r].copy_(inputs[r])  # the local block, while the messages move
    ch.wait_all(works)


def all_reduce_two_shot(ch: Channel, flat: torch.Tensor, op) -> None:
    """In-place two-shot all-reduce of a contiguous 1-D tensor of any length.

    Chunk p is ``flat.tensor_split(n)[p]``; rank p reduces it, adding the
    others' copies in the fixed order r-1, r-2, ... (so results do not
    depend on arrival order), then sends it back to every rank.
    """
    n, r = ch.size, ch.rank
    if n == 1:
        return
    chunks = list(flat.tensor_split(n))
    mine = chunks[r]
    to = [(r + k) % n for k in range(1, n)]
    frm = [(r - k) % n for k in range(1, n)]
    with scratch.Slots(flat, n - 1, chunks[0].numel()) as inbox:
        inbox = inbox[:, : mine.numel()]
        works = _post(ch, [(chunks[p], p) for p in to], [(inbox[i], p) for i, p in enumerate(frm)], step=0)
        for i, w in enumerate(works[n - 1 :]):
            ch.wait(w)
            reduce_ops.combine(op, mine, mine, inbox[i])
        reduce_ops.finish(op, mine, n)
        ch.wait_all(works[: n - 1])  # chunks[p] is overwritten below only once sent
    ch.wait_all(_post(ch, [(mine, p) for p in to], [(chunks[p], p) for p in frm], step=1))


def barrier(ch: Channel) -> None:
    n = ch.size
    if n == 1:
        return
    token = torch.zeros(1, dtype=torch.uint8, device=ch.device())
    inbox = torch.empty_like(token)
    dist_ = 1
    while dist_ < n:
        ch.wait_all(ch.exchange([(token, ch.peer(dist_))], [(inbox, ch.peer(-dist_))]))
        dist_ <<= 1
