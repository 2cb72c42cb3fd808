"""xtrain.formulas.ep_dispatch_bytes against the comm ledger: one MoE layer's
forward and backward on 2 gloo ranks, both dispatchers, known routing (each
rank's expert counts are returned and the formula is fed them); the measured
bytes equal the formula exactly."""

import torch

from xtrain.comm import get_comm
from xtrain.formulas import ep_dispatch_bytes
from xtrain.mesh import Mesh
from xtrain.model import ModelConfig
from xtrain.model.moe import MoE
from xtrain.parallel.expert import AllGatherDispatcher, AllToAllDispatcher
from xtrain.spawn import run_on_ranks

DIM, TOKENS = 16, (3, 8)


def _sent(comm) -> int:
    return sum(e["bytes_sent"] for e in comm.ledger.take_step().values())


def _measure(rank, world):
    mesh = Mesh.build(world, rank, ep=world)
    comm = get_comm("xtrain")
    out = {}
    for kind, cls in (("alltoall", AllToAllDispatcher), ("allgather", AllGatherDispatcher)):
        cfg = ModelConfig(dim=DIM, n_experts=2 * world, top_k=2, n_shared_experts=1, moe_ffn_hidden=8)
        torch.manual_seed(0)
        m = MoE(cfg)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
        local = cfg.n_experts // world
        for name in ("gate", "up", "down"):
            setattr(m.experts, name, torch.nn.Parameter(getattr(m.experts, name).detach()[rank * local:(rank + 1) * local].clone()))
        m.dispatcher = cls(comm, mesh.group("ep"), world, rank, cfg.n_experts)
        x = torch.randn(*TOKENS, DIM, generator=torch.Generator().manual_seed(rank + 1)).requires_grad_()
        comm.barrier(group=mesh.group("ep"))
        comm.ledger.take_step()
        y = m(x)
        fwd = _sent(comm)
        y.square().sum().backward()
        bwd = _sent(comm)
        out[kind] = {"forward": fwd, "backward": bwd, "counts": m.last_stats.counts.tolist()}
    return out


def test_ep_dispatch_bytes_equal_the_ledger():
    world = 2
    res = run_on_ranks(_measure, world, timeout=120, pg_timeout=60)
    E, local, N = 2 * world, 2, TOKENS[0] * TOKENS[1]
    for me, r in enumerate(res):
        for kind in ("alltoall", "allgather"):
            counts = [res[s][kind]["counts"] for s in range(world)]
            rows_to = [sum(counts[me][d * local:(d + 1) * local]) for d in range(world)]
            rows_from = [sum(counts[s][me * local:(me + 1) * local]) for s in range(world)]
            want = ep_dispatch_bytes(kind, me, world, DIM, 4, E, rows_to=rows_to, rows_from=rows_from, N=N, top_k=2)
            got = {k: r[kind][k] for k in ("forward", "backward")}
            assert got == want, f"rank {me} {kind}: ledger {got} != formula {want}"
        assert sum(rows_to) == N * 2
