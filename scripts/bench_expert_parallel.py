"""One MoE layer's forward + backward under expert parallelism, both dispatchers
side by side: tokens/s and the bytes each rank sends on the ep group (the comm
ledger beside ``xtrain.formulas.ep_dispatch_bytes``).

    python scripts/bench_expert_parallel.py [--ep 2 4] [--tokens 1024] [--dim 384]
        [--experts 8] [--top-k 2] [--hidden 256] [--reps 8] [--comm xtrain]

Each ep degree is one gloo job (xtrain.spawn.run_on_ranks); within it the
dispatchers alternate rep by rep (alltoall, allgather, alltoall, ...), so load
from other processes hits both alike. Time per rep is the slowest rank's;
tokens/s = ep·tokens / median time. Fixed shapes: every rank routes ``tokens``
random tokens through the same router (seeded), experts split over ep.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

KINDS = ("alltoall", "allgather")


def _deepspeed_layer(world, cfg):
    """DeepSpeed's MoE layer (deepspeed.moe.layer.MoE, GShard-style top-2 gating with
    dense (E, C, D) dispatch) at the same shapes: SwiGLU experts without biases,
    dropless (drop_tokens=False: the capacity C is the largest expert count over
    the ep ranks), no random token selection. On the default (gloo) group."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.moe.layer import MoE as DSMoE
    from torch import nn

    deepspeed.init_distributed(dist_backend="gloo")

    class SwiGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(cfg.dim, cfg.expert_hidden, bias=False)
            self.up = nn.Linear(cfg.dim, cfg.expert_hidden, bias=False)
            self.down = nn.Linear(cfg.expert_hidden, cfg.dim, bias=False)

        def forward(self, x):
            return self.down(nn.functional.silu(self.gate(x)) * self.up(x))

    torch.manual_seed(0)
    m = DSMoE(hidden_size=cfg.dim, expert=SwiGLU(), num_experts=cfg.n_experts, ep_size=world, k=cfg.top_k,
              drop_tokens=False, use_rts=False)
    m.set_deepspeed_parallelism()
    return m


def _bench(rank, world, args):
    from xtrain.comm import ReduceOp, get_comm
    from xtrain.formulas import ep_dispatch_bytes
    from xtrain.mesh import Mesh
    from xtrain.model import ModelConfig
    from xtrain.model.moe import MoE
    from xtrain.parallel.expert import AllGatherDispatcher, AllToAllDispatcher

    torch.set_num_threads(1)
    mesh = Mesh.build(world, rank, ep=world)
    comm = get_comm(args["comm"])
    group = mesh.group("ep")
    cfg = ModelConfig(dim=args["dim"], n_experts=args["experts"], top_k=args["top_k"], n_shared_experts=0,
                      moe_ffn_hidden=args["hidden"])
    layers = {}
    for kind, cls in (("alltoall", AllToAllDispatcher), ("allgather", AllGatherDispatcher)):
        torch.manual_seed(0)
        m = MoE(cfg)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02)
        local = cfg.n_experts // world
        for name in ("gate", "up", "down"):
            setattr(m.experts, name, torch.nn.Parameter(getattr(m.experts, name).detach()[rank * local:(rank + 1) * local].clone()))
        m.dispatcher = cls(comm, group, world, rank, cfg.n_experts)
        layers[kind] = m
    kinds, ds_error = KINDS, None
    if args.get("deepspeed"):
        try:
            layers["deepspeed"] = _deepspeed_layer(world, cfg)
            kinds = (*KINDS, "deepspeed")
        except Exception as e:  # noqa: BLE001 - recorded, not fatal: the xtrain rows still run
            ds_error = f"{type(e).__name__}: {e}"
    x = torch.randn(1, args["tokens"], args["dim"], generator=torch.Generator().manual_seed(rank + 1))
    times = {k: [] for k in kinds}
    sent = {k: [] for k in kinds}
    formula = {}
    for rep in range(args["reps"] + 1):  # rep 0 warms up
        for kind in kinds:
            m = layers[kind]
            xi = x.clone().requires_grad_()
            comm.barrier(group=group)
            comm.ledger.take_step()
            t0 = time.perf_counter()
            y = m(xi)
            if kind == "deepspeed":
                y, _, ds_counts = y
            y.square().mean().backward()
            dt = time.perf_counter() - t0
            b = sum(e["bytes_sent"] for e in comm.ledger.take_step().values())
            if rep:
                times[kind].append(dt)
                sent[kind].append(b)
            if rep == 0 and kind == "deepspeed":
                # Not on xtrain's ledger (DeepSpeed calls torch.distributed itself): its two
                # all-to-alls of the (E, C, D) dispatch tensor each way, forward and backward.
                cap = ds_counts.max().clone()
                comm.all_reduce(cap, op=ReduceOp.MAX, group=group)
                formula[kind] = (4 * (world - 1) * cfg.n_experts * int(cap) * cfg.dim * 4 // world, None)
            elif rep == 0:
                counts = m.last_stats.counts
                every = [torch.zeros_like(counts) for _ in range(world)]
                comm.all_gather(every, counts, group=group)
                loc = cfg.n_experts // world
                rows_to = [int(counts[d * loc:(d + 1) * loc].sum()) for d in range(world)]
                rows_from = [int(every[s][rank * loc:(rank + 1) * loc].sum()) for s in range(world)]
                f = ep_dispatch_bytes(kind, rank, world, cfg.dim, 4, cfg.n_experts, rows_to=rows_to,
                                      rows_from=rows_from, N=args["tokens"], top_k=cfg.top_k)
                uni = ep_dispatch_bytes(kind, rank, world, cfg.dim, 4, cfg.n_experts, N=args["tokens"], top_k=cfg.top_k)
                formula[kind] = (f["forward"] + f["backward"], uni["forward"] + uni["backward"])
            for p in m.parameters():
                p.grad = None
    return {"times": times, "sent": sent, "formula": formula, "deepspeed_error": ds_error}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256, help="expert hidden width")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--comm", default="xtrain", choices=["xtrain", "torch"])
    ap.add_argument("--deepspeed", action="store_true", help="also time deepspeed.moe.layer.MoE, interleaved")
    a = ap.parse_args(argv)
    from xtrain.spawn import run_on_ranks

    args = {"tokens": a.tokens, "dim": a.dim, "experts": a.experts, "top_k": a.top_k, "hidden": a.hidden,
            "reps": a.reps, "comm": a.comm, "deepspeed": a.deepspeed}
    print(f"MoE layer fwd+bwd: {a.tokens} tokens/rank, D={a.dim}, E={a.experts}, top_k={a.top_k}, F={a.hidden}, "
          f"fp32, comm={a.comm}, {a.reps} reps (median; spread min-max)")
    print("| ep | dispatcher | ms/iter (min-max) | tokens/s | MiB sent rank 0 (ledger) | formula (routing) | formula (uniform) | vs alltoall: time, bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for ep in a.ep:
        res = run_on_ranks(_bench, ep, args, timeout=600, pg_timeout=300)
        base = {}
        for kind in res[0]["times"]:
            per_rep = [max(r["times"][kind][i] for r in res) for i in range(a.reps)]
            med = statistics.median(per_rep)
            f, uni = res[0]["formula"][kind]
            base.setdefault("t", med)
            if kind == "deepspeed":  # DeepSpeed's traffic bypasses the ledger: estimate only
                print(f"| {ep} | deepspeed (dense dispatch, dropless) | {med * 1e3:.1f} ({min(per_rep) * 1e3:.1f}-"
                      f"{max(per_rep) * 1e3:.1f}) | {ep * a.tokens / med:,.0f} | not on the ledger | "
                      f"{f / 2**20:.3f} (4 all-to-alls of E·C·D) | | {med / base['t']:.2f}x, {f / base['b']:.2f}x |")
                continue
            led = res[0]["sent"][kind][0]
            base.setdefault("b", led)
            print(f"| {ep} | {kind} | {med * 1e3:.1f} ({min(per_rep) * 1e3:.1f}-{max(per_rep) * 1e3:.1f}) | "
                  f"{ep * a.tokens / med:,.0f} | {led / 2**20:.3f} | {f / 2**20:.3f} | {uni / 2**20:.3f} | "
                  f"{med / base['t']:.2f}x, {led / base['b']:.2f}x |")
        if res[0]["deepspeed_error"]:
            print(f"| {ep} | deepspeed | failed: {res[0]['deepspeed_error']} | | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
