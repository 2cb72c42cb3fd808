#!/usr/bin/env python
"""Draw a pipeline schedule's timeline: ranks down the y axis, time along x,
forwards and backwards in two colours, the micro-batch id in each box, the
stage's chunk (interleaved) as a shade, the bubble fraction in the title.

    python scripts/plot_schedule.py --schedule 1f1b --pp 4 --micro 8 --out docs/img/schedule_1f1b.png
    python scripts/plot_schedule.py --schedule interleaved_1f1b --pp 4 --micro 8 --chunks 2 --f 1 --b 2 --out x.png
    python scripts/plot_schedule.py --all --pp 4 --micro 8 --chunks 2 --out docs/img/schedules.png
    python scripts/plot_schedule.py --measured run_timeline.json --out measured.png

A simulated timeline comes from ``xtrain.parallel.pipeline.simulate`` with
costs ``--f``, ``--b`` per action and ``--latency`` per message (defaults
F=1, B=2, free messages); they are the costs of one micro-batch through all
of a rank's layers, so an interleaved chunk takes F/v and B/v (``--per-action``
charges F and B to every action instead). ``--measured`` reads a timeline a run wrote, in the
JSON format of ``xtrain/parallel/pipeline/simulator.py``
(``{"ranks": [[{"kind","stage","mb","start","end"}, ...], ...]}``), and
draws it the same way. ``--text`` also prints the action table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xtrain.formulas import pipeline_bubble_fraction  # noqa: E402
from xtrain.parallel.pipeline import (  # noqa: E402
    CHUNKED_SCHEDULES,
    SCHEDULES,
    Costs,
    Timeline,
    build_schedule,
    simulate,
    timeline_from_json,
)

# Forward blues, backward oranges; darker = later chunk on the rank.
COLOURS = {
    "F": ["#4c8bd6", "#1f5aa6", "#0d3468", "#8fb8ea"],
    "B": ["#f0a04b", "#c86a14", "#8a4405", "#f6c992"],
}
OTHER = ["#9a9a9a", "#6a6a6a"]


def _number(text: str) -> Fraction | float:
    """Costs as Fractions where exact (so the title's bubble is exact)."""
    try:
        return Fraction(text)
    except ValueError:
        return float(text)


def chunk_index(timeline: Timeline, rank: int, stage: int) -> int:
    """Position of ``stage`` among the stages this rank holds (0 for one stage per rank)."""
    if timeline.stage_rank is not None:
        stages = [s for s, r in enumerate(timeline.stage_rank) if r == rank]
    else:
        stages = sorted({iv.action.stage for iv in timeline.intervals[rank]})
    return stages.index(stage) if stage in stages else 0


def draw_timeline(ax, timeline: Timeline, title: str | None = None) -> None:
    """One timeline on one matplotlib axes."""
    from matplotlib.patches import Patch

    origin = timeline.start
    span = float(timeline.makespan) or 1.0
    chunks_seen = 1
    for rank, row in enumerate(timeline.intervals):
        for iv in row:
            a = iv.action
            chunk = chunk_index(timeline, rank, a.stage)
            chunks_seen = max(chunks_seen, chunk + 1)
            palette = COLOURS.get(a.kind, OTHER)
            colour = palette[chunk % len(palette)]
            x0, width = float(iv.start - origin), float(iv.end - iv.start)
            ax.broken_barh([(x0, width)], (rank - 0.4, 0.8), facecolors=colour, edgecolors="white", linewidth=0.8)
            # Label only boxes wide enough to hold it (measured timelines can have slivers).
            if width >= span / 400:
                text_colour = "white" if chunk in (1, 2) else "black"
                ax.text(x0 + width / 2, rank, str(a.mb), ha="center", va="center", fontsize=8, color=text_colour)
    ax.set_ylim(timeline.n_ranks - 0.5, -0.5)
    ax.set_yticks(range(timeline.n_ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(timeline.n_ranks)])
    ax.set_xlim(0, span)
    ax.set_xlabel(f"time ({timeline.time_unit})")
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)
    handles = []
    for kind, label in (("F", "forward"), ("B", "backward")):
        for c in range(chunks_seen):
            suffix = f" chunk {c}" if chunks_seen > 1 else ""
            handles.append(Patch(facecolor=COLOURS[kind][c % len(COLOURS[kind])], label=label + suffix))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    if title is None:
        title = timeline.name or "timeline"
    ax.set_title(f"{title}: bubble {float(timeline.bubble_fraction):.3f}", fontsize=10, loc="left")


def simulated(name: str, p: int, m: int, v: int, costs: Costs, per_action: bool = False) -> tuple[Timeline, str]:
    """Simulate schedule ``name``. ``costs.F``/``costs.B`` are one micro-batch
    through all of a rank's layers, so a chunk of an interleaved schedule
    takes F/v and B/v (the panels of --all then compare like with like);
    ``per_action`` charges F and B to every action instead."""
    chunks = v if name in CHUNKED_SCHEDULES else 1
    schedule = build_schedule(name, p, m, chunks)
    action_costs = costs
    if chunks > 1 and not per_action:
        action_costs = replace(costs, F=costs.F / chunks, B=costs.B / chunks)
    timeline = simulate(schedule, action_costs)
    formula = pipeline_bubble_fraction(name, p, m, chunks)
    if name in CHUNKED_SCHEDULES:
        shape = f"p={p}, m={m}, v={chunks}, F={action_costs.F}, B={action_costs.B} per chunk"
    else:
        shape = f"p={p}, m={m}, F={costs.F}, B={costs.B}"
    title = f"{name} ({shape}; formula {formula:.3f})"
    return timeline, title


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default="1f1b", choices=sorted(SCHEDULES))
    parser.add_argument("--all", action="store_true", help="gpipe, 1f1b and interleaved_1f1b in one figure")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=2, help="stages per rank for interleaved_1f1b (ignored by the others)")
    parser.add_argument("--f", type=_number, default=Fraction(1), help="forward cost of one micro-batch on one rank")
    parser.add_argument("--b", type=_number, default=Fraction(2), help="backward cost of one micro-batch on one rank")
    parser.add_argument(
        "--per-action", action="store_true", help="charge --f/--b to every action (by default an interleaved chunk costs F/v, B/v)"
    )
    parser.add_argument("--latency", type=_number, default=Fraction(0), help="per-message latency")
    parser.add_argument("--measured", type=Path, help="draw a measured timeline (JSON) instead of simulating")
    parser.add_argument("--text", action="store_true", help="also print the action table and the timeline summary")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = Costs(F=args.f, B=args.b, latency=args.latency)
    panels: list[tuple[Timeline, str]] = []
    if args.measured is not None:
        timeline = timeline_from_json(args.measured)
        panels.append((timeline, f"measured {timeline.name or args.measured.name}"))
    else:
        names = ["gpipe", "1f1b", "interleaved_1f1b"] if args.all else [args.schedule]
        for name in names:
            panels.append(simulated(name, args.pp, args.micro, args.chunks, costs, args.per_action))
            if args.text:
                chunks = args.chunks if name in CHUNKED_SCHEDULES else 1
                print(build_schedule(name, args.pp, args.micro, chunks).table(comm=False))
    if args.text:
        for timeline, _ in panels:
            print(timeline.summary())

    longest = max(float(t.makespan) for t, _ in panels)
    ranks = max(t.n_ranks for t, _ in panels)
    # Wide enough that the shortest box holds its micro-batch id.
    shortest = min((float(iv.duration) for t, _ in panels for row in t.intervals for iv in row if iv.duration > 0), default=1.0)
    per_unit = max(0.28, 0.16 / shortest) if args.measured is None else 14 / longest
    width = min(30.0, 3.5 + per_unit * longest)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 0.9 + (0.45 * ranks + 0.9) * len(panels)), squeeze=False)
    for ax, (timeline, title) in zip(axes[:, 0], panels):
        draw_timeline(ax, timeline, title)
        if len(panels) > 1:
            ax.set_xlim(0, longest)  # same time scale in every panel
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
