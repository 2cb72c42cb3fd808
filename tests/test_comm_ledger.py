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

Also checks the torch implementation's ledger uses the same ring figures.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from xtrain.comm import get_comm, label_group
from xtrain.comm.tree import tree_children
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
    out = {"flat": rows(comm, ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "gather", "scatter", "barrier"))}
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
    out["torch"] = rows(torch_comm, ("all_reduce", "reduce_scatter", "all_gather", "all_to_all"))
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
    rounds = math.ceil(math.log2(n))
    for r in range(n):
        e = firsts[r]
        assert e["all_reduce"]["bytes_sent"] == e["all_reduce"]["bytes_recv"] == 2 * (n - 1) * S // n
        assert e["all_reduce"]["messages"] == 2 * (n - 1) * m
        two = others[r]["two_shot"]["all_reduce"]
        assert two["bytes_sent"] == two["bytes_recv"] == 2 * (n - 1) * S // n
        assert two["messages"] == 2 * (n - 1)
        for op in ("reduce_scatter", "all_gather"):
            assert e[op]["bytes_sent"] == e[op]["bytes_recv"] == (n - 1) * S // n, op
            assert e[op]["messages"] == (n - 1) * m, op
        assert e["all_to_all"]["bytes_sent"] == e["all_to_all"]["bytes_recv"] == (n - 1) * S // n
        assert e["all_to_all"]["messages"] == n - 1
        groot = 1 % n
        assert e["gather"]["bytes_recv"] == ((n - 1) * chunk if r == groot else 0)
        assert e["gather"]["bytes_sent"] == (0 if r == groot else chunk)
        assert e["scatter"]["bytes_sent"] == ((n - 1) * chunk if r == 0 else 0)
        assert e["scatter"]["bytes_recv"] == (0 if r == 0 else chunk)
        assert e["barrier"]["messages"] == rounds and e["barrier"]["bytes_sent"] == rounds

        o = others[r]
        # binomial tree from root 0: relative rank = rank
        kids = len(tree_children(r, n))
        b = o["tree"]["broadcast"]
        assert b["bytes_sent"] == kids * S and b["bytes_recv"] == (0 if r == 0 else S) and b["messages"] == kids
        red = o["tree"]["reduce"]
        assert red["bytes_recv"] == kids * S and red["bytes_sent"] == (0 if r == 0 else S)
        if r == 0:
            assert kids == rounds  # the root sends ceil(log2 n) copies
        # star from root 0: the root sends S to each other rank
        b = o["star"]["broadcast"]
        assert b["bytes_sent"] == ((n - 1) * S if r == 0 else 0) and b["bytes_recv"] == (0 if r == 0 else S)
        assert b["messages"] == (n - 1 if r == 0 else 0)
        # scatter + ring from root 0: the root scatters (n-1)/n S and sends (n-1)/n S to rank 1;
        # ranks 1..n-2 forward (n-1)/n S, the last rank nothing; m segments per chunk
        b = o["scatter_ring"]["broadcast"]
        sent = 2 * (n - 1) * chunk if r == 0 else (0 if r == n - 1 else (n - 1) * chunk)
        assert b["bytes_sent"] == sent and b["bytes_recv"] == (0 if r == 0 else S)
        assert b["messages"] == sent // chunk * m
        # chains from / to root 0: 0 -> 1 -> ... -> n-1
        m_full = math.ceil(S / seg)
        b = o["chain"]["broadcast"]
        assert b["bytes_sent"] == (0 if r == n - 1 else S) and b["bytes_recv"] == (0 if r == 0 else S)
        assert b["messages"] == (0 if r == n - 1 else m_full)
        red = o["chain"]["reduce"]
        assert red["bytes_sent"] == (0 if r == 0 else S) and red["bytes_recv"] == (0 if r == n - 1 else S)
        # torch's ledger states the ring figures
        t = o["torch"]
        assert t["all_reduce"]["bytes_sent"] == 2 * (n - 1) * S // n
        for op in ("reduce_scatter", "all_gather", "all_to_all"):
            assert t[op]["bytes_sent"] == (n - 1) * S // n, op
    # every byte sent is received by someone
    for op in ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "gather", "scatter", "barrier"):
        assert sum(f[op]["bytes_sent"] for f in firsts) == sum(f[op]["bytes_recv"] for f in firsts), op
