"""Time a pipeline schedule: per-action costs -> each rank's timeline, the
bubble, and the activations held.

:func:`simulate` runs a :class:`~xtrain.parallel.pipeline.schedules.Schedule`
the way the executor does: each rank runs its list in order; a send takes
``costs.send`` on its rank and its message arrives ``costs.latency`` later; a
receive is posted at its RECV (``costs.recv`` on its rank) and the compute
that consumes it starts no earlier than the message's arrival. Compute
durations come from :class:`Costs` (per kind, or per (kind, stage) for costs
measured in a run).

The result, a :class:`Timeline`, is the same object a measured run gives
(:func:`timeline_from_json`), so one plot and one set of numbers serve both.

JSON timeline format (written by :func:`timeline_to_json`, read by
:func:`timeline_from_json`; the executor writes it for a measured step)::

    {
      "ranks": [                      # required: one list per pipeline rank
        [{"kind": "F", "stage": 0, "mb": 0, "start": 0.0, "end": 1.0}, ...],
        ...
      ],
      "name": "1f1b",                 # optional: the schedule's name
      "n_micro": 8,                   # optional
      "stage_rank": [0, 1, 2, 3],     # optional: stage s lives on rank stage_rank[s]
      "time_unit": "s"                # optional: "s" for a measured run, "unit" for simulated
    }

Times are numbers on one clock shared by all ranks (a measured run: seconds
since a common origin, e.g. after a barrier at the start of the step).
Compute entries (kind F, B, and any later compute kind) feed the busy time and
the bubble; send/receive entries (SEND_F, RECV_F, SEND_B, RECV_B) may be
included and are kept apart (``Timeline.comm``).

Bubble fraction = total idle over ranks / (p x makespan), idle = makespan -
busy compute time of the rank, makespan = last end - first start over all
ranks. Activations held: +1 at each F, -1 at each B of that rank, so GPipe
peaks at m micro-batches per rank and 1F1B at min(p - r, m) on rank r; for
interleaved the count is in chunks (one (stage, micro-batch) pair each, 1/v
of a rank's layers).

No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from numbers import Rational
from os import PathLike
from typing import Any, Mapping

from xtrain.parallel.pipeline.schedules import (
    B,
    COMM_KINDS,
    F,
    RECV_F,
    RECV_KINDS,
    SEND_KINDS,
    Action,
    Schedule,
)
from xtrain.parallel.pipeline.validate import ScheduleError, validate

TIMELINE_FORMAT = "xtrain.pipeline.timeline/1"


@dataclass(frozen=True)
class Costs:
    """Durations of actions. ``F``/``B``: compute per action (defaults: unit
    costs, F = B = 1); ``kinds``: durations of further compute kinds (``I``,
    ``W``, ...); ``per_stage``: ``(kind, stage) -> duration``, overriding the
    per-kind value (costs measured in a run, :meth:`from_timeline`);
    ``latency``: per message, from the end of the SEND to the data being
    there for the receiver; ``send``/``recv``: time a SEND / RECV action
    occupies its own rank (posting). Use ints or Fractions for exact results.
    """

    F: float = 1
    B: float = 1
    latency: float = 0
    send: float = 0
    recv: float = 0
    kinds: Mapping[str, float] = field(default_factory=dict)
    per_stage: Mapping[tuple[str, int], float] = field(default_factory=dict)

    def duration(self, action: Action) -> float:
        key = (action.kind, action.stage)
        if key in self.per_stage:
            return self.per_stage[key]
        if action.kind == F:
            return self.F
        if action.kind == B:
            return self.B
        if action.kind in SEND_KINDS:
            return self.send
        if action.kind in RECV_KINDS:
            return self.recv
        if action.kind in self.kinds:
            return self.kinds[action.kind]
        raise KeyError(f"no cost for action kind {action.kind!r} (give it in Costs.kinds or Costs.per_stage)")

    @classmethod
    def from_timeline(cls, timeline: "Timeline", latency: float = 0) -> "Costs":
        """Mean measured duration per (kind, stage) of a timeline's compute, for
        re-simulating a run (or another schedule) with measured costs."""
        sums: dict[tuple[str, int], list[float]] = {}
        for row in timeline.intervals:
            for iv in row:
                sums.setdefault((iv.action.kind, iv.action.stage), []).append(iv.end - iv.start)
        per_stage = {key: sum(v) / len(v) for key, v in sums.items()}
        return cls(latency=latency, per_stage=per_stage)


@dataclass(frozen=True)
class Interval:
    """``action`` ran from ``start`` to ``end`` on its rank."""

    start: float
    end: float
    action: Action

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    """Per rank, the compute intervals in execution order (``intervals``) and
    the send/receive intervals (``comm``); simulated or measured."""

    intervals: list[list[Interval]]
    comm: list[list[Interval]] = field(default_factory=list)
    name: str = ""
    n_micro: int | None = None
    stage_rank: list[int] | None = None
    time_unit: str = "unit"

    @property
    def n_ranks(self) -> int:
        return len(self.intervals)

    @property
    def start(self) -> float:
        starts = [iv.start for row in self.intervals for iv in row]
        return min(starts) if starts else 0

    @property
    def end(self) -> float:
        ends = [iv.end for row in self.intervals for iv in row]
        return max(ends) if ends else 0

    @property
    def makespan(self) -> float:
        """Last compute end minus first compute start, over all ranks."""
        return self.end - self.start

    @property
    def busy(self) -> list[float]:
        """Per rank, total compute time."""
        return [sum((iv.end - iv.start for iv in row), 0) for row in self.intervals]

    @property
    def idle(self) -> list[float]:
        """Per rank, makespan minus busy time."""
        span = self.makespan
        return [span - b for b in self.busy]

    @property
    def bubble_fraction(self) -> float:
        """Total idle over ranks / (p x makespan): exact (a Fraction) when
        every time is an int or Fraction, else a float."""
        denominator = self.n_ranks * self.makespan
        if denominator == 0:
            return 0
        numerator = sum(self.idle, 0)
        if isinstance(numerator, Rational) and isinstance(denominator, Rational):
            return Fraction(numerator) / Fraction(denominator)
        return numerator / denominator

    @property
    def peak_activations(self) -> list[int]:
        """Per rank, the most (stage, micro-batch) pairs forwarded and not yet
        backwarded at once (+1 at F, -1 at B, in execution order)."""
        peaks = []
        for row in self.intervals:
            held = peak = 0
            for iv in sorted(row, key=lambda iv: (iv.start, iv.end)):
                if iv.action.kind == F:
                    held += 1
                    peak = max(peak, held)
                elif iv.action.kind == B:
                    held -= 1
            peaks.append(peak)
        return peaks

    def summary(self) -> str:
        """A few lines: makespan, bubble, and per rank busy / idle / peak held."""
        bubble = float(self.bubble_fraction)
        lines = [f"{self.name or 'timeline'}: makespan {float(self.makespan):g} {self.time_unit}, bubble {bubble:.4f}"]
        for r, (b, i, pk) in enumerate(zip(self.busy, self.idle, self.peak_activations)):
            lines.append(f"rank {r}: busy {float(b):g}  idle {float(i):g}  peak activations {pk}")
        return "\n".join(lines)


def simulate(schedule: Schedule, costs: Costs | Mapping[str, float] | None = None, *, check: bool = True) -> Timeline:
    """Run ``schedule``'s lists with ``costs`` (default: unit costs, F = B = 1,
    free communication) and return the :class:`Timeline`.

    ``costs`` may be a :class:`Costs` or a dict of its fields
    (``{"F": 1, "B": 2, "latency": 0.1}``). ``check`` runs :func:`validate`
    first; a deadlock left unchecked raises :class:`ScheduleError` here too.
    """
    if costs is None:
        costs = Costs()
    elif not isinstance(costs, Costs):
        costs = Costs(**dict(costs))
    if check:
        validate(schedule)

    p = schedule.n_ranks
    clock: list[Any] = [0] * p
    pointer = [0] * p
    arrival: dict[tuple[str, int, int], Any] = {}  # message key -> time the data is at the receiver
    feeding: list[dict[Action, tuple[str, int, int]]] = [{} for _ in range(p)]  # compute -> message it waits on
    intervals: list[list[Interval]] = [[] for _ in range(p)]
    comm: list[list[Interval]] = [[] for _ in range(p)]

    progress = True
    while progress:
        progress = False
        for rank, row in enumerate(schedule.actions):
            while pointer[rank] < len(row):
                a = row[pointer[rank]]
                start = clock[rank]
                if a.kind in SEND_KINDS:
                    end = start + costs.duration(a)
                    arrival[schedule.message_key(a)] = end + costs.latency
                    comm[rank].append(Interval(start, end, a))
                elif a.kind in RECV_KINDS:
                    end = start + costs.duration(a)
                    consumer = Action(F if a.kind == RECV_F else B, a.stage, a.mb)
                    feeding[rank][consumer] = schedule.message_key(a)
                    comm[rank].append(Interval(start, end, a))
                else:
                    key = feeding[rank].get(a)
                    if key is not None:
                        if key not in arrival:
                            break  # the peer has not sent yet: try other ranks
                        start = max(start, arrival[key])
                    end = start + costs.duration(a)
                    intervals[rank].append(Interval(start, end, a))
                clock[rank] = end
                pointer[rank] += 1
                progress = True
    stuck = [r for r in range(p) if pointer[r] < len(schedule.actions[r])]
    if stuck:
        raise ScheduleError(
            schedule.name,
            [f"rank {r}, action {pointer[r]} ({schedule.actions[r][pointer[r]]}): deadlock in simulation" for r in stuck],
        )
    return Timeline(
        intervals=intervals,
        comm=comm,
        name=schedule.name,
        n_micro=schedule.n_micro,
        stage_rank=list(schedule.stage_rank),
        time_unit="unit",
    )


# -- JSON -------------------------------------------------------------------------------------


def _number(x: Any) -> float | int:
    return x if isinstance(x, int) else float(x)


def timeline_to_json(timeline: Timeline, path: str | PathLike | None = None) -> dict:
    """The timeline in the JSON format of this module's docstring (compute and
    comm entries of a rank merged, in start order); written to ``path`` if
    given."""
    ranks = []
    for r in range(timeline.n_ranks):
        entries = list(timeline.intervals[r]) + (list(timeline.comm[r]) if r < len(timeline.comm) else [])
        entries.sort(key=lambda iv: (iv.start, iv.end))
        ranks.append(
            [
                {"kind": iv.action.kind, "stage": iv.action.stage, "mb": iv.action.mb, "start": _number(iv.start), "end": _number(iv.end)}
                for iv in entries
            ]
        )
    data: dict[str, Any] = {"format": TIMELINE_FORMAT, "name": timeline.name, "time_unit": timeline.time_unit, "ranks": ranks}
    if timeline.n_micro is not None:
        data["n_micro"] = timeline.n_micro
    if timeline.stage_rank is not None:
        data["stage_rank"] = list(timeline.stage_rank)
    if path is not None:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    return data


def timeline_from_json(source: Mapping[str, Any] | str | PathLike) -> Timeline:
    """A :class:`Timeline` from the JSON format (a parsed dict, or the path of
    a file). Each rank's entries are sorted by start time."""
    if isinstance(source, Mapping):
        data = source
    else:
        with open(source) as f:
            data = json.load(f)
    if "ranks" not in data or not isinstance(data["ranks"], list):
        raise ValueError('a timeline needs "ranks": a list per rank of {"kind","stage","mb","start","end"} entries')
    intervals: list[list[Interval]] = []
    comm: list[list[Interval]] = []
    for r, row in enumerate(data["ranks"]):
        compute_row, comm_row = [], []
        for n, entry in enumerate(row):
            try:
                action = Action(str(entry["kind"]), int(entry["stage"]), int(entry["mb"]))
                iv = Interval(entry["start"], entry["end"], action)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"rank {r}, entry {n}: needs kind, stage, mb, start, end ({e})") from None
            if iv.end < iv.start:
                raise ValueError(f"rank {r}, entry {n} ({action}): ends at {iv.end} before it starts at {iv.start}")
            (comm_row if action.kind in COMM_KINDS else compute_row).append(iv)
        compute_row.sort(key=lambda iv: (iv.start, iv.end))
        comm_row.sort(key=lambda iv: (iv.start, iv.end))
        intervals.append(compute_row)
        comm.append(comm_row)
    return Timeline(
        intervals=intervals,
        comm=comm,
        name=str(data.get("name", "")),
        n_micro=data.get("n_micro"),
        stage_rank=list(data["stage_rank"]) if data.get("stage_rank") is not None else None,
        time_unit=str(data.get("time_unit", "s")),
    )
