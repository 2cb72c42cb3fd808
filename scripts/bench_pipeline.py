#!/usr/bin/env python
"""xtrain's pipeline schedules against torch.distributed.pipelining's, on 2 and
4 gloo ranks: GPipe, 1F1B, interleaved 1F1B, ZB-H1 (zb1p) and DualPipeV.

    python scripts/bench_pipeline.py                                  # model=small, 8 layers, 2 and 4 ranks
    python scripts/bench_pipeline.py --nproc 2 --steps 8 --repeats 2
    python scripts/bench_pipeline.py --nproc 2 --model tiny --layers 4 --seq-len 32 --batch 8 \\
        --micro 4 --steps 2 --warmup 0 --repeats 1                    # the smoke test's setting

Both sides build the same plain model (``xtrain.model.build_model``, same
seed), cut it the same way (``xtrain.parallel.pipeline.stages.stage_layers``:
stage s holds the same blocks, the embedding on the first stage, the final
norm, the head and the loss on the last; stage s on rank
``schedule_layout(...).stage_rank[s]``, i.e. s for GPipe/1F1B/zb1p, s mod p for
interleaved with v = ``--chunks`` stages per rank, and the V of DualPipeV:
rank r holds stages r and 2p-1-r, torch's ``style="v"`` map), read the same batch
(``xtrain.data.local_batch``, dp = 1) split into the same ``--micro``
micro-batches, and take the same loss (mean next-token cross entropy in fp32,
``xtrain.parallel.base.cross_entropy``; each micro-batch's gradient scaled by
1/m), in fp32, with the same AdamW groups (``xtrain.optim.build_optimizer``),
warmup + cosine learning rate and global-norm clipping at ``train.grad_clip``.

xtrain: the real trainer, ``xtrain.train.run``, with ``strategy=pp
strategy.pp=N strategy.pp_schedule=...`` (``comm`` from ``--comm``).

torch: ``PipelineStage`` per stage (shapes inferred at run time) and
``ScheduleGPipe`` / ``Schedule1F1B`` / ``ScheduleInterleaved1F1B`` /
``ScheduleInterleavedZeroBubble`` / ``ScheduleDualPipeV`` (the last three get
the list of this rank's stages) with the same loss function. zb1p is matched
with ``ScheduleInterleavedZeroBubble`` given ONE stage per rank (torch's
ZB1P; with one stage per rank its F/I/W order per rank is xtrain's zb1p's,
split the same way: I = the input gradient, W = the weight gradient of the
same micro-batch later); ``ScheduleZBVZeroBubble`` is a V schedule (two
stages per rank), a different pipeline. dualpipev is matched with
``ScheduleDualPipeV`` (same V map, same m); torch runs its ``OVERLAP_F_B``
action as its two sub-actions one after the other (no custom function is
registered), and its overlapped backward is a full backward, as xtrain's. after ``schedule.step``
every gradient is divided by m once (torch's schedules are built with
``scale_grads=False``: their per-stage scaling would divide a parameter held
by two of a rank's stages, the tied embedding under DualPipeV, twice); the
tied embedding's two gradients (first and last stage) are summed over a
group of those two ranks, as xtrain's ``Partial`` placement does, then the
squared gradient norm is summed over the ranks (the tied weight counted once)
and every rank scales its gradients, then ``optimizer.step()``.

Timing, the same for both sides: every rank passes a barrier (not timed),
then the clock runs from the start of the pipeline step (xtrain:
``PipelineRunner.forward_backward``; torch: ``schedule.step``) through
gradient sync and clipping to the end of the optimizer step; a step's time is
the slowest rank's. One job per rank count; the trainer's per-step callback
(``on_step``) runs torch's step i right after xtrain's step i, so the pair is
adjacent in time and load from other processes hits both alike; ``--repeats``
rounds alternate the order of the schedules; the first ``--warmup`` steps of
every run are dropped (torch infers shapes in its first step). Tokens/s are
global batch tokens over the median step time; "paired" is the median of the
per-step torch/xtrain time ratios. CPU seconds per step (``time.process_time``
over the same interval, all threads, summed over the ranks) move little with
load from other processes. Losses are compared step by step (same weights,
same batches: they must agree to float rounding).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from xtrain.config import compose  # noqa: E402
from xtrain.data import load_data, local_batch  # noqa: E402
from xtrain.model import ModelConfig, build_model  # noqa: E402
from xtrain.optim import build_optimizer, lr_at, set_lr  # noqa: E402
from xtrain.parallel.base import cross_entropy  # noqa: E402
from xtrain.parallel.pipeline.schedules import CHUNKED_SCHEDULES, build_schedule, schedule_layout  # noqa: E402
from xtrain.parallel.pipeline.stages import stage_layers  # noqa: E402
from xtrain.spawn import run_on_ranks  # noqa: E402

TARGET = 0.95  # xtrain tokens/s at least this fraction of torch's
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb1p", "dualpipev")
TORCH_SCHEDULE = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B",
                  "zb1p": "ScheduleInterleavedZeroBubble", "dualpipev": "ScheduleDualPipeV"}
LIST_OF_STAGES = frozenset({"interleaved_1f1b", "zb1p", "dualpipev"})  # torch takes this rank's stages as a list


def chunks_of(name: str, chunks: int) -> int:
    return chunks if name in CHUNKED_SCHEDULES else 1


# -- timing xtrain's trainer from outside ---------------------------------------------------

class _Clock:
    """Per-step (start, end) of xtrain's pipeline step on this rank: from the
    entry of ``PipelineRunner.forward_backward`` (after a barrier) to the return
    of ``strategy.optimizer_step``."""

    starts: list[float] = []
    ends: list[float] = []
    cpu: list[float] = []  # process CPU seconds (all threads) over the same interval
    _cpu0 = 0.0


def _install_xtrain_clock() -> None:
    from xtrain.parallel.pipeline.executor import PipelineRunner

    if getattr(PipelineRunner.forward_backward, "_bench_clock", False):
        return
    original = PipelineRunner.forward_backward

    def forward_backward(self, *args, **kwargs):
        strategy = self.strategy
        if not getattr(strategy, "_bench_clocked", False):
            step = strategy.optimizer_step

            def optimizer_step(optimizer):
                step(optimizer)
                _Clock.ends.append(time.perf_counter())
                _Clock.cpu.append(time.process_time() - _Clock._cpu0)

            strategy.optimizer_step = optimizer_step
            strategy._bench_clocked = True
        dist.barrier()
        _Clock._cpu0 = time.process_time()
        _Clock.starts.append(time.perf_counter())
        return original(self, *args, **kwargs)

    forward_backward._bench_clock = True
    PipelineRunner.forward_backward = forward_backward


# -- torch's side ----------------------------------------------------------------------------

_ENDS_GROUPS: dict[tuple[int, int], object] = {}


def _ends_group(a: int, b: int):
    """The process group of the first and the last stage's ranks (made once per job:
    new_group is a collective over the world)."""
    key = (a, b)
    if key not in _ENDS_GROUPS:
        _ENDS_GROUPS[key] = dist.new_group(sorted(key))
    return _ENDS_GROUPS[key]


class TorchPipeLoop:
    """The same training as a minimal loop over torch.distributed.pipelining."""

    def __init__(self, cfg, data, name: str, p: int, v: int):
        from torch.distributed import pipelining

        self.cfg, self.t, self.data, self.name = cfg, cfg.train, data, name
        self.rank, self.p, self.m = dist.get_rank(), p, cfg.train.micro_batches
        torch.manual_seed(cfg.seed)
        model = build_model(ModelConfig.from_dict(dict(cfg.model.items())), cfg.seed)
        layout = schedule_layout(name, p, v)
        self.stage_rank = list(layout.stage_rank)
        n_stages = len(self.stage_rank)
        layers = stage_layers(model, n_stages, cfg.strategy.get("pp_layers"))
        mine = [s for s in range(n_stages) if self.stage_rank[s] == self.rank]
        self.first, self.last = 0 in mine, n_stages - 1 in mine
        parts = [model.part(layers[s], first=s == 0, last=s == n_stages - 1) for s in mine]
        device = torch.device("cpu")
        stages = [pipelining.PipelineStage(part, s, n_stages, device) for part, s in zip(parts, mine)]
        cls = getattr(pipelining, TORCH_SCHEDULE[name])
        arg = stages if name in LIST_OF_STAGES else stages[0]
        # scale_grads=False, and every gradient divided by m once in _sync_and_clip: torch's own scaling
        # divides each stage's parameters by m at that stage's last backward, so a parameter in two of a
        # rank's stages (the tied embedding when the first and the last stage share rank 0, DualPipeV)
        # would be divided twice, part of it before the other stage's last gradients arrive
        self.schedule = cls(arg, n_microbatches=self.m, loss_fn=cross_entropy, scale_grads=False)
        self.holder = nn.ModuleList(parts)  # one module over this rank's stages (shared parameters)
        self.params = list(self.holder.parameters())
        self.optimizer = build_optimizer(self.holder, self.t)
        # a tied embedding lives on the first and the last stage: sum its two gradients
        tied = model.head.weight is model.embed.weight
        ends = (self.stage_rank[0], self.stage_rank[-1])
        self.tied = model.embed.weight if tied and ends[0] != ends[1] and (self.first or self.last) else None
        self.ends_group = _ends_group(*ends) if tied and ends[0] != ends[1] else None
        # the norm counts each element once: the tied weight on the first stage's rank only
        self.counted = [q for q in self.params if not (self.tied is not None and q is self.tied and not self.first)]
        self.losses: list[float] = []
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu: list[float] = []

    @torch.no_grad()
    def _sync_and_clip(self) -> None:
        grads = [q.grad for q in self.params if q.grad is not None]
        if grads:
            torch._foreach_div_(grads, float(self.m))  # the 1/m of the mean over micro-batches, once
        if self.tied is not None and self.tied.grad is not None:
            dist.all_reduce(self.tied.grad, group=self.ends_group)
        grads = [q.grad for q in self.params if q.grad is not None]
        counted = [q.grad for q in self.counted if q.grad is not None]
        norm_sq = torch.stack(torch._foreach_norm(counted)).float().pow(2).sum() if counted else torch.zeros(())
        dist.all_reduce(norm_sq)
        if self.t.grad_clip and self.t.grad_clip > 0 and grads:
            scale = torch.clamp(self.t.grad_clip / (norm_sq.sqrt() + 1e-6), max=1.0)
            torch._foreach_mul_(grads, scale)

    def step(self, step: int) -> None:
        t = self.t
        set_lr(self.optimizer, lr_at(step, lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps, min_lr_ratio=t.min_lr_ratio))
        x, y = local_batch(self.data.train, seed=self.cfg.seed, step=step, global_batch_size=t.global_batch_size, seq_len=t.seq_len)
        losses: list = []
        dist.barrier()
        c0 = time.process_time()
        t0 = time.perf_counter()
        if self.first:
            self.schedule.step(x, target=y if self.last else None, losses=losses if self.last else None)
        elif self.last:
            self.schedule.step(target=y, losses=losses)
        else:
            self.schedule.step()
        self._sync_and_clip()
        self.optimizer.step()
        self.starts.append(t0)
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time() - c0)
        self.optimizer.zero_grad(set_to_none=True)
        if self.last:
            self.losses.append(float(torch.stack([loss.detach() for loss in losses]).mean()))

    def after_xtrain_step(self, record: dict) -> None:
        """``xtrain.train.run``'s per-step callback: torch's step i right after xtrain's."""
        self.step(record["step"] - 1)


# -- the job ---------------------------------------------------------------------------------

def speed_worker(rank, world, base, schedules, chunks, repeats, root):
    import warnings

    from xtrain.train import run

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    _install_xtrain_clock()
    out = []
    for r in range(repeats):
        order = list(schedules) if r % 2 == 0 else list(schedules)[::-1]
        for name in order:
            v = chunks_of(name, chunks)
            cfg = compose([*base, f"strategy.pp={world}", f"strategy.pp_schedule={name}", f"strategy.pp_chunks={v}"])
            data = load_data(cfg.data)
            loop = TorchPipeLoop(cfg, data, name, world, v)
            _Clock.starts, _Clock.ends, _Clock.cpu = [], [], []
            with contextlib.redirect_stdout(io.StringIO()):
                result = run(cfg, Path(root) / f"p{world}-{name}-{r}", on_step=loop.after_xtrain_step)
            out.append({
                "schedule": name, "repeat": r, "rank": rank,
                "xtrain": list(zip(_Clock.starts, _Clock.ends)),
                "torch": list(zip(loop.starts, loop.ends)),
                "xtrain_cpu": list(_Clock.cpu), "torch_cpu": list(loop.cpu),
                "xtrain_losses": result.losses,
                "torch_losses": loop.losses if loop.last else None,
            })
            del loop
    return out


def summarise(per_rank: list[list[dict]], schedules, warmup: int, tokens: int) -> dict:
    """Per schedule: step times (the slowest rank's), tokens/s, ratios, loss diff."""
    res = {}
    runs = [run for rank_runs in per_rank for run in rank_runs]
    for name in schedules:
        repeats = sorted({run["repeat"] for run in runs if run["schedule"] == name})
        xs, ts, pairs, diff, per_run, xc, tc = [], [], [], 0.0, [], [], []
        for r in repeats:
            mine = [run for run in runs if run["schedule"] == name and run["repeat"] == r]
            x = [max(e - s for s, e in steps) for steps in zip(*[run["xtrain"] for run in mine])]
            t = [max(e - s for s, e in steps) for steps in zip(*[run["torch"] for run in mine])]
            x, t = x[warmup:], t[warmup:]
            xc += [sum(c) for c in zip(*[run["xtrain_cpu"] for run in mine])][warmup:]
            tc += [sum(c) for c in zip(*[run["torch_cpu"] for run in mine])][warmup:]
            xs += x
            ts += t
            pairs += [b / a for a, b in zip(x, t)]
            per_run.append((statistics.median(x), statistics.median(t)))
            xl = mine[0]["xtrain_losses"]
            tl = next(run["torch_losses"] for run in mine if run["torch_losses"] is not None)
            if len(xl) != len(tl):
                raise RuntimeError(f"{name}: {len(xl)} xtrain losses, {len(tl)} torch losses")
            diff = max([diff] + [abs(a - b) for a, b in zip(xl, tl)])
        x_tok, t_tok = tokens / statistics.median(xs), tokens / statistics.median(ts)
        res[name] = {
            "xtrain_tok_s": x_tok, "torch_tok_s": t_tok, "ratio": x_tok / t_tok,
            "paired": statistics.median(pairs), "max_loss_diff": diff, "steps": len(xs),
            "xtrain_cpu_s": statistics.median(xc), "torch_cpu_s": statistics.median(tc),
            "xtrain_step_s": xs, "torch_step_s": ts, "per_run_medians": per_run,
            "xtrain_losses": mine[0]["xtrain_losses"], "torch_losses": tl,
        }
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4], help="pipeline ranks (one job each; default 2 4)")
    ap.add_argument("--model", default="small", help="model preset (default small)")
    ap.add_argument("--layers", type=int, default=8, help="model.n_layers (default 8: a multiple of p*v for p = 2, 4 and v = 2)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="global batch size in sequences (default 16)")
    ap.add_argument("--micro", type=int, default=8, help="micro-batches per step (default 8)")
    ap.add_argument("--chunks", type=int, default=2, help="stages per rank of interleaved_1f1b (default 2)")
    ap.add_argument("--schedules", default=",".join(SCHEDULES), help="comma list of " + ", ".join(SCHEDULES))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every run (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds, alternating the order of the schedules (default 2)")
    ap.add_argument("--comm", default="xtrain", choices=("xtrain", "torch"))
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    schedules = [s for s in args.schedules.split(",") if s]
    if any(s not in SCHEDULES for s in schedules):
        ap.error(f"--schedules: choose from {list(SCHEDULES)}")

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="xtrain-bench-pp-"))
    root.mkdir(parents=True, exist_ok=True)
    total = args.warmup + args.steps
    base = [
        f"model={args.model}", f"model.n_layers={args.layers}", "strategy=pp", "data=stdlib", f"comm={args.comm}",
        "precision=fp32", "device=cpu", f"train.seq_len={args.seq_len}", f"train.global_batch_size={args.batch}",
        f"train.micro_batches={args.micro}", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false",
        "train.log_every=1000000", f"train.steps={total}",
    ]
    cfg0 = compose(base)
    mcfg = ModelConfig.from_dict(dict(cfg0.model.items()))
    plain = build_model(mcfg, cfg0.seed)
    tokens = args.batch * args.seq_len
    print(f"model={args.model} (dim {mcfg.dim}, {mcfg.n_layers} layers, ffn {mcfg.ffn_hidden}, "
          f"{'tied' if mcfg.tie_embeddings else 'untied'}; {plain.num_params():,} params) seq_len={args.seq_len} "
          f"global batch={args.batch} micro-batches={args.micro} ({args.batch // args.micro} sequences each) fp32 comm={args.comm} | "
          f"{args.repeats} rounds x {total} steps ({args.warmup} warmup dropped) | torch {torch.__version__}, "
          f"{os.cpu_count()} cores, {platform.machine()}, load avg {os.getloadavg()[0]:.2f} | runs in {root}", flush=True)

    rows, results, notes = [], {}, []
    for p in args.nproc:
        runnable = []
        for name in schedules:
            v = chunks_of(name, args.chunks)
            stage_rank = schedule_layout(name, p, v).stage_rank
            n_stages = len(stage_rank)
            if n_stages > args.layers:
                notes.append(f"{name} at p={p}: needs {n_stages} stages of at least one layer, the model has {args.layers}; skipped on both sides")
                continue
            try:
                build_schedule(name, p, args.micro, v)
            except ValueError as e:
                notes.append(f"{name} at p={p}, m={args.micro}: {e}; skipped on both sides")
                continue
            runnable.append(name)
            layers = stage_layers(plain, n_stages)
            print(f"p={p} {name}: {n_stages} stages, blocks per stage {[len(x) for x in layers]}, stage -> rank {stage_rank}", flush=True)
        if not runnable:
            continue
        t0 = time.perf_counter()
        load0 = os.getloadavg()[0]
        per_rank = run_on_ranks(speed_worker, p, base, runnable, args.chunks, args.repeats, str(root),
                                timeout=3600, pg_timeout=600)
        print(f"{p}-rank job: {time.perf_counter() - t0:.0f} s, load avg {load0:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
        res = summarise(per_rank, runnable, args.warmup, tokens)
        results[p] = res
        for name in runnable:
            r = res[name]
            rows.append(f"| {name} | {TORCH_SCHEDULE[name]} | {p} | {r['xtrain_tok_s']:,.0f} | {r['torch_tok_s']:,.0f} | "
                        f"{r['ratio']:.3f} | {r['paired']:.3f} | {r['xtrain_cpu_s']:.2f} / {r['torch_cpu_s']:.2f} ({r['xtrain_cpu_s'] / r['torch_cpu_s']:.3f}) | "
                        f"{r['max_loss_diff']:.1e} | {r['steps']} |")

    print("\n| schedule | torch | ranks | xtrain tok/s | torch tok/s | xtrain/torch (medians) | paired median | CPU s per step, all ranks, x / t | max abs loss diff | steps |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    print("\n".join(rows))
    for note in notes:
        print(f"note: {note}")
    for p, res in results.items():
        for name, r in res.items():
            verdict = "meets" if r["ratio"] >= TARGET else "MISSES"
            print(f"p={p} {name}: xtrain/torch {r['ratio']:.3f} (target >= {TARGET}) -> {verdict}; per-run median step s x/t: "
                  + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in r["per_run_medians"]))
            print(f"  losses xtrain: {' '.join('%.6f' % v for v in r['xtrain_losses'])}")
            print(f"  losses torch:  {' '.join('%.6f' % v for v in r['torch_losses'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
