#!/usr/bin/env python
"""Benchmark xtrain's hand-written collectives against torch's built-ins, nccl-tests style.

    python scripts/bench_comm.py --nproc 4 [--plot [PNG]] [--markdown MD]

For message sizes from 1 KB to 64 MB (doubling) and each collective, both
implementations run in the same job, interleaved round by round
(alternating which goes first), so that oversubscribed cores slow both
alike. A round times, as nccl-tests does, ``--batch`` calls issued back to
back after a barrier, and divides by their number; the round's time is the
slowest rank's, and the table shows the median over rounds. ``--batch 1``
times single calls between barriers (the latency of one isolated call,
which on oversubscribed cores includes the ranks' skew leaving the barrier).

Columns follow nccl-tests: ``size`` is the largest buffer (the full tensor
of all_reduce/broadcast, the gathered output of all_gather, the input of
reduce_scatter, the whole send buffer of all_to_all); ``algbw = size /
time``; ``busbw = algbw * factor`` with nccl-tests' factors
(``xtrain.formulas.busbw_factor``: all_reduce 2(n-1)/n; all_gather,
reduce_scatter, all_to_all (n-1)/n; broadcast, reduce 1), so busbw compares
with the link speed whatever n is.

``q25-q75`` are the quartiles of the ratio round by round (both
implementations run in every round, so a round's ratio cancels what slowed
the whole machine then): where they straddle 1 the two are not told apart.

``#wrong`` (as in nccl-tests) counts, over all ranks, the elements of xtrain's
result that differ from torch's for one call each on the same inputs: it
must be 0 (exact for the collectives that move data, within float round-off
for sums).

Environment switches force one algorithm, for A/B runs: ``XTRAIN_ALL_REDUCE``
(``ring`` or ``two_shot``; default ``auto``, by size), ``XTRAIN_A2A_RECVS_FIRST=1``
(direct exchanges post receives first), ``XTRAIN_SEGMENT_BYTES``,
``XTRAIN_SCATTER_RING_MAX_BYTES``.

``cpu us`` is the CPU time per call of a rank's process (all its threads,
gloo's event loop included; mean over ranks): on oversubscribed cores the
ranks share the CPU, so what one spends the others wait for.

``--ddp-hook`` times instead training steps of torch's own
``DistributedDataParallel`` (an MLP, several gradient buckets) whose bucket
all-reduce runs through a comm hook: torch's default (gloo's all-reduce),
xtrain's ring returned as a future (``all_reduce(async_op=True).get_future()``,
communication overlapping the rest of backward), and xtrain's ring blocking
inside the hook; beside them the step with no communication at all and the
all-reduce of every gradient alone. The variants run interleaved step by step;
the table shows medians over steps of the slowest rank.

    python scripts/bench_comm.py --ddp-hook --nproc 2 [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xtrain.formulas import busbw_factor  # noqa: E402
from xtrain.spawn import run_on_ranks  # noqa: E402

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "reduce")
DEFAULT_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")


def _rounds(size: int, batch: int, budget: int, lo: int, hi: int) -> int:
    """Rounds for one size: ``budget`` bytes per implementation, within [lo, hi]."""
    return max(lo, min(hi, budget // max(size * batch, 1)))


def _batch(size: int, batch: int) -> int:
    """Calls per round: ``batch``, but at most what keeps a round's data near 64 MB."""
    return max(1, min(batch, (64 << 20) // max(size, 1)))


def _refill(t, n: int, calls: int) -> None:
    """Fresh values for ``calls`` in-place sums over ``n`` ranks that stay finite and normal.

    The first sum scales typical values by about sqrt(n), each later one by n
    (the ranks then hold equal values), so they start at n^(-(calls - 1/2)/2)
    and end about as far above 1. float16's exponent is too narrow for that
    (the start would be subnormal, and subnormal arithmetic is slow on CPUs),
    and integers would overflow: they get zeros.
    """
    import torch

    start = n ** (-(calls - 0.5) / 2)
    if not t.dtype.is_floating_point or torch.finfo(t.dtype).tiny > start / 1e3:
        t.zero_()
    else:
        t.normal_().mul_(start)


def _bench_worker(rank: int, world: int, ops, sizes, budget, min_iters, max_iters, dtype_name, batch):
    import torch
    import torch.distributed as dist

    import xtrain.comm.ring as ring
    from xtrain.comm import get_comm

    if os.environ.get("XTRAIN_SEGMENT_BYTES"):  # for tuning the pipeline depth
        ring.SEGMENT_BYTES = int(os.environ["XTRAIN_SEGMENT_BYTES"])
    if os.environ.get("XTRAIN_SCATTER_RING_MAX_BYTES"):  # for tuning broadcast's switch to the chain
        import xtrain.comm.tree as tree

        tree.SCATTER_RING_MAX_BYTES = int(os.environ["XTRAIN_SCATTER_RING_MAX_BYTES"])
    import xtrain.comm.direct as direct

    if os.environ.get("XTRAIN_A2A_RECVS_FIRST"):  # direct exchanges' posting order, for measurement
        direct.SENDS_FIRST = False
    algo = os.environ.get("XTRAIN_ALL_REDUCE", "auto")  # force all-reduce's algorithm, for measurement
    if algo != "auto":
        direct.TWO_SHOT_MIN_CHUNK_BYTES, direct.TWO_SHOT_MAX_CHUNK_BYTES = (0, 1 << 62) if algo == "two_shot" else (1 << 62, 0)
    torch.manual_seed(rank)
    dtype = getattr(torch, dtype_name)
    esize = torch.tensor([], dtype=dtype).element_size()
    comms = {"xtrain": get_comm("xtrain"), "torch": get_comm("torch")}
    for c in comms.values():
        c.ledger.enabled = False
    n = world
    out = {}
    for op in ops:
        for size in sizes:
            count = max(n, size // esize // n * n)  # elements of the largest buffer, divisible by n
            big = torch.randn(count).to(dtype)
            part = torch.randn(count // n).to(dtype)
            out_big = torch.empty(count, dtype=dtype)
            out_part = torch.empty(count // n, dtype=dtype)

            def call(comm):
                """One call; returns the tensor it wrote (the result on every rank)."""
                if op == "all_reduce":
                    comm.all_reduce(big)
                    return big
                if op == "all_gather":
                    comm.all_gather_into_tensor(out_big, part)
                    return out_big
                if op == "reduce_scatter":
                    comm.reduce_scatter_tensor(out_part, big)
                    return out_part
                if op == "broadcast":
                    comm.broadcast(big, src=0)
                    return big
                if op == "reduce":
                    comm.reduce(big, dst=0)
                    return big if rank == 0 else big[:0]
                comm.all_to_all_single(out_big, big)
                return out_big

            wrong = _wrong(call, comms, big, (out_big, out_part), op, n)
            calls = _batch(count * esize, batch)
            rounds = _rounds(count * esize, calls, budget, min_iters, max_iters)
            times = {name: [] for name in comms}
            cpu = {name: [] for name in comms}
            for it in range(rounds + 1):  # the first round warms up and is dropped
                order = ("xtrain", "torch") if it % 2 else ("torch", "xtrain")
                for name in order:
                    if op in ("all_reduce", "reduce"):
                        _refill(big, n, calls)
                    dist.barrier()
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(calls):
                        call(comms[name])
                    dt = (time.perf_counter() - t0) / calls
                    if it:
                        times[name].append(dt)
                        cpu[name].append((time.process_time() - c0) / calls)
            out[(op, count * esize)] = (times, cpu, wrong)
    return out


def _ddp_worker(rank: int, world: int, steps: int, width: int, layers: int, batch: int, bucket_mb: float):
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import xtrain.comm.dist as xdist

    xdist.get_ledger().enabled = False

    def model():
        torch.manual_seed(0)
        mods = []
        for _ in range(layers):
            mods += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*mods)

    hook_calls = [0]

    def future_hook(_, bucket):
        hook_calls[0] += 1
        return xdist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0].div_(world))

    def blocking_hook(_, bucket):
        buf = bucket.buffer()
        xdist.all_reduce(buf)
        fut = torch.futures.Future()
        fut.set_result(buf.div_(world))
        return fut

    variants = {}
    for name, hook in (("torch DDP (gloo all-reduce)", None), ("xtrain hook, future (overlapped)", future_hook),
                       ("xtrain hook, blocking in the hook", blocking_hook)):
        m = DDP(model(), bucket_cap_mb=bucket_mb)
        if hook is not None:
            m.register_comm_hook(None, hook)
        variants[name] = m
    variants["no communication (local backward)"] = model()
    grads = [p.detach().clone() for p in model().parameters()]
    variants["all-reduce of every gradient alone (xtrain)"] = None
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in variants.items() if m is not None}
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, width, generator=g)
    times = {k: [] for k in variants}
    for it in range(steps + 2):  # two warm-up steps (DDP rebuilds its buckets after the first)
        keys = list(variants) if it % 2 else list(reversed(variants))
        for k in keys:
            dist.barrier()
            t0 = time.perf_counter()
            m = variants[k]
            if m is None:
                for t in grads:
                    xdist.all_reduce(t)
            else:
                opts[k].zero_grad()
                m(x).square().mean().backward()
                opts[k].step()
            if it >= 2:
                times[k].append(time.perf_counter() - t0)
    buckets = round(hook_calls[0] / (steps + 2))  # the hook runs once per bucket and step
    return times, buckets, sum(p.numel() for p in grads) * 4


def run_ddp(nproc: int, steps: int, width: int, layers: int, batch: int, bucket_mb: float) -> str:
    per_rank = run_on_ranks(_ddp_worker, nproc, steps, width, layers, batch, bucket_mb, timeout=1800, pg_timeout=300)
    names = list(per_rank[0][0])
    buckets, nbytes = per_rank[0][1], per_rank[0][2]
    title = (
        f"# DDP step (forward, backward with the bucket all-reduces, SGD step): {nproc} ranks, "
        f"MLP {layers} x Linear({width}, {width}), batch {batch}, {nbytes / 2**20:.1f} MiB of gradients, "
        f"{buckets} buckets of <= {bucket_mb} MB; median over {steps} steps of the slowest rank"
    )
    lines = [
        title,
        "",
        "| variant | step time (ms) | q25-q75 (ms) |",
        "|---|---:|---:|",
    ]
    for k in names:
        rounds = [max(t) for t in zip(*(r[0][k] for r in per_rank))]
        q1, med, q3 = statistics.quantiles(rounds, n=4)
        lines.append(f"| {k} | {med * 1e3:.1f} | {q1 * 1e3:.1f}-{q3 * 1e3:.1f} |")
    return "\n".join(lines)


def _wrong(call, comms, big, outputs, op: str, n: int) -> int:
    """Elements of xtrain's result that differ from torch's, one call each on the same inputs
    (nccl-tests' ``#wrong``): exact for the collectives that move data, within float
    round-off of n-term sums for the reducing ones. The output buffers are filled
    with a sentinel before each call, so an element left unwritten counts."""
    import torch

    start = big.clone()
    got = {}
    for name, comm in comms.items():
        big.copy_(start)
        for o in outputs:
            o.fill_(-7)
        got[name] = call(comm).clone()
    big.copy_(start)
    x, t = got["xtrain"].double(), got["torch"].double()
    if op in ("all_reduce", "reduce_scatter", "reduce"):
        tol = 4 * n * torch.finfo(big.dtype).eps if big.dtype.is_floating_point else 0.0
        bad = (x - t).abs() > tol * (1 + t.abs())
    else:
        bad = x != t
    return int(bad.sum())


def _round_times(per_rank, key, name) -> list[float]:
    """Each round's time: the slowest rank's."""
    return [max(t) for t in zip(*(r[key][0][name] for r in per_rank))]


def _median_over_ranks(per_rank, key, name):
    """Per round the slowest rank's time; then the median over rounds."""
    return statistics.median(_round_times(per_rank, key, name))


def _ratio_spread(per_rank, key) -> tuple[float, float]:
    """Quartiles of the per-round busbw ratio (torch's round time over xtrain's, rounds paired).

    Both run in every round, so a round's ratio cancels what slowed the whole
    machine then; where the quartiles straddle 1 the two are not told apart.
    """
    ratios = [t / x for x, t in zip(_round_times(per_rank, key, "xtrain"), _round_times(per_rank, key, "torch"))]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, q3


def _wrong_over_ranks(per_rank, key) -> int:
    return sum(r[key][2] for r in per_rank)


def _cpu_per_call(per_rank, key, name):
    """CPU seconds (all of a rank's threads, gloo's included) per call: mean over ranks of the median round."""
    return statistics.mean(statistics.median(r[key][1][name]) for r in per_rank)


def _human(nbytes: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def run(nproc, ops, sizes, budget, min_iters, max_iters, dtype, batch=20):
    per_rank = run_on_ranks(
        _bench_worker, nproc, ops, sizes, budget, min_iters, max_iters, dtype, batch, timeout=3000, pg_timeout=300
    )
    rows = []
    for key in per_rank[0]:
        op, size = key
        row = {"op": op, "size": size}
        for name in ("xtrain", "torch"):
            t = _median_over_ranks(per_rank, key, name)
            algbw = size / t / 1e9
            row[name] = (t, algbw, algbw * busbw_factor(op, nproc))
            row[name + "_cpu"] = _cpu_per_call(per_rank, key, name)
        row["ratio"] = row["xtrain"][2] / row["torch"][2]
        row["wrong"] = _wrong_over_ranks(per_rank, key)
        row["spread"] = _ratio_spread(per_rank, key)
        rows.append(row)
    return rows


def text_table(rows, nproc, dtype) -> str:
    import torch

    esize = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    lines = []
    for op in dict.fromkeys(r["op"] for r in rows):
        lines.append(f"# {op}  nranks {nproc}  dtype {dtype}  (busbw factor {busbw_factor(op, nproc):.3f})")
        lines.append(
            f"#{'size':>9} {'count':>10} | {'xtrain us':>11} {'cpu us':>9} {'algbw':>7} {'busbw':>7} | "
            f"{'torch us':>11} {'cpu us':>9} {'algbw':>7} {'busbw':>7} | {'ratio':>6} {'q25-q75':>10} {'#wrong':>6}"
        )
        for r in rows:
            if r["op"] != op:
                continue
            (tx, ax, bx), (tt, at, bt) = r["xtrain"], r["torch"]
            cx, ct = r["xtrain_cpu"], r["torch_cpu"]
            lines.append(
                f"{_human(r['size']):>10} {r['size'] // esize:>10} | {tx * 1e6:>11.1f} {cx * 1e6:>9.0f} {ax:>7.3f} {bx:>7.3f} | "
                f"{tt * 1e6:>11.1f} {ct * 1e6:>9.0f} {at:>7.3f} {bt:>7.3f} | {r['ratio']:>6.2f} "
                f"{_spread_text(r['spread']):>10} {r['wrong']:>6}"
            )
        lines.append("")
    return "\n".join(lines)


def summary(rows, min_size=1 << 20) -> dict[str, float]:
    """Median over sizes >= 1 MB of busbw(xtrain) / busbw(torch), per collective."""
    out = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        ratios = [r["ratio"] for r in rows if r["op"] == op and r["size"] >= min_size]
        if ratios:
            out[op] = statistics.median(ratios)
    return out


def _spread_text(spread: tuple[float, float]) -> str:
    return f"{spread[0]:.2f}-{spread[1]:.2f}"


def markdown_table(rows) -> str:
    lines = [
        "| collective | size | xtrain time (us) | xtrain CPU (us) | xtrain busbw (GB/s) "
        "| torch time (us) | torch CPU (us) | torch busbw (GB/s) | ratio | ratio q25-q75 | #wrong |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        (tx, _, bx), (tt, _, bt) = r["xtrain"], r["torch"]
        lines.append(
            f"| {r['op']} | {_human(r['size'])} | {tx * 1e6:.0f} | {r['xtrain_cpu'] * 1e6:.0f} | {bx:.3f} "
            f"| {tt * 1e6:.0f} | {r['torch_cpu'] * 1e6:.0f} | {bt:.3f} | {r['ratio']:.2f} | {_spread_text(r['spread'])} "
            f"| {r['wrong']} |"
        )
    return "\n".join(lines)


def plot(rows, nproc, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    cols = min(3, len(ops))
    nrows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in rows if r["op"] == op]
        sizes = [r["size"] for r in mine]
        for name, style in (("xtrain", "o-"), ("torch", "s--")):
            ax.plot(sizes, [r[name][2] for r in mine], style, label=name, markersize=3)
        ax.set_xscale("log", base=2)
        ax.set_title(op)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(ops):]:
        ax.set_visible(False)
    fig.suptitle(f"xtrain vs torch collectives, gloo on CPU, {nproc} ranks")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS), choices=OPS)
    p.add_argument("--min-bytes", type=_size, default=1 << 10)
    p.add_argument("--max-bytes", type=_size, default=64 << 20)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=20,
                   help="calls timed back to back per round (fewer for large sizes: about 64 MB a round)")
    p.add_argument("--budget", type=_size, default=1 << 30, help="bytes per size and implementation (sets rounds)")
    p.add_argument("--min-iters", type=int, default=7, help="fewest rounds per size")
    p.add_argument("--max-iters", type=int, default=15, help="most rounds per size")
    p.add_argument("--plot", nargs="?", const=str(ROOT / "docs/img/collectives_busbw.png"), default=None,
                   help="write a PNG of busbw against size (default docs/img/collectives_busbw.png)")
    p.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    p.add_argument("--ddp-hook", action="store_true",
                   help="time DDP training steps with xtrain's all-reduce as a comm hook (future vs blocking) instead")
    p.add_argument("--steps", type=int, default=30, help="--ddp-hook: timed steps per variant")
    p.add_argument("--width", type=int, default=512, help="--ddp-hook: the MLP's width")
    p.add_argument("--layers", type=int, default=8, help="--ddp-hook: the MLP's Linear layers")
    p.add_argument("--ddp-batch", type=int, default=256, help="--ddp-hook: rows per rank and step")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="--ddp-hook: DDP's bucket_cap_mb")
    args = p.parse_args(argv)
    if args.ddp_hook:
        t0 = time.perf_counter()
        print(run_ddp(args.nproc, args.steps, args.width, args.layers, args.ddp_batch, args.bucket_mb))
        print(f"# wall time {time.perf_counter() - t0:.0f} s")
        return 0
    if os.environ.get("XTRAIN_ALL_REDUCE", "auto") not in ("auto", "ring", "two_shot"):
        p.error(f"XTRAIN_ALL_REDUCE={os.environ['XTRAIN_ALL_REDUCE']!r}: use auto, ring or two_shot")

    sizes = []
    s = args.min_bytes
    while s <= args.max_bytes:
        sizes.append(s)
        s *= 2
    t0 = time.perf_counter()
    rows = run(args.nproc, args.ops, sizes, args.budget, args.min_iters, args.max_iters, args.dtype, args.batch)
    print(text_table(rows, args.nproc, args.dtype))
    print(f"# median busbw ratio xtrain/torch over sizes >= 1M ({args.nproc} ranks):")
    for op, ratio in summary(rows).items():
        print(f"#   {op:<15} {ratio:.2f}")
    wrong = sum(r["wrong"] for r in rows)
    print(f"# elements where xtrain's result differs from torch's: {wrong} {'OK' if not wrong else 'FAILED'}")
    print(f"# wall time {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows) + "\n")
    if args.plot:
        plot(rows, args.nproc, Path(args.plot))
        print(f"# plot written to {args.plot}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
