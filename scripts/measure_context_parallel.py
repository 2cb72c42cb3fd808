#!/usr/bin/env python
"""Context parallelism measured: the ring's block plan, bytes per layer,
activation memory, load balance and training tokens/s (docs/context-parallel.md).

    python scripts/measure_context_parallel.py --parts ring                 # tables + docs/img/cp_ring_plan.png (no ranks)
    python scripts/measure_context_parallel.py --parts bytes                # ledger vs formula, cp 2 and 4, fp32 and bf16
    python scripts/measure_context_parallel.py --parts memory --mem-seq-len 4096
    python scripts/measure_context_parallel.py --parts balance              # per-rank attention compute at cp=4
    python scripts/measure_context_parallel.py --parts speed --repeats 2    # trainer tokens/s vs strategy=single
    python scripts/measure_context_parallel.py --parts bytes,balance --bytes-seq-len 64 --bal-seq-len 64 \\
        --bal-iters 1                                                       # the smoke test's setting

Parts:

1. ``ring``: from ``xtrain.parallel.context.layout`` only: which chunks each
   rank holds, ``ring_table`` (per rank and ring step, the kv rank whose block
   it holds and what it computes: ``causal``, ``full``, a fraction, ``skip``)
   and ``work`` per rank, for zigzag and contiguous; ``--plot`` draws them.
2. ``bytes``: one attention layer (``context_attention``, forward then
   backward) on cp gloo ranks at a Llama-like shape (``--bytes-shape``
   B,H,K,E and ``--bytes-seq-len``), fp32 and bf16; bytes sent by this rank
   from the comm ledger (``ledger.take_step()``, every key ending in ``@cp``,
   ``bytes_sent`` summed) beside ``xtrain.formulas.cp_attention_bytes``.
3. ``memory``: the real trainer (``xtrain.train.run``, fp32) at a long
   sequence for strategy=single (cp=1) and strategy=cp at cp = 2 and 4, one
   job per run. Per rank and step: (a) the bytes of tensors saved for
   backward alive at once (a ``saved_tensors_hooks`` pack hook counts each
   storage once, parameters excluded, and drops it when autograd frees its
   last alias: the activations proper); (b) the resident set's high-water
   mark during the step (``VmHWM``, reset through ``/proc/self/clear_refs``
   after each step) minus the resident set when the step began (parameters,
   optimizer state, the runtime), less the step's gradient bytes
   (``model_state_bytes["grads"]``): activations plus every temporary;
   (c) metrics.jsonl's own figure, ``peak_mem_bytes`` (``ru_maxrss``: the
   process's lifetime peak, the max over ranks, torch itself included) minus
   the model state. Steps after the first (AdamW's state exists), medians.
4. ``balance``: the op on ``--bal-cp`` ranks, forward + backward, with
   ``xtrain.parallel.context.attention.attend`` / ``attend_backward`` wrapped
   by timers: per rank the thread CPU time (``time.thread_time``, what the
   kernels compute, unaffected by waiting or by other processes) and the
   wall time inside them, zigzag against contiguous.
5. ``speed``: training steps through the trainer, every variant at cp = 2 and
   4 and strategy=single at the same global batch and seq_len; steady-state
   median of the step tokens/s (metrics' ``tokens_per_s``), the first
   ``--warmup`` steps dropped; one job per world size runs all its configs,
   ``--repeats`` rounds in alternating order.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from xtrain.parallel.context.layout import LAYOUTS, SequenceLayout, ring_table

MB = 2**20
VARIANTS = {"ring zigzag": ("ring", "zigzag"), "ring contiguous": ("ring", "contiguous"),
            "allgather": ("allgather", "zigzag"), "ulysses": ("ulysses", "zigzag")}


def header(extra: str) -> str:
    return (f"{extra} | torch {torch.__version__}, {os.cpu_count()} cores, {platform.machine()}, "
            f"loadavg {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


# -- 1. the ring's block plan ----------------------------------------------------------------

def common_work(lay: SequenceLayout, rank: int) -> float:
    """``work(rank)`` in units of (T/2cp)² for both layouts (contiguous chunks are twice as long)."""
    return lay.work(rank) * (2 * lay.cp // lay.n_chunks) ** 2


def ring_rows(kind: str, cp: int) -> list[str]:
    """Markdown rows: rank, chunks held, one cell per ring step, work."""
    lay = SequenceLayout(kind, cp)
    table = ring_table(lay)
    rows = []
    for r in range(cp):
        chunks = ", ".join(str(c) for c in lay.chunks(r))
        rows.append(f"| {r} | {chunks} | " + " | ".join(table[r]) + f" | {lay.work(r):g} | {common_work(lay, r):g} |")
    return rows


def ring_markdown(kind: str, cp: int) -> str:
    lay = SequenceLayout(kind, cp)
    head = (f"{kind}, cp={cp}: {lay.n_chunks} chunks of T/{lay.n_chunks}; ``work``: query-key pairs in chunk² units "
            f"(a causal block counts 1/2), and in (T/{2 * cp})² units\n\n")
    head += "| rank | chunks | " + " | ".join(f"step {s}" for s in range(cp)) + f" | work (chunk²) | work ((T/{2 * cp})²) |\n"
    head += "|---:|---|" + "---|" * cp + "---:|---:|\n"
    return head + "\n".join(ring_rows(kind, cp))


def plot_ring(cp: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), gridspec_kw={"width_ratios": [1, 1.1]})
    for row, kind in enumerate(LAYOUTS):
        lay = SequenceLayout(kind, cp)
        # left: the causal T x T attention matrix in chunk units, coloured by the rank computing it
        n = 2 * cp  # draw both at the zigzag's resolution
        owner = torch.full((n, n), float("nan"))
        for r in range(cp):
            chunks = lay.chunks(r) if kind == "zigzag" else (2 * r, 2 * r + 1)
            for a in chunks:
                owner[a, : a + 1] = r
        ax = axes[row, 0]
        ax.imshow(owner.numpy(), cmap="tab10", vmin=0, vmax=9)
        for a in range(n):
            for b in range(a + 1):
                ax.text(b, a, str(int(owner[a, b])), ha="center", va="center", fontsize=8, color="white")
        ax.set_title(f"{kind}, cp={cp}: rank computing each\n(query chunk, key chunk) block, chunks of T/{n}", fontsize=10)
        ax.set_xlabel("key chunk")
        ax.set_ylabel("query chunk")
        # right: per rank and ring step, the share of the held kv block computed
        table = ring_table(lay)
        grid = torch.zeros(cp, cp)
        for r in range(cp):
            for s in range(cp):
                j = (r - s) % cp
                grid[r, s] = sum(b.area() for b in lay.plan(r, j)) / lay.chunks_per_rank**2
        ax = axes[row, 1]
        ax.imshow(grid.numpy(), cmap="Blues", vmin=0, vmax=1.2)
        for r in range(cp):
            for s in range(cp):
                ax.text(s, r, table[r][s].replace(":", "\n"), ha="center", va="center", fontsize=9)
        ax.set_xticks(range(cp), [f"step {s}" for s in range(cp)])
        ax.set_yticks(range(cp), [f"rank {r}, chunks {','.join(map(str, lay.chunks(r)))}\nwork {common_work(lay, r):g} (T/{n})²" for r in range(cp)])
        ax.set_title(f"{kind}: per ring step, the kv rank held and\nthe share of its block computed", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- 2. bytes per layer ----------------------------------------------------------------------

def _cp_group(comm, mesh, world, kind, kernel="auto"):
    from xtrain.parallel.context import CPGroup

    prev, nxt = mesh.neighbours("cp")
    return CPGroup(comm, mesh.group("cp"), mesh.coord("cp"), world, prev, nxt, SequenceLayout(kind, world), kernel)


def _cp_bytes(comm) -> int:
    return sum(e["bytes_sent"] for key, e in comm.ledger.take_step().items() if key.endswith("@cp"))


def bytes_worker(rank, world, shape, T, dtypes):
    from xtrain.comm import get_comm
    from xtrain.mesh import Mesh
    from xtrain.parallel.context import context_attention

    mesh = Mesh.build(world, rank, cp=world)
    comm = get_comm("xtrain")
    B, H, K, E = shape
    out = []
    for dt in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        for name, (variant, kind) in VARIANTS.items():
            if name == "ring contiguous" or (variant == "ulysses" and (H % world or K % world)):
                continue
            cp = _cp_group(comm, mesh, world, kind)
            g = torch.Generator().manual_seed(rank)
            Tl = T // world
            q = torch.randn(B, H, Tl, E, generator=g).to(dtype).requires_grad_()
            k = torch.randn(B, K, Tl, E, generator=g).to(dtype).requires_grad_()
            v = torch.randn(B, K, Tl, E, generator=g).to(dtype).requires_grad_()
            comm.ledger.take_step()
            o = context_attention(q, k, v, cp, variant)
            fwd = _cp_bytes(comm)
            o.backward(torch.ones_like(o))
            bwd = _cp_bytes(comm)
            out.append({"dtype": dt, "variant": variant, "rank": rank, "forward": fwd, "backward": bwd})
    return out


def bytes_rows(per_rank, world, shape, T) -> list[str]:
    from xtrain.formulas import cp_attention_bytes

    B, H, K, E = shape
    rows = []
    keys = sorted({(r["dtype"], r["variant"]) for pr in per_rank for r in pr}, key=lambda x: (x[0] != "fp32", x[1]))
    for dt, variant in keys:
        got = [r for pr in per_rank for r in pr if r["dtype"] == dt and r["variant"] == variant]
        f = cp_attention_bytes(variant, world, B, H, K, T // world, E, 4 if dt == "fp32" else 2)
        lo_f, hi_f = min(r["forward"] for r in got), max(r["forward"] for r in got)
        lo_b, hi_b = min(r["backward"] for r in got), max(r["backward"] for r in got)
        meas_f = f"{hi_f / MB:.2f}" if lo_f == hi_f else f"{lo_f / MB:.2f}-{hi_f / MB:.2f}"
        meas_b = f"{hi_b / MB:.2f}" if lo_b == hi_b else f"{lo_b / MB:.2f}-{hi_b / MB:.2f}"
        ok = "yes" if lo_f == hi_f == f["forward"] and lo_b == hi_b == f["backward"] else "NO"
        rows.append(f"| {world} | {variant} | {dt} | {f['forward'] / MB:.2f} | {meas_f} | {f['backward'] / MB:.2f} | {meas_b} | "
                    f"{(f['forward'] + f['backward']) / MB:.2f} | {ok} |")
    return rows


# -- 3. memory ------------------------------------------------------------------------------

class SavedBytes:
    """Bytes of tensors saved for backward alive now, and the peak (each storage
    once; parameters excluded)."""

    def __init__(self):
        self.exclude: set[int] = set()
        self.live: dict[int, list] = {}
        self.now = self.peak = 0

    def _drop(self, ptr):
        e = self.live.get(ptr)
        if e is None:
            return
        e[1] -= 1
        if e[1] == 0:
            self.now -= e[0]
            del self.live[ptr]

    def pack(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr == 0 or ptr in self.exclude or isinstance(t, torch.nn.Parameter):
            return t
        alias = t.detach()
        e = self.live.get(ptr)
        if e is None:
            e = self.live[ptr] = [t.untyped_storage().nbytes(), 0]
            self.now += e[0]
            self.peak = max(self.peak, self.now)
        e[1] += 1
        weakref.finalize(alias, self._drop, ptr)
        return alias

    @staticmethod
    def unpack(t):
        return t


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _trainer_base(model_over, seq_len, batch, steps, threads_note=""):
    return [*model_over, f"model.max_seq_len={seq_len}", "data=stdlib", "comm=xtrain", "precision=fp32", "device=cpu",
            f"train.seq_len={seq_len}", f"train.global_batch_size={batch}", "train.micro_batches=1", "train.eval_every=0",
            "train.ckpt_every=0", "train.progress=false", "train.log_every=1000000", f"train.steps={steps}"]


def memory_worker(rank, world, overrides, root, threads):
    import warnings

    import xtrain.train as xt
    from xtrain.config import compose

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    tracker = SavedBytes()
    built = {}
    orig_build = xt.build_model

    def build_model(*a, **kw):
        m = orig_build(*a, **kw)
        built["model"] = m
        tracker.exclude = {p.untyped_storage().data_ptr() for p in m.parameters()}
        return m

    xt.build_model = build_model
    steps, state = [], {"rss0": _status_kib("VmRSS")}
    _reset_hwm()

    def on_step(rec):
        steps.append({"step": rec["step"], "saved_peak": tracker.peak, "hwm": _status_kib("VmHWM"), "rss0": state["rss0"],
                      "grads": rec["model_state_bytes"].get("grads", 0), "model_state": sum(rec["model_state_bytes"].values()),
                      "peak_mem_bytes": rec["peak_mem_bytes"], "tokens_per_s": rec["tokens_per_s"]})
        tracker.peak = tracker.now
        state["rss0"] = _status_kib("VmRSS")
        _reset_hwm()

    cfg = compose(overrides)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack), contextlib.redirect_stdout(io.StringIO()):
        xt.run(cfg, Path(root), on_step=on_step)
    xt.build_model = orig_build
    return steps


def memory_summary(per_rank) -> dict:
    """Per rank medians over steps >= 2: saved activations, RSS peak - start - grads; metrics' figure."""
    out = []
    for steps in per_rank:
        later = [s for s in steps if s["step"] >= 2] or steps
        out.append({
            "saved": statistics.median(s["saved_peak"] for s in later),
            "rss_act": statistics.median(s["hwm"] - s["rss0"] - s["grads"] for s in later),
            "rss0": statistics.median(s["rss0"] for s in later),
            "metrics_act": statistics.median(s["peak_mem_bytes"] - s["model_state"] for s in later),
            "model_state": later[-1]["model_state"],
        })
    return {"ranks": out, "saved_max": max(r["saved"] for r in out), "rss_act_max": max(r["rss_act"] for r in out),
            "metrics_act": out[0]["metrics_act"], "model_state": out[0]["model_state"]}


# -- 4. load balance -------------------------------------------------------------------------

def balance_worker(rank, world, shape, T, iters, kinds):
    import xtrain.parallel.context.attention as att
    from xtrain.comm import get_comm
    from xtrain.mesh import Mesh
    from xtrain.parallel.context import context_attention

    mesh = Mesh.build(world, rank, cp=world)
    comm = get_comm("xtrain")
    acc = {"cpu": 0.0, "wall": 0.0, "calls": 0}

    def timed(fn):
        def wrapper(*a, **kw):
            c0, t0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc["cpu"] += time.thread_time() - c0
                acc["wall"] += time.perf_counter() - t0
                acc["calls"] += 1
        return wrapper

    orig = att.attend, att.attend_backward
    att.attend, att.attend_backward = timed(orig[0]), timed(orig[1])
    B, H, K, E = shape
    res = []
    try:
        for it in range(iters + 1):  # the first is a warm-up
            for variant, kind in kinds:
                cp = _cp_group(comm, mesh, world, kind)
                g = torch.Generator().manual_seed(rank)
                Tl = T // world
                q = torch.randn(B, H, Tl, E, generator=g).requires_grad_()
                k = torch.randn(B, K, Tl, E, generator=g).requires_grad_()
                v = torch.randn(B, K, Tl, E, generator=g).requires_grad_()
                mesh_barrier = torch.zeros(1)
                comm.all_reduce(mesh_barrier, group=mesh.group("cp"))
                acc.update(cpu=0.0, wall=0.0, calls=0)
                t0 = time.perf_counter()
                o = context_attention(q, k, v, cp, variant)
                o.backward(torch.ones_like(o))
                total = time.perf_counter() - t0
                if it:
                    res.append({"variant": variant, "kind": kind, "rank": rank, "iter": it, "cpu": acc["cpu"], "wall": acc["wall"],
                                "calls": acc["calls"], "op_wall": total})
    finally:
        att.attend, att.attend_backward = orig
    return res


def balance_rows(per_rank, world) -> list[str]:
    rows = []
    flat = [r for pr in per_rank for r in pr]
    for variant, kind in sorted({(r["variant"], r["kind"]) for r in flat}, key=lambda x: (x[0], x[1] != "zigzag")):
        cpu = [statistics.median(r["cpu"] for r in flat if r["variant"] == variant and r["kind"] == kind and r["rank"] == k) for k in range(world)]
        wall = [statistics.median(r["wall"] for r in flat if r["variant"] == variant and r["kind"] == kind and r["rank"] == k) for k in range(world)]
        calls = [next(r["calls"] for r in flat if r["variant"] == variant and r["kind"] == kind and r["rank"] == k) for k in range(world)]
        mean = statistics.mean(cpu)
        work = [common_work(SequenceLayout(kind, world), k) for k in range(world)]
        rows.append(f"| {variant} | {kind} | " + " | ".join(f"{c:.3f}" for c in cpu) + f" | {mean:.3f} | {max(cpu) / mean:.3f} | "
                    f"{max(abs(c - mean) / mean for c in cpu) * 100:.1f}% | {cpu[-1] / cpu[0]:.2f} | "
                    + " / ".join(f"{w:.2f}" for w in wall) + " | " + " / ".join(f"{w:g}" for w in work)
                    + " | " + " / ".join(str(c) for c in calls) + " |")
    return rows


# -- 5. speed --------------------------------------------------------------------------------

def speed_worker(rank, world, configs, repeats, root, threads):
    import warnings

    from xtrain.config import compose
    from xtrain.train import run

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    out = []
    for r in range(repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        for name, overrides in order:
            recs = []
            with contextlib.redirect_stdout(io.StringIO()):
                run(compose(overrides), Path(root) / f"w{world}-{name.replace(' ', '_')}-{r}", on_step=recs.append)
            out.append({"name": name, "repeat": r, "tok_s": [x["tokens_per_s"] for x in recs], "loss": [x["loss"] for x in recs]})
    return out


def main(argv=None) -> int:
    from xtrain.spawn import run_on_ranks

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="ring,bytes,memory,balance,speed")
    ap.add_argument("--ring-cp", type=int, default=4)
    ap.add_argument("--plot", default=None, help="draw the ring plan here (e.g. docs/img/cp_ring_plan.png)")
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4], help="cp sizes for bytes / memory / speed")
    ap.add_argument("--bytes-shape", default="1,32,8,128", help="B,H,K,E for bytes (default 1,32,8,128: Llama-3-8B heads)")
    ap.add_argument("--bytes-seq-len", type=int, default=2048)
    ap.add_argument("--model", default="small")
    ap.add_argument("--model-over", default="model.n_heads=8,model.n_kv_heads=4",
                    help="extra model overrides (default 8 query / 4 kv heads, so Ulysses runs at cp=4)")
    ap.add_argument("--mem-seq-len", type=int, default=4096)
    ap.add_argument("--mem-batch", type=int, default=1)
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--mem-variants", default="ring zigzag", help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--bal-cp", type=int, default=4)
    ap.add_argument("--bal-shape", default="1,8,4,64")
    ap.add_argument("--bal-seq-len", type=int, default=8192)
    ap.add_argument("--bal-iters", type=int, default=3)
    ap.add_argument("--speed-seq-len", type=int, default=1024)
    ap.add_argument("--speed-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--single-threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads of strategy=single, one speed baseline each (default 1 2); memory uses the last")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="xtrain-cp-"))
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # freed tensors leave the resident set (spawned ranks inherit)
    model_over = [f"model={args.model}", *[o for o in args.model_over.split(",") if o]]
    results = {}

    if "ring" in parts:
        for kind in LAYOUTS:
            print(ring_markdown(kind, args.ring_cp) + "\n")
        if args.plot:
            plot_ring(args.ring_cp, args.plot)
            print(f"wrote {args.plot}\n")

    if "bytes" in parts:
        shape = tuple(int(x) for x in args.bytes_shape.split(","))
        print(header(f"bytes per layer, one rank: B,H,K,E={shape} T={args.bytes_seq_len}"))
        print("\n| cp | variant | dtype | formula fwd MiB | ledger fwd MiB | formula bwd MiB | ledger bwd MiB | formula total MiB | equal |")
        print("|---:|---|---|---:|---:|---:|---:|---:|---|")
        results["bytes"] = {}
        for cp in args.cp:
            per_rank = run_on_ranks(bytes_worker, cp, shape, args.bytes_seq_len, ["fp32", "bf16"], timeout=1800, pg_timeout=900)
            results["bytes"][cp] = per_rank
            print("\n".join(bytes_rows(per_rank, cp, shape, args.bytes_seq_len)), flush=True)
        print()

    if "memory" in parts:
        T, B = args.mem_seq_len, args.mem_batch
        print(header(f"activation memory: {' '.join(model_over)} seq_len={T} global batch={B} fp32 {args.mem_steps} steps"))
        base = _trainer_base(model_over, T, B, args.mem_steps)
        runs = [("single", 1, ["strategy=single"])]
        for name in [v for v in args.mem_variants.split(",") if v]:
            variant, kind = VARIANTS[name]
            for cp in args.cp:
                runs.append((f"{name} cp={cp}", cp, ["strategy=cp", f"strategy.cp={cp}", f"strategy.cp_attn={variant}", f"strategy.cp_layout={kind}"]))
        results["memory"] = {}
        ref = None
        print("\n| run | ranks | saved activations MiB / rank (max) | ratio to cp=1 | RSS peak - start - grads MiB (max rank) | ratio | "
              "metrics.jsonl peak - model state MiB | model state MiB | per-rank saved MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for name, world, over in runs:
            t0 = time.perf_counter()
            per_rank = run_on_ranks(memory_worker, world, [*base, *over], str(root / f"mem-{name.replace(' ', '_')}"),
                                    1 if world > 1 else args.single_threads[-1], timeout=3600, pg_timeout=1800)
            s = memory_summary(per_rank)
            results["memory"][name] = {"summary": s, "raw": per_rank}
            ref = ref or s
            print(f"| {name} | {world} | {s['saved_max'] / MB:.1f} | {s['saved_max'] / ref['saved_max']:.3f} | {s['rss_act_max'] / MB:.1f} | "
                  f"{s['rss_act_max'] / ref['rss_act_max']:.3f} | {s['metrics_act'] / MB:.1f} | {s['model_state'] / MB:.1f} | "
                  + " / ".join(f"{r['saved'] / MB:.1f}" for r in s["ranks"]) + f" |  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)
        print()

    if "balance" in parts:
        shape = tuple(int(x) for x in args.bal_shape.split(","))
        print(header(f"load balance: cp={args.bal_cp} B,H,K,E={shape} T={args.bal_seq_len} fp32 fwd+bwd, {args.bal_iters} iterations (+1 warm-up), medians"))
        kinds = [("ring", "zigzag"), ("ring", "contiguous"), ("allgather", "zigzag"), ("allgather", "contiguous")]
        per_rank = run_on_ranks(balance_worker, args.bal_cp, shape, args.bal_seq_len, args.bal_iters, kinds, timeout=3600, pg_timeout=1800)
        results["balance"] = per_rank
        w = args.bal_cp
        print("\n| variant | layout | " + " | ".join(f"rank {r} CPU s" for r in range(w)) + " | mean | max/mean | max dev from mean | last/first | "
              "wall s in kernels per rank | work ((T/2cp)²) per rank | kernel calls per rank |")
        print("|---|---|" + "---:|" * w + "---:|---:|---:|---:|---|---|---|")
        print("\n".join(balance_rows(per_rank, w)) + "\n", flush=True)

    if "speed" in parts:
        T, B = args.speed_seq_len, args.speed_batch
        base = _trainer_base(model_over, T, B, args.warmup + args.steps)
        print(header(f"training tokens/s: {' '.join(model_over)} seq_len={T} global batch={B} fp32 comm=xtrain, "
                     f"{args.repeats} rounds x {args.warmup + args.steps} steps ({args.warmup} dropped)"))
        jobs = [(1, th, [(f"single {th} thread{'s' if th > 1 else ''}", [*base, "strategy=single"])]) for th in args.single_threads]
        for cp in args.cp:
            jobs.append((cp, 1, [(f"{name} cp={cp}", [*base, "strategy=cp", f"strategy.cp={cp}", f"strategy.cp_attn={v}", f"strategy.cp_layout={k}"])
                                 for name, (v, k) in VARIANTS.items()]))
        results["speed"] = {}
        rows, ref = [], None
        for world, threads, configs in jobs:
            t0, l0 = time.perf_counter(), os.getloadavg()[0]
            per_rank = run_on_ranks(speed_worker, world, configs, args.repeats, str(root / "speed"), threads, timeout=3600, pg_timeout=1800)
            print(f"world {world}: {time.perf_counter() - t0:.0f} s, load {l0:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
            runs = per_rank[0]
            for name, _ in configs:
                mine = [r for r in runs if r["name"] == name]
                steady = [x for r in mine for x in r["tok_s"][args.warmup:]]
                per_round = [statistics.median(r["tok_s"][args.warmup:]) for r in mine]
                med = statistics.median(steady)
                ref = ref or med
                results["speed"][name] = {"tok_s": steady, "per_round": per_round, "loss": mine[0]["loss"]}
                rows.append(f"| {name} | {world} | {med:,.0f} | {med / ref:.3f} | " + " / ".join(f"{x:,.0f}" for x in per_round)
                            + f" | {min(steady):,.0f}-{max(steady):,.0f} | {mine[0]['loss'][-1]:.4f} |")
        print("\n| run | ranks | tok/s (median) | vs the first single | per-round medians | range | final loss |")
        print("|---|---:|---:|---:|---|---|---:|")
        print("\n".join(rows) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
