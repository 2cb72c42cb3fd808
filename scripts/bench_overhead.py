"""What does xtrain add to a training step? xtrain's ``single`` strategy against a
bare PyTorch loop doing the same work, measured interleaved in one process.

    python scripts/bench_overhead.py                       # model=small, seq 256, batch 8
    python scripts/bench_overhead.py --model tiny --steps 40 --repeats 5

Both sides build the same model (``xtrain.model.build_model``, same seed), read
the same batches (``xtrain.data.local_batch``: same shapes, same tokens), and use
AdamW with the same two parameter groups (decay on matrices only), the same
warmup + cosine learning rate and the same global-norm clipping. So both follow
the same loss trajectory (the script checks this) and the time difference is
what the framework adds around the step.

The xtrain side is the real training path: ``xtrain.train.run(cfg)`` with
``strategy=single comm=torch``, its metrics.jsonl, comm ledger, console
lines, and a per-rank log file set up as the command line's Hydra logging
config does.

Interleaving is per step: the trainer's per-step callback (``on_step``) runs
bare step i right after xtrain logs step i, so each pair runs back to back
(the machine's load drifts; blocks of steps seconds apart were not
comparable). An xtrain step is timed from the end of the previous bare step
to the callback, which the trainer makes as soon as its log call returns:
the whole loop body (schedule, batch, forward/backward, clipping, optimizer,
the loss/memory reduction, the ledger, the record and its logging), once.
``--repeats`` separate runs, each with a fresh model on both sides; the
first ``--warmup`` steps of each are dropped. Reported: the medians per side
and the median of the per-step ratios. Target: xtrain adds at most 5% per
step.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import logging
import math
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from xtrain.config import compose
from xtrain.data import load_data, local_batch
from xtrain.model import ModelConfig, build_model
from xtrain.train import run

TARGET = 0.05  # the most xtrain may add per step, as a fraction of the bare step


# -- the bare loop ----------------------------------------------------------------


class BareLoop:
    """The same steps written as a plain PyTorch loop, one ``step`` at a time."""

    def __init__(self, cfg, data):
        self.cfg, self.t, self.data = cfg, cfg.train, data
        t = self.t
        torch.manual_seed(cfg.seed)
        self.model = build_model(ModelConfig.from_dict(dict(cfg.model.items())), cfg.seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in self.params if p.dim() >= 2], "weight_decay": t.weight_decay},
                {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=t.lr,
            betas=tuple(t.betas),
            eps=t.eps,
        )
        self.losses: list[float] = []

    def lr(self, step: int) -> float:
        t = self.t
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        progress = min((step - t.warmup_steps) / max(t.steps - t.warmup_steps - 1, 1), 1.0)
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def step(self, step: int) -> None:
        t, opt = self.t, self.optimizer
        lr = self.lr(step)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = local_batch(self.data.train, seed=self.cfg.seed, step=step, global_batch_size=t.global_batch_size, seq_len=t.seq_len)
        loss = F.cross_entropy(self.model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.losses.append(loss.item())


# -- interleaving -------------------------------------------------------------------
#
# xtrain.train.run owns its loop, so the bare step runs inside it: right after
# xtrain logs step i, its on_step callback runs bare step i and times it.
# xtrain's step i+1 is then timed from the end of that bare step to the next
# callback (made right after its log call returns), so every line of xtrain's
# loop is counted once and the bare step never. Each pair is adjacent in time,
# which keeps the comparison fair on a machine whose load drifts.


class Interleaver:
    def __init__(self, bare: BareLoop, profile: cProfile.Profile | None = None):
        self.bare, self.profile = bare, profile
        self.xtrain_s: list[float] = []
        self.bare_s: list[float] = []
        self.mark: float | None = None  # end of the previous bare step

    def on_step(self, record: dict) -> None:
        """``xtrain.train.run``'s per-step callback: time xtrain's step, run the bare one."""
        now = time.perf_counter()
        if self.mark is not None:
            self.xtrain_s.append(now - self.mark)
        if self.profile is not None:
            self.profile.disable()  # profile xtrain's loop only
        t0 = time.perf_counter()
        self.bare.step(record["step"] - 1)
        self.mark = time.perf_counter()
        self.bare_s.append(self.mark - t0)
        if self.profile is not None:
            self.profile.enable()


@contextlib.contextmanager
def cli_logging(run_dir: Path):
    """What configs/hydra/job_logging/xtrain.yaml gives the command line: root at
    INFO into <run dir>/rank0.log (``run`` called directly has no handler)."""
    handler = logging.FileHandler(run_dir / "rank0.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def paired_block(cfg, data, run_dir: Path, warmup: int, profile: cProfile.Profile | None = None):
    """One xtrain.train.run with a bare step after each of its steps. Returns
    (xtrain step times, bare step times, xtrain losses, bare losses, logged
    step_time_s), each without the first ``warmup`` steps."""
    run_dir.mkdir(parents=True)
    inter = Interleaver(BareLoop(cfg, data), profile)
    with open(run_dir / "console.txt", "w") as console, contextlib.redirect_stdout(console), cli_logging(run_dir):
        if profile is not None:
            profile.enable()
        result = run(cfg, run_dir, on_step=inter.on_step)
        if profile is not None:
            profile.disable()
    logged = [json.loads(line)["step_time_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # xtrain_s[k] is step k+2 (step 1 has no start mark); bare_s[k] is step k+1.
    return (
        inter.xtrain_s[warmup - 1 :],
        inter.bare_s[warmup:],
        result.losses,
        inter.bare.losses,
        logged[warmup:],
    )


# -- report -------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def profile_report(profile: cProfile.Profile, top: int = 25) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(r"xtrain/(train|metrics|comm|parallel|optim|data)", top)
    return out.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="model config group (default small)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each run (default 2)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="global batch size (sequences)")
    ap.add_argument("--repeats", type=int, default=3, help="separate runs (fresh models), each interleaving xtrain and bare steps")
    ap.add_argument("--data", default="stdlib", help="data config group (default stdlib: no download)")
    ap.add_argument("--out", default=None, help="folder for the xtrain runs (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", action="store_true", help="cProfile one extra xtrain block and print xtrain's share")
    args = ap.parse_args(argv)
    if args.steps < 2 or args.warmup < 1 or args.repeats < 1:
        ap.error("need --steps >= 2, --warmup >= 1, --repeats >= 1")

    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.__stdout__, width=120)
    total = args.warmup + args.steps
    overrides = [
        f"model={args.model}",
        f"data={args.data}",
        "strategy=single",
        "comm=torch",
        "precision=fp32",
        "device=cpu",
        f"train.steps={total}",
        f"train.seq_len={args.seq_len}",
        f"train.global_batch_size={args.batch}",
        "train.micro_batches=1",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "train.progress=false",
    ]
    cfg = compose(overrides)
    data = load_data(cfg.data)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="xtrain-bench-"))
    root.mkdir(parents=True, exist_ok=True)

    console.print(
        f"model={args.model} seq_len={args.seq_len} batch={args.batch} | {args.repeats} runs x {total} steps per side "
        f"({args.warmup} warmup dropped) | torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()} | runs in {root}"
    )
    times = {"xtrain": [], "bare": []}
    block_medians = {"xtrain": [], "bare": []}
    logged_step_time, parity, ratios = [], [], []
    for r in range(args.repeats):
        xs, bs, x_losses, b_losses, logged = paired_block(cfg, data, root / f"xtrain-{r}", args.warmup)
        times["xtrain"] += xs
        times["bare"] += bs
        ratios += [a / b for a, b in zip(xs, bs)]
        logged_step_time += logged
        for side, v in (("xtrain", xs), ("bare", bs)):
            block_medians[side].append(statistics.median(v))
        parity.append(max(abs(a - b) for a, b in zip(x_losses, b_losses)))
        console.print(
            f"run {r + 1}/{args.repeats}: xtrain {ms(block_medians['xtrain'][-1])} ms, "
            f"bare {ms(block_medians['bare'][-1])} ms (median per step); max |loss diff| {parity[-1]:.2e}"
        )

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["xtrain"] / med["bare"]
    paired = statistics.median(ratios)
    table = Table(title=f"ms per optimizer step: model={args.model}, seq_len={args.seq_len}, batch={args.batch}")
    for col in ("loop", "median", "min", "max", "per-run medians", "steps"):
        table.add_column(col, justify="left" if col in ("loop", "per-run medians") else "right")
    for side, label in (("bare", "bare PyTorch"), ("xtrain", "xtrain single (train.run)")):
        v = times[side]
        table.add_row(label, ms(med[side]), ms(min(v)), ms(max(v)), " ".join(ms(b) for b in block_medians[side]), str(len(v)))
    table.add_row("xtrain step_time_s (as logged)", ms(statistics.median(logged_step_time)), "", "", "", str(len(logged_step_time)))
    console.print(table)
    verdict = "[green]meets[/]" if paired - 1 <= TARGET else "[red]misses[/]"
    console.print(
        f"ratio xtrain/bare: of medians {ratio:.3f}, median of per-step pairs {paired:.3f} "
        f"(overhead {100 * (paired - 1):+.1f}%, {ms(med['xtrain'] - med['bare'])} ms/step); "
        f"target: at most +{100 * TARGET:.0f}% -> {verdict}. "
        f"Loss parity: max |xtrain - bare| {max(parity):.2e}"
    )

    if args.profile:
        prof = cProfile.Profile()
        paired_block(cfg, data, root / "xtrain-profile", args.warmup, profile=prof)
        console.print("[bold]cProfile of one xtrain block (cumulative; xtrain functions only):[/]")
        console.print(profile_report(prof), markup=False, highlight=False)

    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "median_ms": {k: v * 1e3 for k, v in med.items()},
                    "block_median_ms": {k: [x * 1e3 for x in v] for k, v in block_medians.items()},
                    "logged_step_time_ms": statistics.median(logged_step_time) * 1e3,
                    "ratio_of_medians": ratio,
                    "median_paired_ratio": paired,
                    "max_loss_diff": max(parity),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
