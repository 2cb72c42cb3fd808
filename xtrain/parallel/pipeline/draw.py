"""Draw pipeline timelines: ranks down the y axis, time along x, one box per
compute action with its micro-batch id.

Forwards are blue, full backwards orange, input-gradient backwards (I)
yellow, weight-gradient backwards (W) green; a darker shade is a later stage
on the same rank (an interleaved chunk, DualPipe's second direction,
DualPipeV's way back). An OVERLAP is one outlined box split in two: its
forward on top, its backward below, each with its micro-batch id (the
DualPipe README draws its overlapped pairs the same way).

Used by ``scripts/plot_schedule.py`` and ``python -m xtrain.pipeline_sim``.
matplotlib is imported inside the functions, so importing this module needs
nothing beyond the standard library. No torch here.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Sequence

from xtrain.parallel.pipeline.schedules import OVERLAP, B, F, I, W
from xtrain.parallel.pipeline.simulator import Timeline

# Per kind, one shade per stage held on the rank (darker = later).
COLOURS = {
    F: ["#4c8bd6", "#1f5aa6", "#0d3468", "#8fb8ea"],
    B: ["#f0a04b", "#c86a14", "#8a4405", "#f6c992"],
    I: ["#f2d15c", "#c9a21c", "#8c7005", "#f8e6a0"],
    W: ["#7cc68d", "#3a9552", "#1d5f2f", "#b6e2c0"],
}
OTHER = ["#9a9a9a", "#6a6a6a"]
LABELS = {F: "forward", B: "backward", I: "input grad (I)", W: "weight grad (W)"}


def chunk_index(timeline: Timeline, rank: int, stage: int) -> int:
    """Position of ``stage`` among the stages this rank holds (0 for one stage per rank)."""
    if timeline.stage_rank is not None:
        stages = [s for s, r in enumerate(timeline.stage_rank) if r == rank]
    else:
        stages = sorted({x.stage for iv in timeline.intervals[rank] for x in iv.action.parts})
    return stages.index(stage) if stage in stages else 0


def _colour(kind: str, chunk: int) -> str:
    palette = COLOURS.get(kind, OTHER)
    return palette[chunk % len(palette)]


def _text_colour(fill: str) -> str:
    r, g, b = (int(fill[k : k + 2], 16) for k in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"


def draw_timeline(ax, timeline: Timeline, title: str | None = None) -> None:
    """One timeline on one matplotlib axes; the title gets the bubble fraction."""
    from matplotlib.patches import Patch, Rectangle

    origin = timeline.start
    span = float(timeline.makespan) or 1.0
    chunks_seen, kinds_seen, overlapped = 1, set(), False
    for rank, row in enumerate(timeline.intervals):
        for iv in row:
            a = iv.action
            x0, width = float(iv.start - origin), float(iv.end - iv.start)
            parts = a.parts
            overlapped |= a.kind == OVERLAP
            height = 0.8 / len(parts)
            for k, x in enumerate(parts):
                chunk = chunk_index(timeline, rank, x.stage)
                chunks_seen = max(chunks_seen, chunk + 1)
                kinds_seen.add(x.kind)
                fill = _colour(x.kind, chunk)
                y0 = rank - 0.4 + k * height
                ax.broken_barh([(x0, width)], (y0, height), facecolors=fill, edgecolors="white", linewidth=0.8)
                # Label only boxes wide enough to hold it (measured timelines can have slivers).
                if width >= span / 400:
                    size = 8 if len(parts) == 1 else 6.5
                    ax.text(x0 + width / 2, y0 + height / 2, str(x.mb), ha="center", va="center", fontsize=size, color=_text_colour(fill))
            if a.kind == OVERLAP:
                ax.add_patch(Rectangle((x0, rank - 0.4), width, 0.8, fill=False, edgecolor="black", linewidth=1.0))
    ax.set_ylim(timeline.n_ranks - 0.5, -0.5)
    ax.set_yticks(range(timeline.n_ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(timeline.n_ranks)])
    ax.set_xlim(0, span)
    ax.set_xlabel(f"time ({timeline.time_unit})")
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)
    handles = []
    for kind in [k for k in (F, B, I, W) if k in kinds_seen] or [F, B]:
        for c in range(chunks_seen):
            suffix = f" stage {c}" if chunks_seen > 1 else ""
            handles.append(Patch(facecolor=_colour(kind, c), label=LABELS[kind] + suffix))
    if overlapped:
        handles.append(Patch(facecolor="white", edgecolor="black", label="F&B overlapped (top F, below B)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    if title is None:
        title = timeline.name or "timeline"
    ax.set_title(f"{title}: bubble {float(timeline.bubble_fraction):.3f}", fontsize=10, loc="left")


def save_timelines(
    panels: Sequence[tuple[Timeline, str]], out: str | PathLike, *, same_scale: bool = True, measured: bool = False
) -> Path:
    """One panel per (timeline, title), stacked, saved to ``out`` (png, svg, ...).
    ``same_scale``: every panel on the longest panel's time axis. The width
    grows with the makespan so the shortest box still holds its micro-batch
    id (``measured``: fixed width, real timelines have slivers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max(float(t.makespan) for t, _ in panels) or 1.0
    ranks = max(t.n_ranks for t, _ in panels)
    durations = [float(iv.duration) for t, _ in panels for row in t.intervals for iv in row if iv.duration > 0]
    shortest = min(durations, default=1.0)
    per_unit = 14 / longest if measured else max(0.28, 0.16 / shortest)
    width = min(30.0, 3.5 + per_unit * longest)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 0.9 + (0.45 * ranks + 0.9) * len(panels)), squeeze=False)
    for ax, (timeline, title) in zip(axes[:, 0], panels):
        draw_timeline(ax, timeline, title)
        if same_scale and len(panels) > 1:
            ax.set_xlim(0, longest)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
