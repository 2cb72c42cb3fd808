"""Plot a mixture-of-experts run: expert load per MoE layer, and ep-group traffic.

    python scripts/plot_experts.py RUN_DIR [--out PNG]

Reads RUN_DIR/metrics.jsonl (docs/metrics.md) and draws

- one heat map per MoE layer: x the optimizer step, y the expert, colour the
  expert's share of that layer's token assignments at that step
  (``moe_tokens_per_expert``; 1/E everywhere is perfectly balanced);
- the bytes rank 0 sent per step on the ``ep`` group (ledger keys ``op@ep``
  of the all-to-all, all-gather and reduce-scatter families: the dispatcher's
  token exchanges plus its count exchange; all_reduce@ep, the gradient and
  balancing reductions when dp = 1, is left out), by op family, and that total
  divided by the number of MoE layers. Every MoE layer makes the same exchange
  pattern, so the quotient is one layer's traffic per step: its forward and
  backward, plus the no-grad counting forward when global-batch balancing runs
  one (aux loss on and micro-batches > 1 or data ranks > 1; docs/expert-parallel.md).
  It is not split further, since the counting forward makes the split uneven.

``expert_arrays(run_dir)`` returns the arrays drawn (tests use it).
Exit code 2 with a one-line message for a missing metrics file or a run
without MoE metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

GROUP_SUFFIX = "@ep"
# The dispatchers' collectives. all_reduce@ep is left out: with dp = 1 the data
# group is the ep group, and its all-reduces are the gradient and balancing
# reductions, not token traffic.
DISPATCH_FAMILIES = ("all_to_all", "all_gather", "reduce_scatter")


class PlotError(Exception):
    """A run this script cannot plot (the message says why)."""


def _family(op: str) -> str:
    """The op's family by its name's prefix (``all_to_all_single`` -> ``all_to_all``,
    ``all_gather_into_tensor`` -> ``all_gather``), so renamed ledger keys still land;
    any other op is its own family."""
    flat = op.replace("_", "").lower()
    for fam in DISPATCH_FAMILIES:
        if flat.startswith(fam.replace("_", "")):
            return fam
    return op


def read_records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file (is {run_dir} a run directory?)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}:{n}: not JSON ({e.msg})") from None
    return records


def expert_arrays(run_dir: str | Path) -> dict:
    """The plotted data of one run:

    - ``steps`` (S,) int: the steps with MoE metrics;
    - ``counts`` (L, E, S) int: assignments per MoE layer, expert and step;
    - ``load`` (L, E, S) float: ``counts`` as a share of its layer's step total;
    - ``ep_bytes`` {op family: (S,) int}: bytes rank 0 sent on the ep group;
    - ``ep_total`` (S,) int and ``per_layer`` (S,) float = ep_total / L.
    """
    records = [r for r in read_records(run_dir) if r.get("moe_tokens_per_expert")]
    if not records:
        raise PlotError(f"{Path(run_dir) / 'metrics.jsonl'}: no step records moe_tokens_per_expert (not a MoE run?)")
    steps = np.array([r["step"] for r in records], dtype=np.int64)
    counts = np.array([r["moe_tokens_per_expert"] for r in records], dtype=np.int64)  # (S, L, E)
    counts = counts.transpose(1, 2, 0)  # (L, E, S)
    totals = counts.sum(axis=1, keepdims=True)
    load = counts / np.maximum(totals, 1)
    families: dict[str, np.ndarray] = {}
    for s, r in enumerate(records):
        for key, entry in (r.get("comm") or {}).items():
            op, _, group = key.rpartition("@")
            if "@" + group != GROUP_SUFFIX:
                continue
            fam = _family(op)
            if fam not in DISPATCH_FAMILIES:
                continue
            families.setdefault(fam, np.zeros(len(records), dtype=np.int64))[s] += int(entry.get("bytes_sent", 0))
    total = sum(families.values()) if families else np.zeros(len(records), dtype=np.int64)
    L = counts.shape[0]
    return {"steps": steps, "counts": counts, "load": load, "ep_bytes": families,
            "ep_total": np.asarray(total, dtype=np.int64), "per_layer": np.asarray(total, dtype=np.float64) / L}


def plot(arrays: dict, out: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load, steps = arrays["load"], arrays["steps"]
    L, E, _ = load.shape
    traffic = bool(arrays["ep_bytes"])
    bottom = 2.2 if traffic else 0.5
    fig, axes = plt.subplots(L + 1, 1, figsize=(9, 1.2 + 1.0 * L + 0.25 * E * L + bottom * 1.2), squeeze=False,
                             gridspec_kw={"height_ratios": [max(E, 2) / 4] * L + [bottom]})
    axes = axes[:, 0]
    vmax = max(float(load.max()), 2.0 / E)
    extent = (steps[0] - 0.5, steps[-1] + 0.5, E - 0.5, -0.5)
    for li in range(L):
        ax = axes[li]
        im = ax.imshow(load[li], aspect="auto", cmap="viridis", vmin=0, vmax=vmax, extent=extent,
                       interpolation="nearest")
        last = load[li, :, -1]
        ax.set_ylabel(f"MoE layer {li}\nexpert")
        ax.set_yticks(range(E))
        ax.set_title(f"layer {li}: share of assignments (last step max/mean {last.max() * E:.2f})", fontsize=9)
        fig.colorbar(im, ax=ax, pad=0.01, label="share")
    ax = axes[-1]
    if traffic:
        for fam, b in sorted(arrays["ep_bytes"].items()):
            ax.plot(steps, b / 2**20, marker=".", label=f"{fam}@ep (all layers)")
        ax.plot(steps, arrays["per_layer"] / 2**20, "k--", marker=".",
                label=f"per MoE layer = total / {L} (fwd + bwd [+ counting fwd])")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no traffic on the ep group (ep = 1)", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("step")
    ax.set_ylabel("MiB sent by rank 0" if traffic else "")
    ax.set_xlim(extent[0], extent[1])
    ax.set_title("ep-group bytes per step (rank 0's ledger)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985 if title else 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Draws expert load heat maps per MoE layer and the ep-group bytes per step.")
    ap.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    ap.add_argument("--out", help="PNG to write (default RUN_DIR/experts.png)")
    ap.add_argument("--title", default="", help="figure title")
    args = ap.parse_args(argv)
    try:
        arrays = expert_arrays(args.run_dir)
    except PlotError as e:
        print(f"plot_experts: {e}", file=sys.stderr)
        return 2
    out = plot(arrays, args.out or Path(args.run_dir) / "experts.png", args.title)
    L, E, S = arrays["load"].shape
    last = arrays["load"][:, :, -1]
    print(f"{out}: {L} MoE layers x {E} experts x {S} steps; last step max/mean load "
          + ", ".join(f"{m * E:.2f}" for m in last.max(axis=1))
          + (f"; ep bytes/step median {int(np.median(arrays['ep_total'])):,}" if arrays["ep_bytes"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
