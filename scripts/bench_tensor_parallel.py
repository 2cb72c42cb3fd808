#!/usr/bin/env python
"""xtrain's tensor parallelism against torch's ``torch.distributed.tensor.parallel``
on 4 gloo ranks: tp=4, and dp2 x tp2.

    python scripts/bench_tensor_parallel.py                         # model=small (8 heads, 4 kv heads)
    python scripts/bench_tensor_parallel.py --sp                    # sequence parallel on both sides
    python scripts/bench_tensor_parallel.py --model tiny --steps 3 --warmup 1 --repeats 1

Both sides build the same model (``xtrain.model.build_model``, same seed, the
same shape overrides), read the same batches (``xtrain.data.local_batch``:
each dp rank its slice of the same global batch), and use AdamW with the same
two parameter groups (``xtrain.optim.build_optimizer``), the same warmup +
cosine learning rate and global-norm clipping at ``train.grad_clip``.

xtrain: the real trainer, ``xtrain.train.run``, with ``strategy=tp
strategy.tp=4`` and ``strategy=ddp strategy.tp=2`` (dp2 x tp2: bucketed
gradient all-reduce over dp, overlapped with backward), ``strategy.sp`` from
``--sp``, ``comm`` from ``--comm`` (default xtrain, the hand-written
collectives).

torch: a minimal loop over ``parallelize_module`` on a device mesh
(``init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))``, TP on
the inner dim), written the way torchtitan's Llama plan is:

- embedding ``RowwiseParallel`` (vocab-parallel; output Replicate, or
  Shard(1) under sp), head ``ColwiseParallel`` with Shard(-1) logits and the
  loss under ``loss_parallel()`` (vocab-parallel cross entropy, no full
  logits), as xtrain;
- wq/wk/wv and gate/up ``ColwiseParallel``, wo and down ``RowwiseParallel``
  (output Shard(1) under sp);
- attention and MLP inputs through ``PrepareModuleInput`` to a Replicate
  DTensor, so the column layers that share an input share one backward
  all-reduce (without it, torch all-reduces the input gradient of wq, wk and
  wv separately); under sp it is the all-gather from Shard(1);
- under sp, every RMSNorm is ``SequenceParallel``.

The model needs no change for either side (the attention reads its head
count from the local weights). Embeddings are untied on both sides
(``model.tie_embeddings=false``): torch's plan shards embedding and head as
separate parameters. dp2 x tp2 on torch: after backward, all gradients' local
shards are flattened into one buffer and all-reduced (AVG) over the dp
mesh dim's group, then unflattened (a manual all-reduce, no overlap with
backward; xtrain's ddp overlaps its bucket, which is worth little here: the
dp all-reduce is ~50 ms of a ~2 s step). Clipping: ``clip_grad_norm_`` over
the DTensor gradients (it computes the norm over the shards itself) and, for
parameters that stay plain tensors (the norms without sp), their local
gradients, which are identical on every tp rank.

Speed (one 4-rank job): the trainer's per-step callback (``on_step``) runs
the torch loop's step i right after xtrain's step i, on every rank, so each
pair of steps is adjacent in time and load from other processes hits both
alike. xtrain's time is the trainer's own ``step_time_s`` (it includes the
trainer's per-step metrics all-gather, which the torch loop does not do);
torch's is timed on rank 0 around its step. ``--repeats`` rounds, alternating
which layout goes first; the first ``--warmup`` steps of every run are
dropped; medians, and the median of the per-step ratios. The losses of the
two sides are compared step by step (they must agree to ~1e-5).

torch's collectives for one step are counted with
``torch.distributed.tensor.debug.CommDebugMode`` (``--count-torch-comm``).
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
import torch.nn.functional as F  # noqa: E402

from xtrain.config import compose  # noqa: E402
from xtrain.data import load_data, local_batch  # noqa: E402
from xtrain.model import ModelConfig, build_model  # noqa: E402
from xtrain.optim import build_optimizer, lr_at, set_lr  # noqa: E402
from xtrain.spawn import run_on_ranks  # noqa: E402
from xtrain.train import run  # noqa: E402

TARGET = 0.95  # xtrain tokens/s at least this fraction of torch's
# name -> (xtrain strategy overrides, torch mesh (dp, tp))
LAYOUTS = {
    "tp4": (["strategy=tp", "strategy.tp=4"], (1, 4)),
    "dp2xtp2": (["strategy=ddp", "strategy.tp=2"], (2, 2)),
}
# Shapes per preset so that heads, kv heads and the ffn split over tp=4 on both sides.
MODEL_OVERRIDES = {
    "tiny": ["model.n_kv_heads=4", "model.tie_embeddings=false"],
    "small": ["model.n_heads=8", "model.n_kv_heads=4", "model.tie_embeddings=false"],
}


# -- torch's side ------------------------------------------------------------------------


def torch_tp_plan(model, tp_mesh, sp: bool) -> None:
    """torch's TP (and SP) on the plain xtrain Transformer, torchtitan-style."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    seq = Shard(1) if sp else Replicate()
    top = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    }
    if sp:
        top["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, top)
    for block in model.blocks:
        plan = {
            "attn": PrepareModuleInput(input_layouts=(seq, None, None), desired_input_layouts=(Replicate(), None, None)),
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=seq),
            "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "mlp.gate": ColwiseParallel(),
            "mlp.up": ColwiseParallel(),
            "mlp.down": RowwiseParallel(output_layouts=seq),
        }
        if sp:
            plan["attn_norm"] = SequenceParallel()
            plan["mlp_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class TorchTPLoop:
    """The same training as a minimal loop over torch's tensor parallel API."""

    def __init__(self, cfg, data, mesh_shape, sp: bool):
        from torch.distributed.device_mesh import init_device_mesh

        self.cfg, self.t, self.data, self.sp = cfg, cfg.train, data, sp
        dp, tp = mesh_shape
        self.mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        self.dp, self.dp_rank = dp, self.mesh["dp"].get_local_rank()
        self.dp_group = self.mesh["dp"].get_group() if dp > 1 else None
        torch.manual_seed(cfg.seed)
        model = build_model(ModelConfig.from_dict(dict(cfg.model.items())), cfg.seed)
        torch_tp_plan(model, self.mesh["tp"], sp)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, self.t)
        self.losses: list[float] = []
        self.times: list[float] = []

    def _allreduce_dp(self) -> None:
        grads = [_local(p.grad) for p in self.params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=self.dp_group)
        torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def _clip(self) -> None:
        from torch.distributed.tensor import DTensor

        dt = [p for p in self.params if isinstance(p, DTensor)]
        plain = [p for p in self.params if not isinstance(p, DTensor)]
        norm = torch.nn.utils.get_total_norm([p.grad for p in dt])
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if plain:
            norm = torch.sqrt(norm**2 + torch.nn.utils.get_total_norm([p.grad for p in plain]) ** 2)
        torch.nn.utils.clip_grads_with_norm_(dt, self.t.grad_clip, norm)
        if plain:
            torch.nn.utils.clip_grads_with_norm_(plain, self.t.grad_clip, norm)

    def step(self, step: int) -> None:
        from torch.distributed.tensor.parallel import loss_parallel

        t0 = time.perf_counter()
        t = self.t
        set_lr(self.optimizer, lr_at(step, lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps, min_lr_ratio=t.min_lr_ratio))
        x, y = local_batch(self.data.train, seed=self.cfg.seed, step=step, global_batch_size=t.global_batch_size,
                           seq_len=t.seq_len, dp_rank=self.dp_rank, dp=self.dp)
        with loss_parallel():
            logits = self.model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
        if self.dp > 1:
            self._allreduce_dp()
        if t.grad_clip:
            self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(_local(loss).item() if not hasattr(loss, "full_tensor") else loss.full_tensor().item())

    def after_xtrain_step(self, record: dict) -> None:
        """``xtrain.train.run``'s per-step callback: torch's step i right after xtrain's."""
        self.step(record["step"] - 1)

    def count_comm(self, step: int) -> dict:
        """torch's collectives in one training step, by op (CommDebugMode)."""
        from torch.distributed.tensor.debug import CommDebugMode

        mode = CommDebugMode()
        with mode:
            self.step(step)
        return {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}


# -- the speed job ------------------------------------------------------------------------------

def speed_worker(rank, world, base, layouts, sp, repeats, root, count_torch_comm):
    import warnings

    # the loss's backward hook warns that the token ids need no gradient
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(1)
    out = []
    for r in range(repeats):
        order = layouts if r % 2 == 0 else layouts[::-1]
        for name in order:
            xt_over, mesh_shape = LAYOUTS[name]
            cfg = compose([*base, *xt_over, f"strategy.sp={str(sp).lower()}"])
            data = load_data(cfg.data)
            loop = TorchTPLoop(cfg, data, mesh_shape, sp)
            run_dir = Path(root) / f"speed-{name}-{r}"
            with contextlib.redirect_stdout(io.StringIO()):
                result = run(cfg, run_dir, on_step=loop.after_xtrain_step)
            torch_comm = loop.count_comm(cfg.train.steps) if (count_torch_comm and r == 0) else None
            rec = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
            # torch's global loss: the mean over dp of the (tp-replicated) local losses
            losses = torch.tensor(loop.losses[: cfg.train.steps], dtype=torch.float64)
            dist.all_reduce(losses)
            out.append({
                "layout": name, "repeat": r,
                "xtrain_step_s": [x["step_time_s"] for x in rec],
                "xtrain_comm": rec[-1]["comm"] if rec else None,
                "torch_step_s": loop.times[: cfg.train.steps],
                "xtrain_losses": result.losses,
                "torch_losses": (losses / world).tolist(),  # every rank holds the mean of its dp slice
                "torch_comm": torch_comm,
            })
            del loop
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="model preset (default small, with 8 heads / 4 kv heads)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every run (default 2)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="global batch size in sequences (default 16)")
    ap.add_argument("--sp", action="store_true", help="sequence parallel on both sides")
    ap.add_argument("--layouts", default="tp4,dp2xtp2", help="comma list of tp4, dp2xtp2")
    ap.add_argument("--comm", default="xtrain", choices=("xtrain", "torch"))
    ap.add_argument("--repeats", type=int, default=2, help="rounds, alternating which layout goes first (default 2)")
    ap.add_argument("--count-torch-comm", action="store_true", help="count torch's collectives of one extra step")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    layouts = [s for s in args.layouts.split(",") if s]
    if any(s not in LAYOUTS for s in layouts):
        ap.error(f"--layouts: choose from {list(LAYOUTS)}")

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="xtrain-bench-tp-"))
    root.mkdir(parents=True, exist_ok=True)
    total = args.warmup + args.steps
    base = [
        f"model={args.model}", *MODEL_OVERRIDES.get(args.model, ["model.tie_embeddings=false"]),
        "data=stdlib", f"comm={args.comm}", "precision=fp32", "device=cpu",
        f"train.seq_len={args.seq_len}", f"train.global_batch_size={args.batch}", "train.micro_batches=1",
        "train.eval_every=0", "train.ckpt_every=0", "train.progress=false", f"train.steps={total}",
    ]
    cfg0 = compose(base)
    m = cfg0.model
    n_params = build_model(ModelConfig.from_dict(dict(m.items())), cfg0.seed).num_params()
    tokens = args.batch * args.seq_len
    print(f"model={args.model} (dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, {m.n_kv_heads} kv heads, "
          f"ffn {m.ffn_hidden}, untied; {n_params:,} params) seq_len={args.seq_len} global batch={args.batch} "
          f"sp={args.sp} comm={args.comm} on 4 gloo ranks | {args.repeats} rounds x {total} steps ({args.warmup} warmup dropped) | "
          f"torch {torch.__version__}, {os.cpu_count()} cores, {platform.machine()}, load avg {os.getloadavg()[0]:.1f} | runs in {root}",
          flush=True)
    t0 = time.perf_counter()
    per_rank = run_on_ranks(speed_worker, 4, base, layouts, args.sp, args.repeats, str(root), args.count_torch_comm,
                            timeout=3600, pg_timeout=600)
    runs = per_rank[0]
    print(f"speed job: {time.perf_counter() - t0:.0f} s, load avg now {os.getloadavg()[0]:.1f}")
    res = {}
    rows = []
    for name in layouts:
        mine = [r for r in runs if r["layout"] == name]
        w = args.warmup
        xs = [s for r in mine for s in r["xtrain_step_s"][w:]]
        ts = [s for r in mine for s in r["torch_step_s"][w:]]
        pairs = [a / b for r in mine for a, b in zip(r["xtrain_step_s"][w:], r["torch_step_s"][w:])]
        diff = max(abs(a - b) for r in mine for a, b in zip(r["xtrain_losses"], r["torch_losses"]))
        x_tok, t_tok = tokens / statistics.median(xs), tokens / statistics.median(ts)
        res[name] = {
            "xtrain_tok_s": x_tok, "torch_tok_s": t_tok, "ratio": x_tok / t_tok,
            "paired_ratio": 1 / statistics.median(pairs), "max_loss_diff": diff,
            "xtrain_step_s": xs, "torch_step_s": ts, "xtrain_comm": mine[0]["xtrain_comm"],
            "torch_comm": mine[0]["torch_comm"],
            "per_run_medians": [(statistics.median(r["xtrain_step_s"][w:]), statistics.median(r["torch_step_s"][w:])) for r in mine],
        }
        rows.append(f"| {name} | {'on' if args.sp else 'off'} | {x_tok:,.0f} | {t_tok:,.0f} | {x_tok / t_tok:.3f} | "
                    f"{1 / statistics.median(pairs):.3f} | {diff:.1e} | {len(xs)} |")
    print("\n| layout | sp | xtrain tok/s | torch tok/s | xtrain/torch (medians) | paired median | max abs loss diff | steps |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    for name, r in res.items():
        verdict = "meets" if r["ratio"] >= TARGET else "MISSES"
        print(f"{name}: xtrain/torch {r['ratio']:.3f} (target >= {TARGET}) -> {verdict}; per-run medians s x/t: "
              + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in r["per_run_medians"]))
        comm = r["xtrain_comm"] or {}
        print("  xtrain collectives (rank 0, last step): "
              + ", ".join(f"{k} {v['calls']}x {v['bytes_sent'] / 2**20:.2f} MiB {v.get('wall_s', v.get('time_s', 0.0)) * 1e3:.0f} ms" for k, v in comm.items()))
        if r["torch_comm"]:
            print(f"  torch collectives (one step, CommDebugMode): {r['torch_comm']}")
    for name in layouts:
        r0 = next(r for r in runs if r["layout"] == name)
        print(f"{name} losses xtrain: {['%.6f' % v for v in r0['xtrain_losses']]}\n{name} losses torch:  {['%.6f' % v for v in r0['torch_losses']]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "n_params": n_params, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
