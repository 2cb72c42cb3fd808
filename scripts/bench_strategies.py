#!/usr/bin/env python
"""xtrain's data-parallel strategies against torch's own: ``ddp`` vs
``DistributedDataParallel`` and ``zero3`` vs FSDP2 (``fully_shard``).

    python scripts/bench_strategies.py                     # model=small, 4 ranks
    python scripts/bench_strategies.py --model tiny --steps 6 --repeats 1

Both sides of a pair build the same model (``xtrain.model.build_model``, same
seed), read the same batches (``xtrain.data.local_batch``: each rank its slice
of the same global batch), and use AdamW with the same two parameter groups,
the same warmup + cosine learning rate and global-norm clipping. The torch
side is a minimal loop: forward, loss, backward, clip_grad_norm_, step,
zero_grad. DDP gets ``bucket_cap_mb`` = xtrain's ``strategy.bucket_mb``; FSDP2
is ``fully_shard`` on every transformer block and then on the root, defaults
otherwise (reshard after forward, fp32).

Speed (one 4-rank job). The xtrain side is the real trainer,
``xtrain.train.run``; its per-step callback (``on_step``) runs the torch
loop's step i right after xtrain's step i, on every rank, so each pair of
steps is adjacent in time and load from other processes hits both alike. xtrain's
time is the trainer's own ``step_time_s`` (it includes the trainer's per-step
metrics all-gather); torch's is timed on rank 0 around its step, which ends
with an all-reduce of the loss for logging, so on both sides a step ends
with the ranks together and each time is the slowest rank's. ``--repeats``
rounds, alternating which pair goes first; the first ``--warmup`` steps of
every run are dropped; medians. Also reported: CPU seconds per step summed
over the ranks (``time.process_time``, all threads of each rank), which
other processes' load barely moves.

Memory (one fresh job per variant, so each process's peak is its own). Peak
RSS per rank (max over ranks), and the same above the process's RSS before
the model and data exist (torch, gloo and Python themselves are about 230 MB
a rank). The fairer figure is model state from live tensors on rank 0 after
the optimizer step, gradients still alive: xtrain's ``model_state_bytes``;
for torch the local tensors (``DTensor.to_local()`` for FSDP2) of parameters,
gradients and AdamW state. torch DDP's reducer also keeps its own flat bucket
copy of the gradients (4Ψ, ``gradient_as_bucket_view=False``), which the
model-state figure does not see.

Communication per step and rank: xtrain's from its ledger (bytes sent);
torch does not report its traffic, so its figure is computed with the ring
formulas (``xtrain.formulas.zero_comm_bytes``, ``fsdp2_comm_bytes``): DDP
all-reduce 2·(n-1)/n·4Ψ; FSDP2 all-gather in forward and again in backward
(except the root's parameters, which FSDP2 keeps unsharded from forward to
backward) and reduce-scatter, each (n-1)/n·4·(padded Ψ).

The per-stage memory plot (ddp, zero1, zero2, zero3 against the ZeRO
formulas) is ``scripts/plot_zero_memory.py``; both are described, with
measured results, in docs/data-parallel.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from xtrain.config import compose  # noqa: E402
from xtrain.data import load_data, local_batch  # noqa: E402
from xtrain.formulas import fsdp2_comm_bytes, zero_comm_bytes  # noqa: E402
from xtrain.model import ModelConfig, build_model  # noqa: E402
from xtrain.optim import build_optimizer, lr_at, set_lr  # noqa: E402
from xtrain.parallel.base import storage_bytes  # noqa: E402
from xtrain.spawn import run_on_ranks  # noqa: E402
from xtrain.train import run  # noqa: E402

PAIRS = {"ddp": "torch DDP", "zero3": "torch FSDP2"}
TARGET_SPEED = {"ddp": 0.95, "zero3": 0.90}  # xtrain tokens/s at least this fraction of torch's


# -- torch's side -------------------------------------------------------------------------

_device_mesh = None


def device_mesh(world: int):
    global _device_mesh
    if _device_mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        _device_mesh = init_device_mesh("cpu", (world,))
    return _device_mesh


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class TorchLoop:
    """The same training written as a minimal loop over torch's DDP or FSDP2."""

    def __init__(self, kind: str, cfg, data, rank: int, world: int):
        self.cfg, self.t, self.data, self.rank, self.world = cfg, cfg.train, data, rank, world
        torch.manual_seed(cfg.seed)
        model = build_model(ModelConfig.from_dict(dict(cfg.model.items())), cfg.seed)
        if kind == "ddp":
            model = DistributedDataParallel(model, bucket_cap_mb=float(cfg.strategy.bucket_mb))
        else:
            from torch.distributed.fsdp import fully_shard

            mesh = device_mesh(world)
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        self.model = model
        self.optimizer = build_optimizer(model, self.t)  # decay on matrices only, as xtrain
        self.losses: list[float] = []  # global mean over ranks
        self.times: list[float] = []
        self.cpu: list[float] = []  # this process's CPU seconds per step (all its threads)
        self.state_bytes: dict | None = None

    def step(self, step: int, measure_state: bool = False) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        t = self.t
        set_lr(self.optimizer, lr_at(step, lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps, min_lr_ratio=t.min_lr_ratio))
        x, y = local_batch(
            self.data.train, seed=self.cfg.seed, step=step, global_batch_size=t.global_batch_size,
            seq_len=t.seq_len, dp_rank=self.rank, dp=self.world,
        )
        loss = F.cross_entropy(self.model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        if measure_state:  # after the step, gradients alive: where xtrain measures
            self.state_bytes = self.model_state_bytes()
        self.optimizer.zero_grad(set_to_none=True)
        # The global mean loss for logging, as xtrain's trainer reduces its own:
        # one small collective that also ends the step on every rank together,
        # so neither side's time absorbs the other's stragglers.
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        self.losses.append(mean.item() / self.world)
        self.times.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)

    def model_state_bytes(self) -> dict:
        ps = list(self.model.parameters())
        return {
            "params": storage_bytes(local(p) for p in ps),
            "grads": storage_bytes(local(p.grad) for p in ps if p.grad is not None),
            "optim": storage_bytes(
                local(v) for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0
            ),
        }


def torch_comm_bytes(kind: str, cfg, world: int) -> dict:
    """Bytes sent per rank and step by the ring algorithms (torch reports none)."""
    model = build_model(ModelConfig.from_dict(dict(cfg.model.items())), cfg.seed)
    if kind == "ddp":
        psi = sum(p.numel() for p in model.parameters())
        return {"all_reduce": int(zero_comm_bytes("ddp", psi, world))}
    block_ids = {id(p) for b in model.blocks for p in b.parameters()}
    shapes = [tuple(p.shape) for p in model.parameters()]
    root_shapes = [tuple(p.shape) for p in model.parameters() if id(p) not in block_ids]
    return fsdp2_comm_bytes(shapes, root_shapes, world)


# -- the speed job ----------------------------------------------------------------------------

class PairedTorchSteps:
    """``on_step`` for ``xtrain.train.run``: right after xtrain's step i, the
    torch loop's step i, on every rank; also xtrain's CPU seconds per step on
    this rank, from the end of one torch step to the start of the next."""

    def __init__(self, loop: TorchLoop):
        self.loop = loop
        self.xtrain_cpu: list[float] = []
        self.mark: float | None = None  # end of the previous torch step (step 1: none)

    def __call__(self, record: dict) -> None:
        now = time.process_time()
        if self.mark is not None:
            self.xtrain_cpu.append(now - self.mark)
        self.loop.step(record["step"] - 1)
        self.mark = time.process_time()


def speed_worker(rank: int, world: int, base: list[str], repeats: int, root: str):
    torch.set_num_threads(1)
    out = []
    for r in range(repeats):
        order = list(PAIRS) if r % 2 == 0 else list(PAIRS)[::-1]
        for strategy in order:
            cfg = compose([*base, f"strategy={strategy}"])
            data = load_data(cfg.data)
            paired = PairedTorchSteps(TorchLoop(strategy, cfg, data, rank, world))
            run_dir = Path(root) / f"speed-{strategy}-{r}"
            with contextlib.redirect_stdout(io.StringIO()):
                result = run(cfg, run_dir, on_step=paired)
            loop = paired.loop
            rec = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
            out.append({
                "strategy": strategy, "repeat": r,
                "xtrain_step_s": [x["step_time_s"] for x in rec],
                "xtrain_comm": [x["comm"] for x in rec],
                "torch_step_s": loop.times,
                "xtrain_cpu_s": paired.xtrain_cpu, "torch_cpu_s": loop.cpu,
                "xtrain_losses": result.losses, "torch_losses": loop.losses,
            })
            del loop, paired
    return out


# -- the memory jobs -----------------------------------------------------------------------------


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(rank: int, world: int, base: list[str], strategy: str, side: str, root: str):
    torch.set_num_threads(1)
    cfg = compose([*base, f"strategy={strategy}"])
    baseline = rss_now()
    state = None
    if side == "xtrain":
        run_dir = Path(root) / f"mem-{strategy}"
        with contextlib.redirect_stdout(io.StringIO()):
            run(cfg, run_dir)
        if rank == 0:
            state = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["model_state_bytes"]
    else:
        data = load_data(cfg.data)
        loop = TorchLoop(strategy, cfg, data, rank, world)
        for step in range(cfg.train.steps):
            loop.step(step, measure_state=step == cfg.train.steps - 1)
        state = loop.state_bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak": peak, "baseline": baseline, "state": state}


# -- report ---------------------------------------------------------------------------------------


def mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="model config group (default small)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every run (default 2)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="global batch size in sequences (default 16)")
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--comm", default="xtrain", choices=("xtrain", "torch"), help="xtrain's collectives (default xtrain)")
    ap.add_argument("--repeats", type=int, default=2, help="speed rounds, alternating which pair goes first (default 2)")
    ap.add_argument("--memory-steps", type=int, default=3, help="steps of each memory job (default 3)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        ap.error("need --steps >= 1, --warmup >= 0, --repeats >= 1")

    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="xtrain-bench-strategies-"))
    root.mkdir(parents=True, exist_ok=True)
    n = args.nproc
    base = [
        f"model={args.model}", f"data={args.data}", f"comm={args.comm}", "precision=fp32", "device=cpu",
        f"train.seq_len={args.seq_len}", f"train.global_batch_size={args.batch}", "train.micro_batches=1",
        "train.eval_every=0", "train.ckpt_every=0", "train.progress=false",
    ]
    total = args.warmup + args.steps
    cfg0 = compose([*base, f"train.steps={total}"])
    n_params = build_model(ModelConfig.from_dict(dict(cfg0.model.items())), cfg0.seed).num_params()
    tokens = args.batch * args.seq_len
    console.print(
        f"model={args.model} ({n_params:,} params) seq_len={args.seq_len} global batch={args.batch} on {n} gloo ranks, "
        f"comm={args.comm} | {args.repeats} rounds x {total} steps per side ({args.warmup} warmup dropped) | "
        f"torch {torch.__version__}, {os.cpu_count()} cores, {platform.processor() or platform.machine()} | runs in {root}"
    )

    t0 = time.perf_counter()
    speed = run_on_ranks(speed_worker, n, [*base, f"train.steps={total}"], args.repeats, str(root), timeout=3600, pg_timeout=600)
    console.print(f"speed job: {time.perf_counter() - t0:.0f} s")
    runs = speed[0]
    res = {}
    for strategy in PAIRS:
        mine = [i for i, r in enumerate(runs) if r["strategy"] == strategy]
        xs = [s for i in mine for s in runs[i]["xtrain_step_s"][args.warmup :]]
        ts = [s for i in mine for s in runs[i]["torch_step_s"][args.warmup :]]
        pairs = [a / b for i in mine for a, b in zip(runs[i]["xtrain_step_s"][args.warmup :], runs[i]["torch_step_s"][args.warmup :])]
        diff = max(max(abs(a - b) for a, b in zip(runs[i]["xtrain_losses"], runs[i]["torch_losses"])) for i in mine)
        comm = runs[mine[0]]["xtrain_comm"][-1]
        w = max(args.warmup, 1)
        x_cpu = [sum(v) for i in mine for v in zip(*(speed[rk][i]["xtrain_cpu_s"][w - 1 :] for rk in range(n)))]
        t_cpu = [sum(v) for i in mine for v in zip(*(speed[rk][i]["torch_cpu_s"][w:] for rk in range(n)))]
        res[strategy] = {
            "xtrain_tok_s": tokens / statistics.median(xs), "torch_tok_s": tokens / statistics.median(ts),
            "paired_speed_ratio": 1 / statistics.median(pairs),
            "xtrain_comm_bytes": sum(v["bytes_sent"] for v in comm.values()), "xtrain_comm": comm,
            "torch_comm_bytes": sum(torch_comm_bytes(strategy, cfg0, n).values()), "torch_comm": torch_comm_bytes(strategy, cfg0, n),
            "max_loss_diff": diff, "xtrain_step_s": xs, "torch_step_s": ts,
            "xtrain_cpu_s": statistics.median(x_cpu), "torch_cpu_s": statistics.median(t_cpu),
            "per_run_medians": [(statistics.median(runs[i]["xtrain_step_s"][args.warmup :]), statistics.median(runs[i]["torch_step_s"][args.warmup :])) for i in mine],
        }

    if not args.skip_memory:
        mem_base = [*base, f"train.steps={args.memory_steps}"]
        for strategy in PAIRS:
            for side in ("xtrain", "torch"):
                t0 = time.perf_counter()
                got = run_on_ranks(memory_worker, n, mem_base, strategy, side, str(root), timeout=1200, pg_timeout=600)
                res[strategy][f"{side}_peak_rss"] = max(g["peak"] for g in got)
                res[strategy][f"{side}_rss_above_baseline"] = max(g["peak"] - g["baseline"] for g in got)
                res[strategy][f"{side}_state"] = got[0]["state"]
                console.print(f"memory job {strategy}/{side}: {time.perf_counter() - t0:.0f} s")

    table = Table(title=f"xtrain vs torch, model={args.model} ({n_params:,} params), {n} ranks, batch {args.batch}x{args.seq_len}, comm={args.comm}")
    for col in ("xtrain", "torch", "tokens/s x / t", "ratio (paired)", "CPU s/step x / t", "peak RSS/rank MB x / t", "RSS above start MB x / t",
                "model state MB x / t (p+g+o)", "comm MB/step x / t*", "max |loss diff|"):
        table.add_column(col, justify="left" if col in ("xtrain", "torch") else "right")
    for strategy, peer in PAIRS.items():
        r = res[strategy]
        row = [strategy, peer, f"{r['xtrain_tok_s']:,.0f} / {r['torch_tok_s']:,.0f}",
               f"{ratio(r['xtrain_tok_s'], r['torch_tok_s'])} ({r['paired_speed_ratio']:.3f})",
               f"{r['xtrain_cpu_s']:.2f} / {r['torch_cpu_s']:.2f} ({ratio(r['xtrain_cpu_s'], r['torch_cpu_s'])})"]
        if "xtrain_peak_rss" in r:
            xs_, ts_ = r["xtrain_state"], r["torch_state"]
            xsum = xs_["params"] + xs_["grads"] + xs_["optim"]
            tsum = ts_["params"] + ts_["grads"] + ts_["optim"]
            row += [f"{mb(r['xtrain_peak_rss'])} / {mb(r['torch_peak_rss'])} ({ratio(r['xtrain_peak_rss'], r['torch_peak_rss'])})",
                    f"{mb(r['xtrain_rss_above_baseline'])} / {mb(r['torch_rss_above_baseline'])} ({ratio(r['xtrain_rss_above_baseline'], r['torch_rss_above_baseline'])})",
                    f"{mb(xsum)} / {mb(tsum)} ({ratio(xsum, tsum)})"]
        else:
            row += ["-", "-", "-"]
        row += [f"{mb(r['xtrain_comm_bytes'])} / {mb(r['torch_comm_bytes'])} ({ratio(r['xtrain_comm_bytes'], r['torch_comm_bytes'])})",
                f"{r['max_loss_diff']:.2e}"]
        table.add_row(*row)
    console.print(table)
    console.print("* torch's comm bytes are computed from the ring formulas (torch does not report its traffic); xtrain's are its ledger (bytes sent, rank 0, last step).")
    for strategy, peer in PAIRS.items():
        r = res[strategy]
        sp = r["xtrain_tok_s"] / r["torch_tok_s"]
        line = f"{strategy} vs {peer}: speed {sp:.3f} (target >= {TARGET_SPEED[strategy]}) -> " + ("[green]meets[/]" if sp >= TARGET_SPEED[strategy] else "[red]misses[/]")
        if strategy == "zero3" and "xtrain_peak_rss" in r:
            line += f"; peak RSS {ratio(r['xtrain_peak_rss'], r['torch_peak_rss'])} (target <= 1) -> " + ("[green]meets[/]" if r["xtrain_peak_rss"] <= r["torch_peak_rss"] else "[red]misses[/]")
        if "xtrain_state" in r:
            line += f"; model state x {json.dumps({k: round(v / 2**20, 2) for k, v in r['xtrain_state'].items()})} MB, t {json.dumps({k: round(v / 2**20, 2) for k, v in r['torch_state'].items()})} MB"
        line += "; per-run medians (s) x/t: " + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in r["per_run_medians"])
        console.print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "n_params": n_params, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(rc)
