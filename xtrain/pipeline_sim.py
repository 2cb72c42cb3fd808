"""Compare pipeline schedules side by side in the simulator: bubble, idle per
rank, step time (makespan), peak activations and peak activation memory,
against the closed forms of ``xtrain.formulas.pipeline_bubble_time``; and
draw all their timelines in one picture.

    python -m xtrain.pipeline_sim --pp 4 --micro 8 --f 1 --b 2 --w 1
    python -m xtrain.pipeline_sim --pp 4 --micro 8 --f 1 --b 2 --w 1 --overlap 2.5 --latency 0.1 --plot sim.png

Costs are those of one micro-batch through one rank's share of the model
(``--f`` forward, ``--b`` full backward, ``--w`` its weight-gradient part,
so the input-gradient part I costs b - w; ``--w`` defaults to b/2;
``--overlap`` an overlapped forward-and-backward pair, F&B, default f + b).
Schedules with several stages per rank charge each stage its share: a chunk
of interleaved_1f1b (``--chunks`` v) costs 1/v of them, a DualPipeV stage 1/2
(its 2p stages cut the model as finely as interleaved with v = 2), so every
row does the same work per rank; ``--per-action`` charges the costs to every
action as given instead. DualPipe's stages are whole blocks (two copies of
a p-way cut) and cost the full amounts. ``--latency`` is per message.

Peak activations count (stage, micro-batch) pairs held per rank (F done, B
or W not yet); peak memory weighs a pair between its I and W by
``--act-fraction`` (default 1/2; ``xtrain/parallel/pipeline/simulator.py``).
Schedules whose rules refuse (p, m) are listed with the rule.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from xtrain.formulas import pipeline_bubble_time
from xtrain.parallel.pipeline.schedules import CHUNKED_SCHEDULES, build_schedule
from xtrain.parallel.pipeline.simulator import Costs, Timeline, simulate

ALL = ("gpipe", "1f1b", "interleaved_1f1b", "zb1p", "dualpipe", "dualpipev")


def stages_per_rank(name: str, v: int) -> int:
    """Stages each rank holds that split its share of the model (costs divide by it)."""
    if name in CHUNKED_SCHEDULES:
        return v
    return 2 if name == "dualpipev" else 1


def action_costs(name: str, costs: Costs, v: int = 2, per_action: bool = False) -> Costs:
    """``costs`` (per micro-batch through one rank's share) as costs per action
    of schedule ``name``: divided by :func:`stages_per_rank` unless ``per_action``."""
    k = 1 if per_action else stages_per_rank(name, v)
    if k == 1:
        return costs
    overlap = None if costs.overlap is None else costs.overlap / k
    return replace(
        costs, F=costs.F / k, B=costs.B / k, I=costs.input_cost / k, W=costs.weight_cost / k, overlap=overlap
    )


def closed_form_idle(name: str, p: int, costs: Costs) -> Any:
    """``pipeline_bubble_time`` at per-action ``costs``."""
    return pipeline_bubble_time(name, p, costs.F, costs.B, costs.weight_cost, costs.overlap)


def simulate_named(name: str, p: int, m: int, costs: Costs, v: int = 2, per_action: bool = False) -> tuple[Timeline, Costs]:
    """Build schedule ``name`` (v stages per rank for interleaved_1f1b) and
    simulate it at :func:`action_costs`; ``ValueError`` if its rules refuse."""
    schedule = build_schedule(name, p, m, v if name in CHUNKED_SCHEDULES else 1)
    per = action_costs(name, costs, v, per_action)
    return simulate(schedule, per), per


def _fmt(x: Any) -> str:
    if isinstance(x, (int, Fraction)) and Fraction(x).denominator == 1:
        return str(int(x))
    return f"{float(x):.4g}"


def compare(
    p: int, m: int, costs: Costs, names: Sequence[str] = ALL, v: int = 2, per_action: bool = False
) -> list[dict[str, Any]]:
    """One row per schedule: its timeline and figures, or why it cannot run."""
    rows = []
    for name in names:
        try:
            timeline, per = simulate_named(name, p, m, costs, v, per_action)
        except ValueError as e:
            rows.append({"schedule": name, "error": str(e)})
            continue
        rows.append(
            {
                "schedule": name if name not in CHUNKED_SCHEDULES else f"{name} v={v}",
                "timeline": timeline,
                "costs": per,
                "bubble": timeline.bubble_fraction,
                "idle": timeline.idle,
                "makespan": timeline.makespan,
                "peak_activations": timeline.peak_activations,
                "peak_memory": timeline.peak_memory,
                "closed_form_idle": closed_form_idle(name, p, per),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (a refused schedule gets its rule)."""
    head = ["schedule", "bubble", "makespan", "idle per rank", "closed form", "peak act.", "peak memory"]
    body, notes = [], []
    for row in rows:
        if "error" in row:
            notes.append(f"{row['schedule']}: not run: {row['error']}")
            continue
        body.append(
            [
                row["schedule"],
                f"{float(row['bubble']):.4f}",
                _fmt(row["makespan"]),
                " ".join(_fmt(x) for x in row["idle"]),
                _fmt(row["closed_form_idle"]),
                " ".join(str(x) for x in row["peak_activations"]),
                " ".join(_fmt(x) for x in row["peak_memory"]),
            ]
        )
    widths = [max(len(r[k]) for r in [head] + body) for k in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + body]
    return "\n".join(lines + notes)


def _number(text: str) -> Fraction | float:
    """Costs as Fractions where exact (so the figures are exact)."""
    try:
        return Fraction(text)
    except ValueError:
        return float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xtrain.pipeline_sim", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pp", type=int, default=4, help="pipeline ranks p")
    parser.add_argument("--micro", type=int, default=8, help="micro-batches m")
    parser.add_argument("--f", type=_number, default=Fraction(1), help="forward cost (one micro-batch, one rank's share)")
    parser.add_argument("--b", type=_number, default=Fraction(2), help="full backward cost (input + weight gradients)")
    parser.add_argument("--w", type=_number, default=None, help="weight-gradient part of --b (default b/2; I = b - w)")
    parser.add_argument("--overlap", type=_number, default=None, help="an overlapped F&B pair (default f + b)")
    parser.add_argument("--latency", type=_number, default=Fraction(0), help="per-message latency")
    parser.add_argument("--act-fraction", type=_number, default=Fraction(1, 2), help="activations an I leaves for its W")
    parser.add_argument("--chunks", type=int, default=2, help="stages per rank v for interleaved_1f1b")
    parser.add_argument("--per-action", action="store_true", help="charge the costs to every action as given")
    parser.add_argument("--schedules", default=",".join(ALL), help="comma list of " + ", ".join(ALL))
    parser.add_argument("--plot", type=Path, help="draw every timeline into this image")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.schedules.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        parser.error(f"--schedules: unknown {unknown}; choose from {', '.join(ALL)}")
    try:
        costs = Costs(F=args.f, B=args.b, W=args.w, overlap=args.overlap, latency=args.latency, act_fraction_after_I=args.act_fraction)
    except ValueError as e:
        parser.error(str(e))
    print(
        f"p={args.pp} m={args.micro}: F={_fmt(costs.F)} B={_fmt(costs.B)} (I={_fmt(costs.input_cost)} "
        f"W={_fmt(costs.weight_cost)}) F&B={_fmt(costs.overlap if costs.overlap is not None else costs.F + costs.B)} "
        f"latency={_fmt(costs.latency)}"
        + ("" if args.per_action else f"; per stage 1/{args.chunks} of these for interleaved_1f1b, 1/2 for dualpipev")
    )
    rows = compare(args.pp, args.micro, costs, names, args.chunks, args.per_action)
    print(table(rows))
    if args.plot is not None:
        from xtrain.parallel.pipeline.draw import save_timelines

        panels = [(row["timeline"], row["schedule"]) for row in rows if "timeline" in row]
        if panels:
            print(f"wrote {save_timelines(panels, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
