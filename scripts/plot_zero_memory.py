#!/usr/bin/env python
"""Model-state memory per rank by ZeRO stage, measured against the formulas,
and communication per step, ledger against the formulas.

    python scripts/plot_zero_memory.py --plot docs/img/zero_memory.png
    python scripts/plot_zero_memory.py --model tiny --nproc 2 --markdown out.md

One N-rank job runs ``xtrain.train.run`` for dp, ddp, zero1, zero2 and zero3
(same model, same batches, ``--steps`` steps each) and reads rank 0's last
record in each run's metrics.jsonl: ``model_state_bytes`` (params, grads,
optimizer state, measured from the live tensors after the optimizer step with
the gradients still alive; zero3 also ``gathered_peak``, the most gathered
parameter bytes alive at once) and ``comm`` (the ledger: bytes this rank sent
in the step).

Formulas (``xtrain.formulas.zero_model_state_bytes`` and
``zero_comm_bytes``), for Ψ fp32 parameters with AdamW (ZeRO paper,
Rajbhandari et al. 2020, with K = 8 bytes of optimizer state per parameter
and no fp16 copies):

| stage | params | grads | optim | comm sent per rank and step |
|---|---|---|---|---|
| dp, ddp | 4Ψ | 4Ψ | 8Ψ | all-reduce 2·(n-1)/n·4Ψ |
| zero1 | 4Ψ | 4Ψ | 8Ψ/n | reduce-scatter + all-gather, same |
| zero2 | 4Ψ | 4Ψ/n | 8Ψ/n | same |
| zero3 | 4Ψ/n | 4Ψ/n | 8Ψ/n | 2 all-gathers + reduce-scatter, 3·(n-1)/n·4Ψ |

The plot (matplotlib, Agg) puts the measured stack beside the formula stack
for ddp, zero1, zero2 and zero3; zero3's transient gathered parameters are
drawn hatched on top of its measured stack.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xtrain.formulas import zero_comm_bytes, zero_model_state_bytes  # noqa: E402
from xtrain.spawn import run_on_ranks  # noqa: E402

STAGES = ("dp", "ddp", "zero1", "zero2", "zero3")
PLOTTED = ("ddp", "zero1", "zero2", "zero3")
PARTS = ("params", "grads", "optim")


def worker(rank: int, world: int, base: list[str], root: str):
    import torch

    from xtrain.config import compose
    from xtrain.train import run

    torch.set_num_threads(1)
    out = {}
    for stage in STAGES:
        run_dir = Path(root) / stage
        with contextlib.redirect_stdout(io.StringIO()):
            run(compose([*base, f"strategy={stage}"]), run_dir)
        if rank == 0:
            last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
            out[stage] = {"state": last["model_state_bytes"], "comm": last["comm"]}
    return out


def mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def markdown(results, psi: int, n: int) -> str:
    lines = [
        f"Memory per rank, MB (Ψ = {psi:,} parameters, n = {n}; measured: rank 0's `model_state_bytes`)",
        "",
        "| stage | params formula / measured | grads formula / measured | optim formula / measured | total formula / measured | zero3 gathered peak |",
        "|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        f, m = zero_model_state_bytes(stage, psi, n), results[stage]["state"]
        cells = [f"{mb(f[k])} / {mb(m[k])}" for k in PARTS]
        cells.append(f"{mb(sum(f.values()))} / {mb(sum(m[k] for k in PARTS))}")
        cells.append(mb(m["gathered_peak"]) if "gathered_peak" in m else "")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Communication per rank and step, MB sent (ledger: rank 0's `comm`, last step)",
        "",
        "| stage | formula | ledger total | ledger by collective (calls, MB) |",
        "|---|---|---|---|",
    ]
    for stage in STAGES:
        comm = results[stage]["comm"]
        total = sum(v["bytes_sent"] for v in comm.values())
        detail = ", ".join(f"{k}: {v['calls']}, {mb(v['bytes_sent'])}" for k, v in comm.items())
        lines.append(f"| {stage} | {mb(zero_comm_bytes(stage, psi, n))} | {mb(total)} | {detail} |")
    return "\n".join(lines) + "\n"


def plot(results, psi: int, n: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"params": "#4c72b0", "grads": "#dd8452", "optim": "#55a868"}
    fig, ax = plt.subplots(figsize=(8, 4.8))
    width = 0.38
    for i, stage in enumerate(PLOTTED):
        m, f = results[stage]["state"], zero_model_state_bytes(stage, psi, n)
        for dx, values, alpha in ((-width / 2, m, 1.0), (width / 2, f, 0.45)):
            bottom = 0.0
            for k in PARTS:
                h = values[k] / 2**20
                ax.bar(i + dx, h, width, bottom=bottom, color=colors[k], alpha=alpha, edgecolor="black", linewidth=0.5)
                bottom += h
            if dx < 0 and "gathered_peak" in m:
                h = m["gathered_peak"] / 2**20
                ax.bar(i + dx, h, width, bottom=bottom, color="white", hatch="//", edgecolor="gray", linewidth=0.5)
                bottom += h
            ax.text(i + dx, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(PLOTTED)))
    ax.set_xticklabels([f"{s}\nmeasured | formula" for s in PLOTTED])
    ax.set_ylabel("MB per rank")
    ax.set_title(title)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colors[k], label=k) for k in PARTS]
    handles += [
        Patch(facecolor="white", hatch="//", edgecolor="gray", label="zero3 gathered params (peak, transient)"),
        Patch(facecolor="gray", alpha=0.45, label="formula (lighter bars)"),
    ]
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--comm", default="xtrain", choices=("xtrain", "torch"))
    ap.add_argument("--plot", default=None, help="PNG path for the memory plot")
    ap.add_argument("--markdown", default=None, help="also write the tables here")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run, e.g. --set precision=bf16 --set strategy.reduce_dtype=bf16")
    args = ap.parse_args(argv)

    from xtrain.config import compose
    from xtrain.model import ModelConfig, build_model

    base = [
        f"model={args.model}", f"comm={args.comm}", "precision=fp32", "device=cpu", f"train.steps={args.steps}",
        f"train.seq_len={args.seq_len}", f"train.global_batch_size={args.batch}", "train.eval_every=0",
        "train.ckpt_every=0", "train.progress=false", *args.set,
    ]
    cfg = compose([*base, "strategy=ddp"])  # every stage here has the keys --set may name
    psi = build_model(ModelConfig.from_dict(dict(cfg.model.items())), cfg.seed).num_params()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="xtrain-zero-memory-"))
    results = run_on_ranks(worker, args.nproc, base, str(root), timeout=1800, pg_timeout=600)[0]
    text = markdown(results, psi, args.nproc)
    print(f"model={args.model}, {args.nproc} ranks, comm={args.comm} {' '.join(args.set)}, runs in {root}\n")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "psi": psi, "results": results}, indent=1))
    if args.plot:
        plot(results, psi, args.nproc, Path(args.plot), f"model state per rank, model={args.model} (Ψ={psi:,}), n={args.nproc}, fp32 AdamW")
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
