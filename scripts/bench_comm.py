#!/usr/bin/env python
"""Benchmark xtrain's hand-written collectives against torch's built-ins, nccl-tests style.

    python scripts/bench_comm.py --nproc 4 [--plot [PNG]] [--markdown MD]

For message sizes from 1 KB to 64 MB (doubling) and each collective, both
implementations run in the same job, interleaved iteration by iteration
(alternating which goes first), so that oversubscribed cores slow both
alike. One iteration's time is the slowest rank's, between a barrier and
the collective's return; the table shows the median over iterations.

Columns follow nccl-tests: ``size`` is the largest buffer (the full tensor
of all_reduce/broadcast, the gathered output of all_gather, the input of
reduce_scatter, the whole send buffer of all_to_all); ``algbw = size /
time``; ``busbw = algbw * factor`` with nccl-tests' factors (all_reduce
2(n-1)/n; all_gather, reduce_scatter, all_to_all (n-1)/n; broadcast,
reduce 1), so busbw compares with the link speed whatever n is.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xtrain.spawn import run_on_ranks  # noqa: E402

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "reduce")
DEFAULT_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")


def bus_factor(op: str, n: int) -> float:
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


def _iterations(size: int, budget: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, budget // max(size, 1)))


def _bench_worker(rank: int, world: int, ops, sizes, budget, min_iters, max_iters, dtype_name):
    import torch
    import torch.distributed as dist

    from xtrain.comm import get_comm

    import os

    import xtrain.comm.ring as ring

    if os.environ.get("XTRAIN_SEGMENT_BYTES"):  # for tuning the pipeline depth
        ring.SEGMENT_BYTES = int(os.environ["XTRAIN_SEGMENT_BYTES"])
    if os.environ.get("XTRAIN_SCATTER_RING_MAX_BYTES"):  # for tuning broadcast's switch to the chain
        import xtrain.comm.tree as tree

        tree.SCATTER_RING_MAX_BYTES = int(os.environ["XTRAIN_SCATTER_RING_MAX_BYTES"])
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
                if op == "all_reduce":
                    comm.all_reduce(big)
                elif op == "all_gather":
                    comm.all_gather_into_tensor(out_big, part)
                elif op == "reduce_scatter":
                    comm.reduce_scatter_tensor(out_part, big)
                elif op == "broadcast":
                    comm.broadcast(big, src=0)
                elif op == "reduce":
                    comm.reduce(big, dst=0)
                elif op == "all_to_all":
                    comm.all_to_all_single(out_big, big)

            iters = _iterations(count * esize, budget, min_iters, max_iters)
            times = {name: [] for name in comms}
            for it in range(iters + 1):  # the first round warms up and is dropped
                order = ("xtrain", "torch") if it % 2 else ("torch", "xtrain")
                for name in order:
                    if op in ("all_reduce", "reduce"):
                        big.normal_()  # keep sums from growing without bound
                    dist.barrier()
                    t0 = time.perf_counter()
                    call(comms[name])
                    dt = time.perf_counter() - t0
                    if it:
                        times[name].append(dt)
            out[(op, count * esize)] = times
    return out


def _median_over_ranks(per_rank, key, name):
    """Per iteration the slowest rank's time; then the median over iterations."""
    iters = zip(*(r[key][name] for r in per_rank))
    return statistics.median(max(t) for t in iters)


def _human(nbytes: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def run(nproc, ops, sizes, budget, min_iters, max_iters, dtype):
    per_rank = run_on_ranks(
        _bench_worker, nproc, ops, sizes, budget, min_iters, max_iters, dtype, timeout=3000, pg_timeout=300
    )
    rows = []
    for key in per_rank[0]:
        op, size = key
        row = {"op": op, "size": size}
        for name in ("xtrain", "torch"):
            t = _median_over_ranks(per_rank, key, name)
            algbw = size / t / 1e9
            row[name] = (t, algbw, algbw * bus_factor(op, nproc))
        row["ratio"] = row["xtrain"][2] / row["torch"][2]
        rows.append(row)
    return rows


def text_table(rows, nproc, dtype) -> str:
    import torch

    esize = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    lines = []
    for op in dict.fromkeys(r["op"] for r in rows):
        lines.append(f"# {op}  nranks {nproc}  dtype {dtype}  (busbw factor {bus_factor(op, nproc):.3f})")
        lines.append(
            f"#{'size':>9} {'count':>10} | {'xtrain us':>11} {'algbw':>7} {'busbw':>7} | "
            f"{'torch us':>11} {'algbw':>7} {'busbw':>7} | {'ratio':>6}"
        )
        for r in rows:
            if r["op"] != op:
                continue
            (tx, ax, bx), (tt, at, bt) = r["xtrain"], r["torch"]
            lines.append(
                f"{_human(r['size']):>10} {r['size'] // esize:>10} | {tx * 1e6:>11.1f} {ax:>7.3f} {bx:>7.3f} | "
                f"{tt * 1e6:>11.1f} {at:>7.3f} {bt:>7.3f} | {r['ratio']:>6.2f}"
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


def markdown_table(rows) -> str:
    lines = [
        "| collective | size | xtrain time (us) | xtrain busbw (GB/s) | torch time (us) | torch busbw (GB/s) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        (tx, _, bx), (tt, _, bt) = r["xtrain"], r["torch"]
        lines.append(
            f"| {r['op']} | {_human(r['size'])} | {tx * 1e6:.0f} | {bx:.3f} | {tt * 1e6:.0f} | {bt:.3f} | {r['ratio']:.2f} |"
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
    p.add_argument("--budget", type=_size, default=256 << 20, help="bytes per size and implementation (sets iterations)")
    p.add_argument("--min-iters", type=int, default=7)
    p.add_argument("--max-iters", type=int, default=30)
    p.add_argument("--plot", nargs="?", const=str(ROOT / "docs/img/collectives_busbw.png"), default=None,
                   help="write a PNG of busbw against size (default docs/img/collectives_busbw.png)")
    p.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    args = p.parse_args(argv)

    sizes = []
    s = args.min_bytes
    while s <= args.max_bytes:
        sizes.append(s)
        s *= 2
    t0 = time.perf_counter()
    rows = run(args.nproc, args.ops, sizes, args.budget, args.min_iters, args.max_iters, args.dtype)
    print(text_table(rows, args.nproc, args.dtype))
    print(f"# median busbw ratio xtrain/torch over sizes >= 1M ({args.nproc} ranks):")
    for op, ratio in summary(rows).items():
        print(f"#   {op:<15} {ratio:.2f}")
    print(f"# wall time {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows) + "\n")
    if args.plot:
        plot(rows, args.nproc, Path(args.plot))
        print(f"# plot written to {args.plot}")


if __name__ == "__main__":
    main()
