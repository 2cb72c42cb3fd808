#!/usr/bin/env python
"""Draw a pipeline schedule's timeline: ranks down the y axis, time along x,
forwards, backwards and (split backwards) their I and W parts in their own
colours, the micro-batch id in each box, the stage's place on its rank as a
shade, overlapped F&B pairs outlined, the bubble fraction in the title.

    python scripts/plot_schedule.py --schedule 1f1b --pp 4 --micro 8 --out docs/img/schedule_1f1b.png
    python scripts/plot_schedule.py --schedule interleaved_1f1b --pp 4 --micro 8 --chunks 2 --f 1 --b 2 --out x.png
    python scripts/plot_schedule.py --schedule zb1p --pp 4 --micro 8 --f 1 --b 2 --w 1 --out docs/img/schedule_zb1p.png
    python scripts/plot_schedule.py --all --pp 4 --micro 8 --chunks 2 --out docs/img/schedules.png
    python scripts/plot_schedule.py --measured run_timeline.json --out measured.png
    python scripts/plot_schedule.py --measured RUN/trace.json --out measured.png   # a run with train.trace=true

A simulated timeline comes from ``xtrain.parallel.pipeline.simulate`` with
costs ``--f``, ``--b`` (the full backward), ``--w`` (its weight-gradient part;
the input-gradient part I costs b - w; default w = b/2), ``--overlap`` (an
overlapped F&B pair, default f + b) per action and ``--latency`` per message
(defaults F=1, B=2, free messages); they are the costs of one micro-batch
through all of a rank's layers, so an interleaved chunk takes 1/v of them and
a DualPipeV stage 1/2 (``--per-action`` charges them to every action
instead; ``xtrain.pipeline_sim`` has the rule). ``--all`` draws every
schedule that the rules allow at (pp, micro). ``--measured`` reads a timeline
a run wrote, in the JSON format of ``xtrain/parallel/pipeline/simulator.py``
(``{"ranks": [[{"kind","stage","mb","start","end"}, ...], ...]}``), and
draws it the same way. ``--text`` also prints the action table. The drawing
itself is ``xtrain.parallel.pipeline.draw``.
"""

from __future__ import annotations

import argparse
import sys
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
    timeline_from_json,
)
from xtrain.parallel.pipeline.draw import COLOURS, chunk_index, draw_timeline, save_timelines  # noqa: E402,F401
from xtrain.pipeline_sim import closed_form_idle, simulate_named  # noqa: E402

ALL = ("gpipe", "1f1b", "interleaved_1f1b", "zb1p", "dualpipe", "dualpipev")


def _number(text: str) -> Fraction | float:
    """Costs as Fractions where exact (so the title's bubble is exact)."""
    try:
        return Fraction(text)
    except ValueError:
        return float(text)


def _fmt(x) -> str:
    return f"{float(x):g}"


def simulated(name: str, p: int, m: int, v: int, costs: Costs, per_action: bool = False) -> tuple[Timeline, str]:
    """Simulate schedule ``name`` (``xtrain.pipeline_sim.simulate_named``: a
    chunk of an interleaved schedule takes 1/v of the per-rank costs, a
    DualPipeV stage 1/2, so the panels of --all compare like with like;
    ``per_action`` charges the costs to every action instead)."""
    timeline, per = simulate_named(name, p, m, costs, v, per_action)
    split = f", W={_fmt(per.weight_cost)}" if name in ("zb1p", "dualpipe", "dualpipev") else ""
    overlap = f", F&B={_fmt(per.overlap)}" if per.overlap is not None and name in ("dualpipe", "dualpipev") else ""
    if name in ("gpipe", "1f1b", "interleaved_1f1b"):
        chunks = v if name in CHUNKED_SCHEDULES else 1
        formula = f"formula {pipeline_bubble_fraction(name, p, m, chunks):.3f}"
    else:
        formula = f"closed-form idle {_fmt(closed_form_idle(name, p, per))}, simulated {_fmt(max(timeline.idle))}"
    if name in CHUNKED_SCHEDULES:
        shape = f"p={p}, m={m}, v={v}, F={_fmt(per.F)}, B={_fmt(per.B)} per chunk"
    elif name == "dualpipev" and per is not costs:
        shape = f"p={p}, m={m}, 2p stages, F={_fmt(per.F)}, B={_fmt(per.B)}{split}{overlap} per stage"
    else:
        shape = f"p={p}, m={m}, F={_fmt(per.F)}, B={_fmt(per.B)}{split}{overlap}"
    return timeline, f"{name} ({shape}; {formula})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default="1f1b", choices=sorted(SCHEDULES))
    parser.add_argument("--all", action="store_true", help="every schedule the rules allow at (pp, micro), in one figure")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=2, help="stages per rank for interleaved_1f1b (ignored by the others)")
    parser.add_argument("--f", type=_number, default=Fraction(1), help="forward cost of one micro-batch on one rank")
    parser.add_argument("--b", type=_number, default=Fraction(2), help="full backward cost of one micro-batch on one rank")
    parser.add_argument("--w", type=_number, default=None, help="weight-gradient part of --b (default b/2)")
    parser.add_argument("--overlap", type=_number, default=None, help="an overlapped F&B pair (default f + b)")
    parser.add_argument(
        "--per-action", action="store_true", help="charge the costs to every action (by default an interleaved chunk costs 1/v)"
    )
    parser.add_argument("--latency", type=_number, default=Fraction(0), help="per-message latency")
    parser.add_argument("--measured", type=Path,
                        help="draw a measured timeline (JSON, or a run's trace.json: its last step) instead of simulating")
    parser.add_argument("--text", action="store_true", help="also print the action table and the timeline summary")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    costs = Costs(F=args.f, B=args.b, W=args.w, overlap=args.overlap, latency=args.latency)
    panels: list[tuple[Timeline, str]] = []
    if args.measured is not None:
        timeline = timeline_from_json(args.measured)
        panels.append((timeline, f"measured {timeline.name or args.measured.name}"))
    else:
        for name in ALL if args.all else [args.schedule]:
            try:
                panels.append(simulated(name, args.pp, args.micro, args.chunks, costs, args.per_action))
            except ValueError as e:
                if not args.all:
                    parser.error(str(e))
                print(f"{name}: skipped: {e}")
                continue
            if args.text:
                chunks = args.chunks if name in CHUNKED_SCHEDULES else 1
                print(build_schedule(name, args.pp, args.micro, chunks).table(comm=False))
    if args.text:
        for timeline, _ in panels:
            print(timeline.summary())
    print(f"wrote {save_timelines(panels, args.out, measured=args.measured is not None)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
