#!/usr/bin/env python
"""xtrain's context-parallel attention (ring zigzag, ring contiguous,
allgather, ulysses) side by side on 2 and 4 gloo ranks, and against the
public CPU-capable peer ``ring-attention-pytorch`` (lucidrains) at the same
shapes: forward + backward of one causal attention layer, tokens/s and peak
memory per rank.

    python scripts/bench_context_parallel.py                         # 2 and 4 ranks, B=1 H=8 K=4 E=64 T=4096, fp32
    python scripts/bench_context_parallel.py --nproc 2 --repeats 3 --iters 4
    python scripts/bench_context_parallel.py --nproc 2 --seq-len 64 --heads 4 --kv-heads 2 --head-dim 8 \\
        --iters 2 --warmup 1 --repeats 1                             # the smoke test's setting

Every rank builds the same full q (B,H,T,E), k, v (B,K,T,E) and output
gradient (same seed) and takes its own columns: xtrain's from
``SequenceLayout(layout, cp).columns(rank, T)`` into
``xtrain.parallel.context.context_attention(q, k, v, CPGroup(...), variant)``
(layout (B,H,Tl,E), comm from ``--comm``); the peer's in its own layout
(B,Tl,H,E) and its own sharding:

- ``ring_flash_attn(q, k, v, causal=True, ring_reduce_col=True,
  striped_ring_attn=True, bucket_size=...)``: its ring, with striped
  load balancing (Brandon et al., arXiv:2311.09431): the columns are
  permuted as its ``RingAttention`` module does (``'b (i j) d -> b (j i) d'``
  with i = bucket size, then rank r takes the r-th run of T/cp), so rank r
  holds positions r, r+cp, ... when the bucket is T/cp. Paired with xtrain's
  ring zigzag (both balance the causal work).
- the same without striping (contiguous: rank r holds run r): paired with
  xtrain's ring contiguous. The peer computes every block and masks future
  ones; xtrain skips them.
- ``zig_zag_attn`` (its Llama-3 all-gather of k and v, then SDPA) on
  ``zig_zag_shard``'s columns (rank r holds chunks r and 2cp-1-r, the same as
  xtrain's zigzag), with the causal mask from its q/kv positions: paired with
  xtrain's allgather.

The peer is optional (``pip install ring-attention-pytorch``, see
docs/context-parallel.md); without it the peer columns read "-".

Correctness, before timing: each implementation's output and dQ/dK/dV of
this rank's columns against torch's SDPA over the whole sequence (fp32
reference), and xtrain's output against the paired peer's, both all-gathered
into position order (the same computation: must agree within 1e-5 in fp32).

Timing: per iteration every rank passes a barrier (not timed), then the clock
runs over forward and backward (``out.backward(dout)``); an iteration's time
is the slowest rank's; the first ``--warmup`` iterations of each
(implementation, round) are dropped; ``--repeats`` rounds alternate the order
of the implementations, so load from other processes hits all alike.
Tokens/s = B*T (the whole sequence, one attention layer, forward + backward)
over the median iteration time; "paired" is the median of per-iteration
peer/xtrain time ratios of the same round. CPU s: ``time.process_time`` over
the same interval summed over ranks. Peak memory: per rank, the resident
set's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
before each iteration) minus the resident set before it (inputs already
allocated), median over iterations, the largest rank's; glibc's mmap
threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the
resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from xtrain.spawn import run_on_ranks

TARGET = 0.95  # xtrain ring zigzag tokens/s at least this fraction of the peer's
XTRAIN = {  # name -> (variant, layout)
    "ring zigzag": ("ring", "zigzag"),
    "ring contiguous": ("ring", "contiguous"),
    "allgather zigzag": ("allgather", "zigzag"),
    "ulysses zigzag": ("ulysses", "zigzag"),
}
PEER_OF = {"ring zigzag": "peer ring striped", "ring contiguous": "peer ring contiguous", "allgather zigzag": "peer zig_zag_attn"}
MB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peer_available() -> bool:
    try:
        import ring_attention_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


# -- memory: the resident set's high-water mark ------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


# -- the implementations -----------------------------------------------------------------

def xtrain_columns(layout: str, cp: int, rank: int, T: int) -> torch.Tensor:
    from xtrain.parallel.context import SequenceLayout

    return SequenceLayout(layout, cp).columns(rank, T)


def striped_positions(T: int, cp: int, bucket: int) -> torch.Tensor:
    """The peer's striped permutation (its RingAttention's
    ``rearrange(x, 'b (i j) d -> b (j i) d', i=bucket)``): entry n holds position perm[n]."""
    return torch.arange(T).view(bucket, T // bucket).t().reshape(-1)


def peer_columns(name: str, cp: int, rank: int, T: int, bucket: int) -> torch.Tensor:
    Tl = T // cp
    if name == "peer ring striped":
        return striped_positions(T, cp, bucket)[rank * Tl:(rank + 1) * Tl]
    if name == "peer ring contiguous":
        return torch.arange(rank * Tl, (rank + 1) * Tl)
    if name == "peer zig_zag_attn":
        return xtrain_columns("zigzag", cp, rank, T)  # zig_zag_shard: chunks r and 2cp-1-r (checked in make_impl)
    raise ValueError(name)


def make_impl(name: str, ctx: dict):
    """(columns, fn): ``fn(q, k, v)`` on this rank's columns in (B,H,Tl,E) layout,
    returning the output in the same layout (autograd through it)."""
    cp, rank, T, bucket = ctx["cp"], ctx["rank"], ctx["T"], ctx["bucket"]
    if name in XTRAIN:
        from xtrain.parallel.context import CPGroup, SequenceLayout, context_attention

        variant, layout = XTRAIN[name]
        group = ctx["mesh"].group("cp")
        prev, nxt = ctx["mesh"].neighbours("cp")
        cpg = CPGroup(ctx["comm"], group, ctx["mesh"].coord("cp"), cp, prev, nxt, SequenceLayout(layout, cp), ctx["kernel"])
        return xtrain_columns(layout, cp, rank, T), lambda q, k, v: context_attention(q, k, v, cpg, variant)
    cols = peer_columns(name, cp, rank, T, bucket)
    # GQA: the peer repeats kv heads tiled (einops '... h d -> ... (g h) d': query head g*K + h reads kv
    # head h); xtrain (and torch's enable_gqa) interleaved (query head h*rep + g reads kv head h).
    # The same computation with the query heads relabelled: feed the peer q[:, perm], undo on the way out.
    H, K = ctx["heads"], ctx["kv_heads"]
    perm = torch.tensor([(j % K) * (H // K) + j // K for j in range(H)])
    inv = torch.argsort(perm)
    if name.startswith("peer ring"):
        from ring_attention_pytorch import ring_flash_attn

        striped = name == "peer ring striped"

        def fn(q, k, v):
            qt, kt, vt = (t.transpose(1, 2) for t in (q[:, perm], k, v))  # (B,Tl,H,E): the peer's layout
            out = ring_flash_attn(qt, kt, vt, None, True, bucket, True, striped)
            return out.transpose(1, 2)[:, inv]

        return cols, fn
    from ring_attention_pytorch.zig_zag_attention import zig_zag_attn, zig_zag_shard

    probe, _ = zig_zag_shard(torch.arange(T).view(1, T, 1).float())
    if not torch.equal(probe.local_sequence.view(-1).long(), cols):
        raise RuntimeError("ring-attention-pytorch's zig_zag_shard columns differ from xtrain's zigzag columns")
    mask = probe.query_positions[:, None] >= probe.key_value_positions[None, :]

    def fn(q, k, v):
        return zig_zag_attn(q[:, perm], k, v, attn_mask=mask)[:, inv]

    return cols, fn


# -- the job -------------------------------------------------------------------------------

def _inputs(args):
    g = torch.Generator().manual_seed(args["seed"])
    B, H, K, T, E = args["batch"], args["heads"], args["kv_heads"], args["seq_len"], args["head_dim"]
    q = torch.randn(B, H, T, E, generator=g)
    k = torch.randn(B, K, T, E, generator=g)
    v = torch.randn(B, K, T, E, generator=g)
    dout = torch.randn(B, H, T, E, generator=g)
    return q, k, v, dout


def _reference(q, k, v, dout):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _gather_natural(x: torch.Tensor, cols: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's (B,H,Tl,E) columns into one (B,H,T,E) in position order."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    all_cols = [torch.empty_like(cols) for _ in range(world)]
    dist.all_gather(all_cols, cols.contiguous())
    full = torch.empty(x.shape[0], x.shape[1], x.shape[2] * world, x.shape[3], dtype=x.dtype)
    for c, p in zip(all_cols, parts):
        full[:, :, c] = p
    return full


def bench_worker(rank, world, args):
    import warnings

    from xtrain.comm import get_comm
    from xtrain.mesh import Mesh

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dtype = DTYPES[args["dtype"]]
    mesh = Mesh.build(world, rank, cp=world)
    ctx = {"cp": world, "rank": rank, "T": args["seq_len"], "heads": args["heads"], "kv_heads": args["kv_heads"], "bucket": min(args["peer_bucket"], args["seq_len"] // world),
           "mesh": mesh, "comm": get_comm(args["comm"]), "kernel": args["kernel"]}
    q, k, v, dout = _inputs(args)
    names = [n for n in args["impls"] if not (XTRAIN.get(n, ("",))[0] == "ulysses" and (args["heads"] % world or args["kv_heads"] % world))]
    impls = {n: make_impl(n, ctx) for n in names}
    result = {"rank": rank, "impls": names, "check": {}, "times": {n: [] for n in names}, "cpu": {n: [] for n in names},
              "mem": {n: [] for n in names}, "rss_reset": reset_peak_rss()}

    # correctness: against the full-sequence reference (fp32) and xtrain against its peer
    if args["check"]:
        ref = _reference(q, k, v, dout)
        outs = {}
        for n, (cols, fn) in impls.items():
            ql, kl, vl = (t[:, :, cols].to(dtype).requires_grad_() for t in (q, k, v))
            out = fn(ql, kl, vl)
            out.backward(dout[:, :, cols].to(dtype))
            errs = {"out": (out.float() - ref[0][:, :, cols]).abs().max().item()}
            for key, got, want in (("dq", ql.grad, ref[1]), ("dk", kl.grad, ref[2]), ("dv", vl.grad, ref[3])):
                errs[key] = (got.float() - want[:, :, cols]).abs().max().item()
            outs[n] = _gather_natural(out.detach().float(), cols, world)
            result["check"][n] = errs
        for n, peer in PEER_OF.items():
            if n in outs and peer in outs:
                result["check"][f"{n} vs {peer}"] = {"out": (outs[n] - outs[peer]).abs().max().item()}

    for r in range(args["repeats"]):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            cols, fn = impls[n]
            ql, kl, vl = (t[:, :, cols].to(dtype).contiguous().requires_grad_() for t in (q, k, v))
            dl = dout[:, :, cols].to(dtype).contiguous()
            for i in range(args["warmup"] + args["iters"]):
                ql.grad = kl.grad = vl.grad = None
                dist.barrier()
                base = rss_bytes()
                reset_peak_rss()
                c0, t0 = time.process_time(), time.perf_counter()
                out = fn(ql, kl, vl)
                out.backward(dl)
                t1, c1 = time.perf_counter(), time.process_time()
                peak = peak_rss_bytes() - base
                del out
                if i >= args["warmup"]:
                    result["times"][n].append((r, t1 - t0))
                    result["cpu"][n].append((r, c1 - c0))
                    result["mem"][n].append(peak)
    return result


# -- tables ----------------------------------------------------------------------------------

def summarise(per_rank: list[dict], tokens: int) -> dict:
    """Per implementation: iteration times (the slowest rank's), tokens/s, CPU s
    (summed over ranks), peak memory (the largest rank's median), errors."""
    names = per_rank[0]["impls"]
    res = {}
    for n in names:
        steps = list(zip(*[pr["times"][n] for pr in per_rank]))  # per iteration: (round, s) of each rank
        times = [max(s for _, s in it) for it in steps]
        rounds = [it[0][0] for it in steps]
        cpu = [sum(s for _, s in it) for it in zip(*[pr["cpu"][n] for pr in per_rank])]
        mem = max(statistics.median(pr["mem"][n]) for pr in per_rank)
        errs = {}
        for pr in per_rank:
            for key, e in pr["check"].get(n, {}).items():
                errs[key] = max(errs.get(key, 0.0), e)
        res[n] = {"step_s": times, "rounds": rounds, "tok_s": tokens / statistics.median(times),
                  "cpu_s": statistics.median(cpu), "peak_mem_bytes": mem, "errors": errs}
    for n, peer in PEER_OF.items():
        if n in res and peer in res:
            pairs = [b / a for a, b, ra, rb in zip(res[n]["step_s"], res[peer]["step_s"], res[n]["rounds"], res[peer]["rounds"]) if ra == rb]
            res[n]["peer"] = peer
            res[n]["vs_peer"] = res[n]["tok_s"] / res[peer]["tok_s"]
            res[n]["paired"] = statistics.median(pairs)
            res[n]["out_vs_peer"] = max(pr["check"].get(f"{n} vs {peer}", {}).get("out", float("nan")) for pr in per_rank)
    return res


HEADER = ("| cp | xtrain variant | tok/s | vs ring zigzag | CPU s (all ranks) | peak MiB / rank | max err vs SDPA (out, dq, dk, dv) "
          "| peer | peer tok/s | xtrain/peer | paired | peer CPU s | CPU peer/xtrain | peer peak MiB | max |out - peer out| |")
RULE = "|---:|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"


def _fmt_err(errs: dict) -> str:
    keys = [k for k in ("out", "dq", "dk", "dv") if k in errs]
    return " / ".join(f"{errs[k]:.1e}" for k in keys) if keys else "-"


def table_rows(cp: int, res: dict) -> list[str]:
    """One row per xtrain variant, its peer (if any) beside it."""
    rows = []
    base = res.get("ring zigzag", {}).get("tok_s")
    for n in XTRAIN:
        if n not in res:
            continue
        r = res[n]
        rel = f"{r['tok_s'] / base:.3f}" if base else "-"
        row = (f"| {cp} | {n} | {r['tok_s']:,.0f} | {rel} | {r['cpu_s']:.2f} | {r['peak_mem_bytes'] / MB:.1f} | "
               f"{_fmt_err(r['errors'])} | ")
        peer = r.get("peer")
        if peer:
            p = res[peer]
            row += (f"{peer} | {p['tok_s']:,.0f} | {r['vs_peer']:.3f} | {r['paired']:.3f} | {p['cpu_s']:.2f} | "
                    f"{p['cpu_s'] / r['cpu_s']:.3f} | {p['peak_mem_bytes'] / MB:.1f} | {r['out_vs_peer']:.1e} |")
        else:
            row += "- | - | - | - | - | - | - | - |"
        rows.append(row)
    return rows


def peer_rows(cp: int, res: dict) -> list[str]:
    """The peer's own correctness against SDPA."""
    return [f"| {cp} | {n} | {_fmt_err(res[n]['errors'])} |" for n in PEER_OF.values() if n in res]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4], help="cp ranks (one job each; default 2 4)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8, help="query heads H (default 8)")
    ap.add_argument("--kv-heads", type=int, default=4, help="kv heads K (GQA; default 4)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=4096, help="whole sequence T (a multiple of 2*cp)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--comm", default="xtrain", choices=("xtrain", "torch"))
    ap.add_argument("--kernel", default="auto", choices=("auto", "math"), help="xtrain's block kernel (strategy.cp_kernel)")
    ap.add_argument("--peer", default="auto", choices=("auto", "on", "off"), help="ring-attention-pytorch beside xtrain (auto: if installed)")
    ap.add_argument("--peer-bucket", type=int, default=1024, help="the peer's bucket_size (its tile; capped at T/cp; default 1024)")
    ap.add_argument("--impls", default=",".join(XTRAIN), help="comma list of xtrain variants: " + ", ".join(XTRAIN))
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per implementation and round (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="iterations dropped per implementation and round (default 1)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds, alternating the order (default 2)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.impls.split(",") if n.strip()]
    if any(n not in XTRAIN for n in names):
        ap.error(f"--impls: choose from {list(XTRAIN)}")
    use_peer = args.peer == "on" or (args.peer == "auto" and peer_available())
    if args.peer == "on" and not peer_available():
        ap.error("--peer on: ring-attention-pytorch is not installed (pip install ring-attention-pytorch)")
    if use_peer:
        names += [PEER_OF[n] for n in names if n in PEER_OF]
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # inherited by the spawned ranks
    B, T = args.batch, args.seq_len
    print(f"attention fwd+bwd: B={B} H={args.heads} K={args.kv_heads} E={args.head_dim} T={T} {args.dtype} comm={args.comm} "
          f"kernel={args.kernel} | peer: {'ring-attention-pytorch bucket ' + str(args.peer_bucket) if use_peer else 'off'} | "
          f"{args.repeats} rounds x {args.warmup + args.iters} iterations ({args.warmup} dropped) | torch {torch.__version__}, "
          f"{os.cpu_count()} cores, {platform.machine()}, load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    job = {"batch": B, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "seq_len": T,
           "dtype": args.dtype, "comm": args.comm, "kernel": args.kernel, "peer_bucket": args.peer_bucket, "impls": names,
           "iters": args.iters, "warmup": args.warmup, "repeats": args.repeats, "check": not args.no_check, "seed": args.seed}
    rows, prow, results = [], [], {}
    for cp in args.nproc:
        if T % (2 * cp):
            print(f"note: T={T} is not a multiple of 2*cp={2 * cp}; cp={cp} skipped")
            continue
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        per_rank = run_on_ranks(bench_worker, cp, job, timeout=3600, pg_timeout=600)
        print(f"cp={cp} job: {time.perf_counter() - t0:.0f} s, load avg {load0:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
        res = summarise(per_rank, B * T)
        results[cp] = res
        rows += table_rows(cp, res)
        prow += peer_rows(cp, res)
    print()
    print(HEADER)
    print(RULE)
    print("\n".join(rows))
    if prow:
        print("\n| cp | peer | max err vs SDPA (out, dq, dk, dv) |\n|---:|---|---|")
        print("\n".join(prow))
    for cp, res in results.items():
        r = res.get("ring zigzag", {})
        if "vs_peer" in r:
            verdict = "meets" if r["vs_peer"] >= TARGET else "MISSES"
            print(f"cp={cp} ring zigzag / {r['peer']}: tokens/s {r['vs_peer']:.3f} (target >= {TARGET}) -> {verdict}; "
                  f"paired {r['paired']:.3f}; CPU s peer/xtrain {res[r['peer']]['cpu_s'] / r['cpu_s']:.3f}; per-iteration s xtrain "
                  + " ".join(f"{x:.2f}" for x in r["step_s"]) + " | peer " + " ".join(f"{x:.2f}" for x in res[r["peer"]]["step_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
