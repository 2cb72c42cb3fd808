"""The comm ledger against the algorithms' formulas (docs/collectives.md).

For a tensor of S bytes on n ranks, per rank, the hand-written algorithms
must put exactly these bytes and messages on the wire (m = segments per
chunk or message, S divisible by n):

| collective | bytes sent | messages sent |
|---|---|---|
| all_reduce (ring) | 2(n-1)/n S | 2(n-1) m |
| all_reduce (two-shot) | 2(n-1)/n S | 2(n-1) |
| reduce_scatter (ring) | (n-1)/n S | (n-1) m |
| all_gather (ring) | (n-1)/n S | (n-1) m |
| all_to_all (pairwise) | (n-1)/n S | n-1 |
| broadcast, tree | children(v) S; root ceil(log2 n) S | children(v) |
| broadcast, star | root (n-1) S | root n-1 |
| broadcast, scatter + ring | root 2(n-1)/n S; last rank 0; others (n-1)/n S | (bytes / (S/n)) m |
| broadcast, chain | S except the last rank | m except the last rank |
| reduce, tree / chain | S except the root | 1 / m except the root |
| gather / scatter | S/n (root: receives / sends (n-1)/n S) | 1 / root n-1 |
| barrier (dissemination) | ceil(log2 n) bytes | ceil(log2 n) |

The formulas are ``xtrain.formulas``' collectives section. Also checks the
torch implementation's ledger uses the same ring figures. Ledger keys are the
methods called (``all_gather_into_tensor``), whose family (``op_family``)
names the formula.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from xtrain import formulas as F
from xtrain.comm import get_comm, label_group
from xtrain.comm.ledger import op_family
from xtrain.spawn import run_on_ranks


def _ledger_worker(rank: int, world: int, segment_bytes: int):
    """Run each collective once on S = 12n KiB and return the ledger rows by op."""
    import xtrain.comm.direct as direct
    import xtrain.comm.ring as ring
    import xtrain.comm.tree as tree

    ring.SEGMENT_BYTES = segment_bytes
    label_group(dist.group.WORLD, "world")
    n, k = world, 3 * world * 1024  # float32 elements, divisible by n and by the segment count

    def rows(comm, ops):
        return {op: vars(comm.ledger.entry(op, "world")) for op in ops}

    comm = get_comm("xtrain")
    comm.all_reduce(torch.ones(k))
    comm.reduce_scatter_tensor(torch.empty(k // n), torch.ones(k))
    comm.all_gather_into_tensor(torch.empty(k), torch.ones(k // n))
    comm.all_to_all_single(torch.empty(k), torch.ones(k))
    comm.gather(torch.ones(k // n), [torch.empty(k // n) for _ in range(n)] if rank == 1 % n else None, dst=1 % n)
    comm.scatter(torch.empty(k // n), [torch.ones(k // n) for _ in range(n)] if rank == 0 else None, src=0)
    comm.barrier()
    out = {"flat": rows(comm, ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single", "gather",
                               "scatter", "barrier"))}
    big = 1 << 40
    direct.TWO_SHOT_MIN_CHUNK_BYTES, direct.TWO_SHOT_MAX_CHUNK_BYTES = 0, big
    comm = get_comm("xtrain")
    comm.all_reduce(torch.ones(k))
    out["two_shot"] = rows(comm, ("all_reduce",))
    for shape, tree_max, star_max, sr_max in (
        ("tree", big, 0, 0), ("star", 0, big, 0), ("scatter_ring", 0, 0, big), ("chain", 0, 0, 0)
    ):
        tree.TREE_MAX_BYTES, tree.STAR_MAX_BYTES, tree.SCATTER_RING_MAX_BYTES = tree_max, star_max, sr_max
        comm = get_comm("xtrain")
        comm.broadcast(torch.ones(k), src=0)
        comm.reduce(torch.ones(k), dst=0)
        out[shape] = rows(comm, ("broadcast", "reduce"))
    torch_comm = get_comm("torch")
    torch_comm.all_reduce(torch.ones(k))
    torch_comm.reduce_scatter_tensor(torch.empty(k // n), torch.ones(k))
    torch_comm.all_gather_into_tensor(torch.empty(k), torch.ones(k // n))
    torch_comm.all_to_all_single(torch.empty(k), torch.ones(k))
    out["torch"] = rows(torch_comm, ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single"))
    return out


@pytest.mark.parametrize("n", [3, 4])
def test_ledger_bytes_and_messages_match_formulas(n):
    seg = 4096  # 1 KiB-element segments: chunks of 3 KiB elements -> m = 3
    others = run_on_ranks(_ledger_worker, n, seg, timeout=120, pg_timeout=20)
    firsts = [o["flat"] for o in others]
    k = 3 * n * 1024
    S = 4 * k  # bytes of the full tensor
    chunk = S // n
    m = math.ceil(chunk / seg)
    m_full = math.ceil(S / seg)  # segments of the whole message (chains)

    def check(entry, want: F.Traffic, label):
        got = (entry["bytes_sent"], entry["bytes_recv"], entry["messages"])
        assert got == tuple(want), f"{label}, rank {r}: ledger (sent, recv, messages) {got}, formula {tuple(want)}"

    for r in range(n):
        e = firsts[r]
        check(e["all_reduce"], F.ring_traffic("all_reduce", S, n, m), "all_reduce")
        check(others[r]["two_shot"]["all_reduce"], F.two_shot_all_reduce_traffic(S, n), "two-shot")
        for op in ("reduce_scatter_tensor", "all_gather_into_tensor"):
            check(e[op], F.ring_traffic(op_family(op), S, n, m), op)
        check(e["all_to_all_single"], F.pairwise_all_to_all_traffic(S, n), "all_to_all_single")
        groot = 1 % n
        check(e["gather"], F.gather_traffic(chunk, n, r == groot), "gather")
        check(e["scatter"], F.scatter_traffic(chunk, n, r == 0), "scatter")
        barrier = F.dissemination_barrier_traffic(n)
        assert e["barrier"]["messages"] == barrier.messages and e["barrier"]["bytes_sent"] == barrier.sent

        o = others[r]
        # binomial tree from root 0: relative rank = rank; the root sends ceil(log2 n) copies
        check(o["tree"]["broadcast"], F.tree_broadcast_traffic(S, n, r), "tree broadcast")
        check(o["tree"]["reduce"], F.tree_reduce_traffic(S, n, r), "tree reduce")
        # star from root 0: the root sends S to each other rank
        check(o["star"]["broadcast"], F.star_broadcast_traffic(S, n, r), "star broadcast")
        # scatter + ring from root 0: the root scatters (n-1)/n S and sends (n-1)/n S to rank 1;
        # ranks 1..n-2 forward (n-1)/n S, the last rank nothing; m segments per chunk
        check(o["scatter_ring"]["broadcast"], F.scatter_ring_broadcast_traffic(S, n, r, m), "scatter+ring broadcast")
        # chains from / to root 0: 0 -> 1 -> ... -> n-1
        check(o["chain"]["broadcast"], F.chain_broadcast_traffic(S, n, r, m_full), "chain broadcast")
        check(o["chain"]["reduce"], F.chain_reduce_traffic(S, n, r, m_full), "chain reduce")
        # torch's ledger states the ring figures
        t = o["torch"]
        for op in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single"):
            assert t[op]["bytes_sent"] == F.ring_bytes(op_family(op), S, n), op
    # every byte sent is received by someone
    for op in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single", "gather", "scatter",
               "barrier"):
        assert sum(f[op]["bytes_sent"] for f in firsts) == sum(f[op]["bytes_recv"] for f in firsts), op
