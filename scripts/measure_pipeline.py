#!/usr/bin/env python
"""Pipeline parallelism measured: the bubble, activation memory, and a
measured timeline for ``scripts/plot_schedule.py``.

    python scripts/measure_pipeline.py                                   # bubble (p=2, m=4 and 8) and memory (p=2)
    python scripts/measure_pipeline.py --memory-pp 2 4                   # memory at p=2 and p=4 too
    python scripts/measure_pipeline.py --skip-memory --micro 4 \\
        --timeline-json /tmp/pp_{schedule}.json                          # and draw one:
    python scripts/measure_pipeline.py --micro 8 16 --steps 5 --mem-micro 8 16 \\
        --mem-schedules gpipe,1f1b,interleaved_1f1b,zb1p,dualpipe,dualpipev   # every schedule, p=4 simulated
    python scripts/plot_schedule.py --measured /tmp/pp_1f1b.json --out docs/img/pipeline_measured_1f1b.png

Every figure comes from the real trainer (``xtrain.train.run``,
``strategy=pp``) on gloo ranks started by ``xtrain.spawn.run_on_ranks``. The
script reaches the pipeline executor from outside: it wraps
``PipelineRunner.forward_backward`` (xtrain/parallel/pipeline/executor.py) to
time it and to keep, after every step, the runner's ``last_timeline`` (this
rank's actions with ``perf_counter`` start/end; CLOCK_MONOTONIC, one clock
for all processes of the machine), ``wait_s`` and ``peak_in_flight``.

1. Bubble, at pp=2 on 2 ranks (not oversubscribed), for gpipe, 1f1b,
   interleaved_1f1b (v = ``--chunks``), zb1p, dualpipe and dualpipev: per rank and step, the time waiting
   on receives (``wait_s``, which also holds the final wait on the sends)
   over the rank's pipeline time (``forward_backward``'s wall time), and the
   simulator's definition on the merged measured timeline (idle = makespan
   - compute busy time, the makespan over both ranks). Beside them: the
   simulator's prediction (``simulate`` of the same schedule with
   ``Costs.from_timeline``: the measured mean duration of each (kind,
   stage)) with free messages, and again with the measured message costs
   (``latency``: from the later of the SEND's end and the RECV's posting to
   the start of the compute that consumed it, median over messages;
   ``send``/``recv``: the mean time posting them takes); and the closed form
   (:func:`formula_fraction`: ``pipeline_bubble_fraction`` for the fused
   schedules, ``pipeline_bubble_time`` with unit costs F = I = W = 1 for
   zb1p and the DualPipes). The first ``--warmup`` steps are dropped;
   medians over the rest. For the DualPipes also: does an OVERLAP hide its
   messages (:func:`overlap_stats`: when each overlapped backward's gradient
   was sent against the forward part, and the wait between the two parts).
   Then (``--sim-pp``, default 4) every measured schedule simulated at that p
   and ``--sim-micro`` (default 8 16): formula, unit costs, and the run's
   measured per-layer-block costs (:func:`per_layer_costs`, from its largest
   m) with free messages and with the run's message costs (here the
   latency counts from the latest of SEND end, RECV posting and the rank's
   previous compute end, ``latency_free``: an OVERLAP's backward waits for
   its forward part, not for the message).
2. Activation memory, ``--mem-schedules`` (default gpipe and 1f1b) at
   ``--mem-micro`` (default m = 2p and 4p), the micro-batch
   size fixed (``--mem-micro-size`` sequences): the bytes of tensors saved
   for backward alive at once during the step, per rank. A
   ``torch.autograd.graph.saved_tensors_hooks`` pack hook counts each saved
   storage once (parameters and buffers excluded) and hands autograd a
   detached alias with a ``weakref.finalize``, so the bytes leave the count
   when autograd drops the last alias (after the backward that used it);
   the peak is the most alive at once. One micro-batch's activations on each
   rank are measured the same way, as the peak of a step with m = 1 (the
   same micro-batch size, so exactly what the executor saves for one
   micro-batch). Formula: GPipe holds m micro-batches,
   1F1B min(p - r, m) on rank r (``Timeline.peak_activations`` of the
   schedule, simulated; ``peak_memory`` for the split backwards, a stage of
   interleaved or DualPipeV being 1/v or 1/2 of a rank's layers), times the
   measured one-micro-batch bytes; the executor's ``peak_in_flight`` is
   printed beside it. What ``weight_grad.py``'s store keeps between an I and
   its W is not seen by the hook (dY is no saved tensor): for split
   backwards the measured peak is a lower bound.
3. ``--timeline-json OUT``: the measured timeline of the median-makespan timed step of each
   schedule of part 1 (both ranks, seconds from the first action), in the
   simulator's JSON format (``timeline_to_json``). ``{schedule}`` and
   ``{m}`` in OUT are filled in; without them, several schedules or
   micro-batch counts get ``_{schedule}_m{m}`` before the suffix.
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

from xtrain.formulas import pipeline_bubble_fraction, pipeline_bubble_time  # noqa: E402
from xtrain.parallel.pipeline import (  # noqa: E402
    CHUNKED_SCHEDULES,
    Costs,
    Timeline,
    build_schedule,
    simulate,
    timeline_from_json,
    timeline_to_json,
)
from xtrain.parallel.pipeline.schedules import TWO_STAGE_SCHEDULES, schedule_layout  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb1p", "dualpipe", "dualpipev")
UNIT = {"F": 1, "B": 2, "W": 1}  # "unit costs": F = I = W = 1 per action (B = I + W = 2)


def formula_fraction(name: str, p: int, m: int, v: int = 1) -> float:
    """The closed form's bubble fraction with unit costs (:data:`UNIT`): for
    gpipe / 1f1b / interleaved ``pipeline_bubble_fraction`` (any F:B ratio);
    for zb1p and the DualPipes ``pipeline_bubble_time`` (the DualPipe README's
    table, per action) over itself plus the rank's compute (m(F+B) per stage
    of the rank, from the unit-cost simulation's busy time)."""
    if name in ("gpipe", "1f1b", "interleaved_1f1b"):
        return pipeline_bubble_fraction(name, p, m, v)
    idle = pipeline_bubble_time(name, p, UNIT["F"], UNIT["B"], UNIT["W"])
    busy = float(simulate(build_schedule(name, p, m, v), Costs(**UNIT)).busy[0])
    return idle / (idle + busy)
MB = 2**20


# -- reaching the executor from outside ----------------------------------------------------

class Probe:
    """What the wrapped ``PipelineRunner.forward_backward`` leaves per step on
    this rank (module-level: one per process)."""

    runner = None
    steps: list[dict] = []
    measure_memory = False
    tracker = None  # a SavedBytes (made at the first step when measure_memory), counting saved activations


class SavedBytes:
    """Bytes of tensors saved for backward that are alive now, and the peak.

    Each saved storage counts once, however many saved tensors view it; the
    pack hook returns a detached alias (no reference cycle through the
    output's grad_fn) and a finalizer on it takes the bytes off when the last
    alias of the storage dies."""

    def __init__(self, exclude_ptrs=()):
        self.exclude = set(exclude_ptrs)
        self.live: dict[int, list] = {}  # storage ptr -> [bytes, aliases alive]
        self.now = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.now

    def _drop(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def pack(self, t):
        import torch

        if not isinstance(t, torch.Tensor):
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.exclude or ptr == 0:
            return t
        alias = t.detach()
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [t.untyped_storage().nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(alias, self._drop, ptr)
        return alias

    @staticmethod
    def unpack(t):
        return t

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _install_probe() -> None:
    from xtrain.parallel.pipeline.executor import PipelineRunner

    if getattr(PipelineRunner.forward_backward, "_probe", False):
        return
    original = PipelineRunner.forward_backward

    def forward_backward(self, *args, **kwargs):
        Probe.runner = self
        if Probe.measure_memory and Probe.tracker is None:
            Probe.tracker = SavedBytes(_static_ptrs(self.model))
        tracker = Probe.tracker
        if tracker is not None:
            tracker.reset_peak()
            # what a split backward keeps from I to W (X and dY of each linear) counts too
            self.weight_grads.keep = tracker.pack
        t0 = time.perf_counter()
        with tracker.hooks() if tracker is not None else contextlib.nullcontext():
            loss = original(self, *args, **kwargs)
        t1 = time.perf_counter()
        Probe.steps.append({
            "start": t0, "end": t1, "wait_s": self.wait_s, "peak_in_flight": self.peak_in_flight,
            "timeline": [dict(a) for a in self.last_timeline],
            "saved_peak": tracker.peak if tracker is not None else None,
            "saved_after": tracker.now if tracker is not None else None,
        })
        return loss

    forward_backward._probe = True
    PipelineRunner.forward_backward = forward_backward


def _base(args, m: int, batch: int) -> list[str]:
    return [
        f"model={args.model}", f"model.n_layers={args.layers}", "strategy=pp", "data=stdlib", f"comm={args.comm}",
        "precision=fp32", "device=cpu", f"train.seq_len={args.seq_len}", f"train.global_batch_size={batch}",
        f"train.micro_batches={m}", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false",
        "train.log_every=1000000",
    ]


def _overrides(base, name, p, chunks, steps):
    v = chunks if name in CHUNKED_SCHEDULES else 1
    return [*base, f"strategy.pp={p}", f"strategy.pp_schedule={name}", f"strategy.pp_chunks={v}", f"train.steps={steps}"]


# -- part 1: bubble ---------------------------------------------------------------------------

def bubble_worker(rank, world, cases, root):
    """cases: [(name, m, overrides)]; per case this rank's per-step figures."""
    import torch

    from xtrain.config import compose
    from xtrain.train import run

    torch.set_num_threads(1)
    _install_probe()
    out = []
    for name, m, overrides in cases:
        Probe.steps, Probe.tracker = [], None
        records = []
        cfg = compose(overrides)
        with contextlib.redirect_stdout(io.StringIO()):
            run(cfg, Path(root) / f"bubble-{name}-m{m}", on_step=lambda r: records.append(r))
        steps = Probe.steps
        for s, rec in zip(steps, records):
            s["step_time_s"], s["pp_wait_s"] = rec["step_time_s"], rec.get("pp_wait_s")
        stage_rank = Probe.runner.plan.stage_rank
        layers = Probe.runner.plan.layers
        out.append({"name": name, "m": m, "rank": rank, "steps": steps, "stage_rank": stage_rank, "layers": layers})
    return out


def merged_timeline(name, m, stage_rank, per_rank_actions) -> Timeline:
    """Both ranks' measured actions on one timeline (seconds from the first action)."""
    origin = min(a["start"] for row in per_rank_actions for a in row)
    ranks = [[{**a, "start": a["start"] - origin, "end": a["end"] - origin} for a in row] for row in per_rank_actions]
    return timeline_from_json({"ranks": ranks, "name": name, "n_micro": m, "stage_rank": stage_rank, "time_unit": "s"})


def message_costs(tl: Timeline, schedule) -> dict:
    """Measured message figures of one step: latency samples (from the later of
    SEND end and RECV posting to the consuming compute's start), mean SEND and
    RECV posting time, and per-compute wait after a posted receive."""
    send_end, recv_end, start, free_at = {}, {}, {}, {}
    sends, recvs = [], []
    for r in range(tl.n_ranks):
        for iv in tl.comm[r]:
            a = iv.action
            if a.is_send:
                send_end[schedule.message_key(a)] = iv.end
                sends.append(iv.duration)
            else:
                recv_end[schedule.message_key(a)] = (r, iv.end, a)
                recvs.append(iv.duration)
        row = sorted(tl.intervals[r], key=lambda iv: iv.start)
        for k, iv in enumerate(row):
            start[(r, iv.action.kind, iv.action.stage, iv.action.mb)] = iv.start
            # when the rank could have started this compute at the earliest: its previous compute's end
            free_at[(r, iv.action.kind, iv.action.stage, iv.action.mb)] = row[k - 1].end if k else iv.start
    samples, early_waits, late, busy_free = [], [], [], []
    for key, (r, posted, a) in recv_end.items():
        consumer = (r, "F" if a.kind == "RECV_F" else "B", a.stage, a.mb)
        if consumer not in start and a.kind == "RECV_B":
            consumer = (r, "I", a.stage, a.mb)  # a split backward's input-gradient part
        if key not in send_end or consumer not in start:
            continue
        samples.append(start[consumer] - max(send_end[key], posted))
        # the same, but not before the rank was free (an OVERLAP's backward part waits for its forward part)
        busy_free.append(start[consumer] - max(send_end[key], posted, free_at[consumer]))
        if send_end[key] <= posted:  # already sent when the receive was posted: the wait is the transfer alone
            early_waits.append(start[consumer] - posted)
        late.append(send_end[key] > posted)
    return {
        # a message can land before its isend call returns (negative samples): the simulator gets >= 0
        "latency": max(0.0, statistics.median(samples)) if samples else 0.0,
        "latency_raw": statistics.median(samples) if samples else 0.0,
        "latency_free": max(0.0, statistics.median(busy_free)) if busy_free else 0.0,
        "early_wait": statistics.median(early_waits) if early_waits else 0.0,
        "send": statistics.fmean(sends) if sends else 0.0,
        "recv": statistics.fmean(recvs) if recvs else 0.0,
        "n_messages": len(samples),
        "sent_before_posted": sum(1 for x in late if not x),
    }


def overlap_stats(tl: Timeline, schedule) -> dict:
    """Does an OVERLAP hide its messages? For every OVERLAP on every rank whose
    backward part takes a received gradient: when the gradient's SEND ended
    against the OVERLAP's forward part, and the wait between the forward's end
    and the backward's start (the executor waits on the receive there).
    Beside it, the same wait for backwards (B or I) outside an OVERLAP with a
    received gradient: the gap from the rank's previous compute end."""
    send_end, recv = {}, {}
    for r in range(tl.n_ranks):
        for iv in tl.comm[r]:
            if iv.action.is_send:
                send_end[schedule.message_key(iv.action)] = iv.end
            else:
                recv[(r, iv.action.kind, iv.action.stage, iv.action.mb)] = schedule.message_key(iv.action)
    ov = {"n": 0, "sent_during_f": 0, "sent_before_f": 0, "sent_after_f": 0, "waits": [], "waits_during": [], "f_s": []}
    plain_waits = []
    for r in range(tl.n_ranks):
        ivs = {(iv.action.kind, iv.action.stage, iv.action.mb): iv for iv in tl.intervals[r]}
        overlapped = set()
        for a in schedule.actions[r]:
            if a.kind != "OVERLAP":
                continue
            f, b = a.sub
            overlapped.add((b.kind, b.stage, b.mb))
            key = recv.get((r, "RECV_B", b.stage, b.mb))
            fi, bi = ivs.get(("F", f.stage, f.mb)), ivs.get((b.kind, b.stage, b.mb))
            if key is None or key not in send_end or fi is None or bi is None:
                continue
            se, wait = send_end[key], bi.start - fi.end
            ov["n"] += 1
            ov["waits"].append(wait)
            ov["f_s"].append(fi.end - fi.start)
            if se <= fi.start:
                ov["sent_before_f"] += 1
            elif se <= fi.end:
                ov["sent_during_f"] += 1
                ov["waits_during"].append(wait)
            else:
                ov["sent_after_f"] += 1
        row = sorted(tl.intervals[r], key=lambda iv: iv.start)
        for prev, iv in zip(row, row[1:]):
            k = (iv.action.kind, iv.action.stage, iv.action.mb)
            if iv.action.kind in ("B", "I") and k not in overlapped and (r, "RECV_B", iv.action.stage, iv.action.mb) in recv:
                plain_waits.append(iv.start - prev.end)
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    return {"n": ov["n"], "sent_before_f": ov["sent_before_f"], "sent_during_f": ov["sent_during_f"],
            "sent_after_f": ov["sent_after_f"], "wait_ms": med(ov["waits"]) * 1e3,
            "wait_during_ms": med(ov["waits_during"]) * 1e3, "wait_max_ms": max(ov["waits"], default=float("nan")) * 1e3,
            "f_ms": med(ov["f_s"]) * 1e3, "plain_n": len(plain_waits), "plain_wait_ms": med(plain_waits) * 1e3}


def per_layer_costs(tl: Timeline, layers_of_stage) -> dict:
    """Mean measured seconds per (kind, one layer block) of a timeline's compute:
    each action's duration over the blocks of its stage (the embedding and the
    head ride on the end stages' blocks)."""
    tot, n = {}, {}
    for row in tl.intervals:
        for iv in row:
            k = iv.action.kind
            tot[k] = tot.get(k, 0.0) + (iv.end - iv.start)
            n[k] = n.get(k, 0) + layers_of_stage(iv.action.stage)
    return {k: tot[k] / n[k] for k in tot}


def bubble_rows(results, chunks, warmup):
    """Per (schedule, m): per-rank medians of every figure."""
    table = []
    for (name, m), per_rank in results.items():
        v = chunks if name in CHUNKED_SCHEDULES else 1
        p = len(per_rank)
        schedule = build_schedule(name, p, m, v)
        n_steps = min(len(r["steps"]) for r in per_rank)
        per_step = []
        for i in range(warmup, n_steps):
            steps = [r["steps"][i] for r in per_rank]
            tl = merged_timeline(name, m, per_rank[0]["stage_rank"], [s["timeline"] for s in steps])
            mc = message_costs(tl, schedule)
            ovs = overlap_stats(tl, schedule)
            free = simulate(schedule, Costs.from_timeline(tl))
            costs = Costs.from_timeline(tl, latency=mc["latency"])
            with_msgs = simulate(schedule, Costs(latency=costs.latency, send=mc["send"], recv=mc["recv"], per_stage=costs.per_stage))
            per_step.append({
                "timeline": tl, "msgs": mc, "overlap": ovs,
                "fb_s": [s["end"] - s["start"] for s in steps],
                "step_s": [s["step_time_s"] for s in steps],
                "wait_s": [s["wait_s"] for s in steps],
                "idle_tl": [float(x) / float(tl.makespan) for x in tl.idle],
                "makespan": float(tl.makespan),
                "bubble_tl": float(tl.bubble_fraction),
                "sim_free": [float(x) / float(free.makespan) for x in free.idle],
                "sim_free_bubble": float(free.bubble_fraction), "sim_free_makespan": float(free.makespan),
                "sim_msgs": [float(x) / float(with_msgs.makespan) for x in with_msgs.idle],
                "sim_msgs_bubble": float(with_msgs.bubble_fraction), "sim_msgs_makespan": float(with_msgs.makespan),
                "busy": [float(b) for b in tl.busy],
            })
        med = statistics.median

        def col(key, r=None):
            return med([s[key][r] if r is not None else s[key] for s in per_step])

        entry = {
            "name": name, "m": m, "p": p, "v": v, "formula": formula_fraction(name, p, m, v),
            "steps": len(per_step), "layers": per_rank[0]["layers"], "stage_rank": per_rank[0]["stage_rank"],
            "makespan": col("makespan"), "bubble_tl": col("bubble_tl"),
            "sim_free_bubble": col("sim_free_bubble"), "sim_msgs_bubble": col("sim_msgs_bubble"),
            "sim_free_makespan": col("sim_free_makespan"), "sim_msgs_makespan": col("sim_msgs_makespan"),
            "latency_ms": med([s["msgs"]["latency"] for s in per_step]) * 1e3,
            "latency_raw_ms": med([s["msgs"]["latency_raw"] for s in per_step]) * 1e3,
            "latency_free_ms": med([s["msgs"]["latency_free"] for s in per_step]) * 1e3,
            "early_wait_ms": med([s["msgs"]["early_wait"] for s in per_step]) * 1e3,
            "send_ms": med([s["msgs"]["send"] for s in per_step]) * 1e3,
            "recv_ms": med([s["msgs"]["recv"] for s in per_step]) * 1e3,
            "n_messages": per_step[-1]["msgs"]["n_messages"],
            "overlap": {k: med([s["overlap"][k] for s in per_step]) for k in per_step[0]["overlap"]},
            "per_layer": {k: med([per_layer_costs(s["timeline"], lambda st, L=per_rank[0]["layers"], sch=schedule: len(L[sch.stage_layers_of(st)]))[k]
                                  for s in per_step]) for k in per_layer_costs(per_step[0]["timeline"], lambda st: 1)},
            "sent_before_posted": per_step[-1]["msgs"]["sent_before_posted"],
            "costs": {f"{k}{s}": round(d * 1e3, 2) for (k, s), d in sorted(Costs.from_timeline(per_step[-1]["timeline"]).per_stage.items(), key=lambda kv: (kv[0][1], kv[0][0]))},
            # the timed step whose makespan is the median one: the picture of a typical step
            "last_timeline": sorted(per_step, key=lambda s: s["makespan"])[len(per_step) // 2]["timeline"],
            "ranks": [],
        }
        for r in range(p):
            fb, wait = col("fb_s", r), col("wait_s", r)
            entry["ranks"].append({
                "rank": r, "step_s": col("step_s", r), "fb_s": fb, "wait_s": wait,
                "wait_frac": med([s["wait_s"][r] / s["fb_s"][r] for s in per_step]),
                "idle_tl": col("idle_tl", r), "busy_s": col("busy", r),
                "sim_free": col("sim_free", r), "sim_msgs": col("sim_msgs", r),
            })
        table.append(entry)
    return table


def print_bubble(table, args) -> None:
    print("\n### Bubble: idle fraction per rank, pp=2 on 2 ranks\n")
    print("| schedule | m | rank | step s | pipeline s | wait s | wait / pipeline | timeline idle | simulated (measured costs, free messages) | simulated (+ measured message costs) | formula |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for e in table:
        for r in e["ranks"]:
            print(f"| {e['name']} | {e['m']} | {r['rank']} | {r['step_s']:.3f} | {r['fb_s']:.3f} | {r['wait_s']:.3f} | "
                  f"{r['wait_frac']:.3f} | {r['idle_tl']:.3f} | {r['sim_free']:.3f} | {r['sim_msgs']:.3f} | {e['formula']:.3f} |")
    print("\n| schedule | m | v | measured bubble (timeline) | simulated, free messages | simulated, measured messages | formula | makespan s: measured / simulated free / simulated msgs | message latency ms (median) | send / recv posting ms | wait after posting an already-sent message, ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|")
    for e in table:
        print(f"| {e['name']} | {e['m']} | {e['v']} | {e['bubble_tl']:.3f} | {e['sim_free_bubble']:.3f} | {e['sim_msgs_bubble']:.3f} | "
              f"{e['formula']:.3f} | {e['makespan']:.3f} / {e['sim_free_makespan']:.3f} / {e['sim_msgs_makespan']:.3f} | "
              f"{e['latency_ms']:.2f} | {e['send_ms']:.2f} / {e['recv_ms']:.2f} | {e['early_wait_ms']:.2f} |")
    print()
    for e in table:
        print(f"{e['name']} m={e['m']}: blocks per stage {[len(x) for x in e['layers']]}, stage -> rank {e['stage_rank']}; "
              f"{e['steps']} timed steps; last step's measured costs ms per (kind, stage): {e['costs']}; "
              f"{e['sent_before_posted']} of {e['n_messages']} messages were sent before their receive was posted")


def simulate_at(table, p: int, micro, chunks: int, blocks_of) -> list[dict]:
    """Each measured schedule (its median-over-steps per-layer costs from the pp=2
    run at the largest measured m) simulated at p ranks: unit costs, measured
    costs with free messages, and measured costs plus the run's measured message
    latency. ``blocks_of(n)``: layers per block when the model is cut into n
    blocks. A kind the run did not measure (I/W for a fused-backward schedule)
    comes from all runs pooled: B = I + W, or I and W in the pooled I:W ratio."""
    pooled: dict[str, list[float]] = {}
    for e in table:
        for k, c in e["per_layer"].items():
            pooled.setdefault(k, []).append(c)
    pool = {k: statistics.fmean(v) for k, v in pooled.items()}
    src = {}
    for e in table:  # one source run per schedule: the largest m measured
        if e["name"] not in src or e["m"] > src[e["name"]]["m"]:
            src[e["name"]] = e
    rows = []
    for name, e in src.items():
        c = dict(e["per_layer"])
        if "B" not in c:
            c["B"] = c.get("I", pool.get("I", 0)) + c.get("W", pool.get("W", 0))
        if "I" not in c or "W" not in c:
            share = pool["W"] / (pool["I"] + pool["W"]) if "I" in pool and "W" in pool else 0.5
            c.setdefault("W", c["B"] * share)
            c.setdefault("I", c["B"] - c["W"])
        v = e["v"]
        for m in micro:
            sched = build_schedule(name, p, m, v)
            layout = schedule_layout(name, p, v)
            per_block = blocks_of(layout.n_blocks)
            per_stage = {(k, st): c[k] * per_block[layout.stage_layers_of(st)] for k in ("F", "B", "I", "W") for st in range(sched.n_stages)}
            unit = simulate(sched, Costs(**UNIT))
            free = simulate(sched, Costs(per_stage=per_stage))
            lat = e["latency_free_ms"] / 1e3  # not counting time a message waited for its rank to be free
            msgs = simulate(sched, Costs(per_stage=per_stage, latency=lat, send=e["send_ms"] / 1e3, recv=e["recv_ms"] / 1e3))
            rows.append({
                "name": name, "p": p, "m": m, "v": v, "from_m": e["m"], "formula": formula_fraction(name, p, m, v),
                "unit": float(unit.bubble_fraction), "free": float(free.bubble_fraction), "msgs": float(msgs.bubble_fraction),
                "free_makespan": float(free.makespan), "msgs_makespan": float(msgs.makespan), "latency_ms": e["latency_free_ms"],
                "send_ms": e["send_ms"], "recv_ms": e["recv_ms"],
                "peak_act": list(unit.peak_activations), "peak_mem": [float(x) for x in unit.peak_memory],
                "per_layer_ms": {k: round(x * 1e3, 2) for k, x in sorted(c.items())},
            })
    return rows


def print_simulated_at(rows) -> None:
    if not rows:
        return
    p = rows[0]["p"]
    print(f"\n### Bubble at p={p}: formula, simulated with unit costs, simulated with the pp=2 run's measured costs\n")
    print("| schedule | m | formula (unit costs) | simulated, unit costs | simulated, measured costs, free messages | simulated, measured costs + measured messages (latency, posting) | makespan s (free / latency) | peak activations, unit sim (stage-micro-batches per rank) | peak memory, unit sim |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|")
    for x in rows:
        print(f"| {x['name']} | {x['m']} | {x['formula']:.3f} | {x['unit']:.3f} | {x['free']:.3f} | {x['msgs']:.3f} | "
              f"{x['free_makespan']:.3f} / {x['msgs_makespan']:.3f} | {' '.join(map(str, x['peak_act']))} | {' '.join('%g' % y for y in x['peak_mem'])} |")
    print()
    for x in rows:
        if x["m"] == rows[0]["m"]:
            print(f"{x['name']}: measured ms per layer block at pp=2 m={x['from_m']}: {x['per_layer_ms']}; latency {x['latency_ms']:.2f} ms "
                  f"(from the later of SEND end, RECV posting and the rank's previous compute end), send / recv posting {x['send_ms']:.2f} / {x['recv_ms']:.2f} ms")


def print_overlap(table) -> None:
    rows = [e for e in table if e["overlap"]["n"]]
    if not rows:
        return
    print("\n### OVERLAP: where the backward part's received gradient was sent, against the forward part\n")
    print("| schedule | m | overlapped backwards with a received gradient (per step) | sent before F started | sent while F ran | sent after F ended | wait F end -> B start, ms (median / max) | median wait when sent during F, ms | F part ms | non-overlapped B/I with received gradient: n, median gap ms |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for e in rows:
        o = e["overlap"]
        print(f"| {e['name']} | {e['m']} | {o['n']:g} | {o['sent_before_f']:g} | {o['sent_during_f']:g} | {o['sent_after_f']:g} | "
              f"{o['wait_ms']:.2f} / {o['wait_max_ms']:.2f} | {o['wait_during_ms']:.2f} | {o['f_ms']:.1f} | {o['plain_n']:g}, {o['plain_wait_ms']:.2f} |")


def write_timelines(table, pattern: str) -> list[Path]:
    written = []
    many = len(table) > 1
    for e in table:
        if "{" in pattern:
            path = Path(pattern.format(schedule=e["name"], m=e["m"]))
        elif many:
            base = Path(pattern)
            path = base.with_name(f"{base.stem}_{e['name']}_m{e['m']}{base.suffix or '.json'}")
        else:
            path = Path(pattern)
        path.parent.mkdir(parents=True, exist_ok=True)
        tl = e["last_timeline"]
        tl.name = f"{e['name']} (p={e['p']}, m={e['m']}{', v=%d' % e['v'] if e['v'] > 1 else ''}; the median-makespan step of {e['steps']})"
        timeline_to_json(tl, path)
        written.append(path)
    return written


# -- part 2: memory ---------------------------------------------------------------------------

def _static_ptrs(model) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}


def memory_worker(rank, world, cases, root):
    """cases: [(name, m, overrides)]; per case this rank's saved-bytes peak and one micro-batch's bytes."""
    import torch

    from xtrain.config import compose
    from xtrain.train import run

    torch.set_num_threads(1)
    _install_probe()
    out = []
    for name, m, overrides in cases:
        Probe.steps, Probe.tracker, Probe.measure_memory = [], None, True
        cfg = compose(overrides)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                run(cfg, Path(root) / f"memory-{name}-p{world}-m{m}")
        finally:
            Probe.tracker, Probe.measure_memory = None, False
        last = Probe.steps[-1]
        out.append({
            "name": name, "m": m, "rank": rank, "stages": Probe.runner.plan.my_stages, "v": Probe.runner.plan.v,
            "saved_peak": last["saved_peak"], "saved_after": last["saved_after"],
            "peak_in_flight": last["peak_in_flight"],
        })
    return out


def memory_table(results):
    """Rows per (schedule, p, m >= 2p) and rank; one micro-batch is the peak of the m = 1 run."""
    rows = []
    for (name, p, m), per_rank in results.items():
        if m == 1:
            continue
        unit = results[("gpipe", p, 1)]
        v = per_rank[0].get("v", 1)
        sim = simulate(build_schedule(name, p, m, v))
        held = sim.peak_activations
        # a (stage, micro-batch) unit is one stage's share of the rank's layers
        share = 1.0 if name not in TWO_STAGE_SCHEDULES and v == 1 else (
            1.0 if name == "dualpipe" else 1.0 / (2 if name == "dualpipev" else v))
        for r in per_rank:
            rank = r["rank"]
            one = unit[rank]["saved_peak"]
            rows.append({
                "name": name, "p": p, "m": m, "rank": rank, "one_mb": one / MB, "formula_held": held[rank],
                "sim_mem": float(sim.peak_memory[rank]), "share": share,
                "formula_mb": float(sim.peak_memory[rank]) * share * one / MB, "peak_mb": r["saved_peak"] / MB,
                "peak_over_one": r["saved_peak"] / one, "in_flight": r["peak_in_flight"],
                "after_mb": r["saved_after"] / MB,
            })
    return rows


def print_memory(rows) -> None:
    print("\n### Activation memory: peak bytes saved for backward per rank (MB = 2^20 bytes)\n")
    print("| schedule | p | m | rank | one micro-batch MB (measured, m = 1) | simulated: stage-micro-batches held / peak memory (units) | unit = rank's layers x | simulated MB | measured peak MB | measured peak / one micro-batch | executor peak_in_flight |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for x in rows:
        print(f"| {x['name']} | {x['p']} | {x['m']} | {x['rank']} | {x['one_mb']:.2f} | {x['formula_held']} / {x['sim_mem']:g} | {x['share']:g} | "
              f"{x['formula_mb']:.2f} | {x['peak_mb']:.2f} | {x['peak_over_one']:.3f} | {x['in_flight']} |")
    left = [x for x in rows if x["after_mb"] > 0.01]
    if left:
        print("\nsaved bytes still alive after a step (should be 0): " + ", ".join(f"{x['name']} p{x['p']} m{x['m']} r{x['rank']}: {x['after_mb']:.2f} MB" for x in left))


# -- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--layers", type=int, default=8, help="model.n_layers (default 8, a multiple of 4)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-size", type=int, default=2, help="sequences per micro-batch in the bubble runs (default 2)")
    ap.add_argument("--micro", type=int, nargs="+", default=[4, 8], help="micro-batch counts of the bubble runs (default 4 8)")
    ap.add_argument("--chunks", type=int, default=2, help="stages per rank of interleaved_1f1b (default 2)")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--steps", type=int, default=6, help="timed steps per bubble run (default 6)")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every bubble run (default 2)")
    ap.add_argument("--memory-pp", type=int, nargs="*", default=[2], help="pipeline sizes of the memory runs (default 2; 4 oversubscribes)")
    ap.add_argument("--mem-micro-size", type=int, default=2, help="sequences per micro-batch in the memory runs (default 2)")
    ap.add_argument("--mem-micro", type=int, nargs="*", default=None, help="micro-batch counts of the memory runs (default 2p and 4p)")
    ap.add_argument("--mem-schedules", default="gpipe,1f1b", help="schedules of the memory runs (default gpipe,1f1b)")
    ap.add_argument("--sim-pp", type=int, default=4, help="also simulate every measured schedule at this p with the measured costs (0: no)")
    ap.add_argument("--sim-micro", type=int, nargs="+", default=[8, 16], help="micro-batch counts of that simulation (default 8 16)")
    ap.add_argument("--skip-bubble", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--comm", default="xtrain", choices=("xtrain", "torch"))
    ap.add_argument("--timeline-json", default=None, help="write each bubble run's last measured step here (simulator JSON)")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the tables here")
    args = ap.parse_args(argv)
    schedules = [s for s in args.schedules.split(",") if s]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="xtrain-measure-pp-"))
    root.mkdir(parents=True, exist_ok=True)

    import torch

    from xtrain.spawn import run_on_ranks

    print(f"model={args.model} n_layers={args.layers} seq_len={args.seq_len} fp32 comm={args.comm} | torch {torch.__version__}, "
          f"{os.cpu_count()} cores, {platform.machine()}, load avg {' '.join('%.2f' % x for x in os.getloadavg())} | runs in {root}", flush=True)
    dump = {}
    if not args.skip_bubble:
        p = 2
        cases = [(name, m, _overrides(_base(args, m, m * args.micro_size), name, p, args.chunks, args.warmup + args.steps))
                 for m in args.micro for name in schedules]
        t0 = time.perf_counter()
        per_rank = run_on_ranks(bubble_worker, p, cases, str(root), timeout=3600, pg_timeout=600)
        print(f"bubble job ({p} ranks): {time.perf_counter() - t0:.0f} s, load avg now {os.getloadavg()[0]:.2f}; "
              f"micro-batch {args.micro_size} x {args.seq_len} tokens", flush=True)
        results = {}
        for i, (name, m, _) in enumerate(cases):
            results[(name, m)] = [per_rank[r][i] for r in range(p)]
        table = bubble_rows(results, args.chunks, args.warmup)
        print_bubble(table, args)
        print_overlap(table)
        if args.sim_pp:
            from xtrain.config import compose
            from xtrain.model import ModelConfig, build_model
            from xtrain.parallel.pipeline.stages import stage_layers

            cfg0 = compose(_base(args, 1, args.micro_size))
            plain = build_model(ModelConfig.from_dict(dict(cfg0.model.items())), cfg0.seed)
            sim_rows = simulate_at(table, args.sim_pp, args.sim_micro, args.chunks, lambda n: [len(x) for x in stage_layers(plain, n)])
            print_simulated_at(sim_rows)
            dump["simulated_at"] = sim_rows
        if args.timeline_json:
            for path in write_timelines(table, args.timeline_json):
                print(f"wrote {path}")
        dump["bubble"] = [{k: v for k, v in e.items() if k != "last_timeline"} for e in table]
    if not args.skip_memory:
        rows = []
        for p in args.memory_pp:
            cases = [("gpipe", 1, _overrides(_base(args, 1, args.mem_micro_size), "gpipe", p, 1, 1))]  # one micro-batch
            for m in (args.mem_micro or (2 * p, 4 * p)):
                for name in [s for s in args.mem_schedules.split(",") if s]:
                    cases.append((name, m, _overrides(_base(args, m, m * args.mem_micro_size), name, p, args.chunks, 1)))
            t0 = time.perf_counter()
            per_rank = run_on_ranks(memory_worker, p, cases, str(root), timeout=3600, pg_timeout=600)
            print(f"memory job ({p} ranks): {time.perf_counter() - t0:.0f} s, load avg now {os.getloadavg()[0]:.2f}; "
                  f"micro-batch {args.mem_micro_size} x {args.seq_len} tokens", flush=True)
            results = {}
            for i, (name, m, _) in enumerate(cases):
                results[(name, p, m)] = [per_rank[r][i] for r in range(p)]
            rows += memory_table(results)
        print_memory(rows)
        dump["memory"] = rows
    print(f"\nload avg at the end: {' '.join('%.2f' % x for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1, default=str))
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
