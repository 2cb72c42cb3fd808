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
- barrier: dissemination (Hensgen, Finkel & Manber 1988): in round i every
  rank signals rank r+2^i and waits for r-2^i; after ceil(log2 n) rounds
  each rank has heard, transitively, from all. Cost: ceil(log2 n) alpha.
"""

from __future__ import annotations

import torch

from xtrain.comm.p2p import Channel

# Post all-to-all's sends before its receives where the backend posts messages
# one by one (gloo); a switch for measurements (scripts/bench_comm.py).
SENDS_FIRST = True


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
    if ch.post_ahead and SENDS_FIRST:
        # Sends first, unlike the ring (whose data is not ready early): a send
        # posted before the peer's "recv ready" notice arrives is written by
        # gloo's event-loop thread when it does, while a send posted after it
        # is written by this thread holding the pair's lock, which the loop
        # thread busy-polls for. Sends first took 0.97-1.07 ms of CPU per call
        # against 1.19-1.33 ms (4 ranks, 4-256 KB; docs/collectives.md).
        works = [ch.send_to(t, p) for t, p in sends]
        works += [ch.recv_from(t, p) for t, p in recvs]
    elif ch.post_ahead:
        works = [ch.recv_from(t, p) for t, p in recvs]
        works += [ch.send_to(t, p) for t, p in sends]
    else:
        # On NCCL the batch is grouped, so sends and receives together cannot deadlock.
        works = ch.exchange(sends, recvs)
    outputs[r].copy_(inputs[r])  # the local block, while the messages move
    ch.wait_all(works)


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
