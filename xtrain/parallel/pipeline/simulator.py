"""Time a pipeline schedule: per-action costs -> each rank's timeline, the
bubble, and the activations held over time.

:func:`simulate` runs a :class:`~xtrain.parallel.pipeline.schedules.Schedule`
the way the executor does: each rank runs its list in order; a send takes
``costs.send`` on its rank and its message arrives ``costs.latency`` later; a
receive is posted at its RECV (``costs.recv`` on its rank) and the compute
that consumes it starts no earlier than the message's arrival. Compute
durations come from :class:`Costs` (per kind, or per (kind, stage) for costs
measured in a run): F, the full backward B, its two halves I (input
gradient) and W (weight gradients), and an OVERLAP of a forward with a
backward (``Costs.overlap``, the DualPipe README's F&B; by default the sum of
its two parts). An OVERLAP waits for the receives of both parts.

The result, a :class:`Timeline`, is the same object a measured run gives
(:func:`timeline_from_json`), so one plot and one set of numbers serve both.

JSON timeline format (written by :func:`timeline_to_json`, read by
:func:`timeline_from_json`; the executor writes it for a measured step)::

    {
      "ranks": [                      # required: one list per pipeline rank
        [{"kind": "F", "stage": 0, "mb": 0, "start": 0.0, "end": 1.0}, ...],
        ...
      ],                              # an OVERLAP entry has stage -1, mb -1 and
                                      # "sub": [{"kind", "stage", "mb"}, {...}]
      "name": "1f1b",                 # optional: the schedule's name
      "n_micro": 8,                   # optional
      "stage_rank": [0, 1, 2, 3],     # optional: stage s lives on rank stage_rank[s]
      "time_unit": "s"                # optional: "s" for a measured run, "unit" for simulated
    }

Times are numbers on one clock shared by all ranks (a measured run: seconds
since a common origin, e.g. after a barrier at the start of the step).
Compute entries (kind F, B, I, W, OVERLAP and any later compute kind) feed
the busy time and the bubble; send/receive entries (SEND_F, RECV_F, SEND_B,
RECV_B) may be included and are kept apart (``Timeline.comm``).

Bubble fraction = total idle over ranks / (p x makespan), idle = makespan -
busy compute time of the rank, makespan = last end - first start over all
ranks. Activations held (``peak_activations``): +1 at each F, -1 at each B
or W (the last part of a split backward) of that rank, so GPipe peaks at m
micro-batches per rank and 1F1B at min(p - r, m) on rank r; for interleaved
and the DualPipes the count is in (stage, micro-batch) pairs, each one
stage's activations of one micro-batch.

Activation memory (``memory`` / ``peak_memory``), in the same units: an F
adds 1 when it starts; a B frees 1 when it ends; an I frees ``1 - a`` and
its W the remaining ``a``, where ``a = act_fraction_after_I`` (default 1/2)
is the share of a micro-batch's activations that the weight gradients still
need after the input gradient has run (for a linear layer: its input X and
the gradient of its output dY, which W multiplies; what only the input
gradient needed, such as the saved softmax or nonlinearity inputs, goes at
I). 1/2 is a round default, not a measurement: set it from the model (for
the executor's split, ``weight_grad.py``, what it keeps per linear layer
between I and W against what the forward saved). An OVERLAP
adds its forward's 1 before its backward frees anything (the peak counts
both at once).

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
    COMM_KINDS,
    OVERLAP,
    RECV_KINDS,
    SEND_KINDS,
    Action,
    B,
    F,
    I,
    Schedule,
    W,
)
from xtrain.parallel.pipeline.validate import ScheduleError, consumer_key, validate

TIMELINE_FORMAT = "xtrain.pipeline.timeline/1"


def _half(x: Any) -> Any:
    return Fraction(x) / 2 if isinstance(x, Rational) else x / 2


@dataclass(frozen=True)
class Costs:
    """Durations of actions, and the memory model.

    ``F``/``B``: forward and *full* backward per action (defaults: unit
    costs, F = B = 1). ``I``/``W``: the split backward's input-gradient and
    weight-gradient parts; each defaults from the other (``I = B - W``,
    ``W = B - I``), and both to half of ``B``. ``overlap``: an OVERLAP (a
    forward and a backward of other micro-batches run together; the DualPipe
    README's F&B), by default the sum of its parts' costs. ``kinds``:
    durations of further compute kinds (an ``"I"``/``"W"`` there counts as
    the field); ``per_stage``: ``(kind, stage) -> duration``, overriding the
    per-kind value (costs measured in a run, :meth:`from_timeline`; an
    OVERLAP's key is ``("OVERLAP", -1)``); ``latency``: per message, from the
    end of the SEND to the data being there for the receiver;
    ``send``/``recv``: time a SEND / RECV action occupies its own rank
    (posting). ``act_fraction_after_I``: the share of a micro-batch's
    activations an I leaves for its W (module docstring). Use ints or
    Fractions for exact results.

    Names: xtrain's B is the DualPipe README's B (full backward); xtrain's I
    is the zero-bubble paper's B (input gradient only).
    """

    F: float = 1
    B: float = 1
    latency: float = 0
    send: float = 0
    recv: float = 0
    kinds: Mapping[str, float] = field(default_factory=dict)
    per_stage: Mapping[tuple[str, int], float] = field(default_factory=dict)
    I: float | None = None  # noqa: E741 (the zero-bubble papers' name)
    W: float | None = None
    overlap: float | None = None
    act_fraction_after_I: float = Fraction(1, 2)

    def __post_init__(self) -> None:
        if not 0 <= self.act_fraction_after_I <= 1:
            raise ValueError(f"act_fraction_after_I must be in [0, 1], got {self.act_fraction_after_I!r}")

    @property
    def input_cost(self) -> Any:
        """The I cost: given, else ``B - W``, else ``B / 2``."""
        i, w = self._given(I), self._given(W)
        if i is not None:
            return i
        return self.B - w if w is not None else _half(self.B)

    @property
    def weight_cost(self) -> Any:
        """The W cost: given, else ``B - I``, else ``B / 2``."""
        i, w = self._given(I), self._given(W)
        if w is not None:
            return w
        return self.B - i if i is not None else _half(self.B)

    def _given(self, kind: str) -> Any:
        value = self.I if kind == I else self.W
        return value if value is not None else self.kinds.get(kind)

    def duration(self, action: Action) -> float:
        key = (action.kind, action.stage)
        if key in self.per_stage:
            return self.per_stage[key]
        if action.kind == F:
            return self.F
        if action.kind == B:
            return self.B
        if action.kind == I:
            return self.input_cost
        if action.kind == W:
            return self.weight_cost
        if action.kind == OVERLAP:
            if self.overlap is not None:
                return self.overlap
            return sum((self.duration(x) for x in action.sub), 0)
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
        return cls(latency=latency, per_stage=per_stage, act_fraction_after_I=timeline.act_fraction_after_I)


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
    act_fraction_after_I: float = Fraction(1, 2)

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
        fully backwarded at once (+1 at F, -1 at B or W, in execution order;
        an OVERLAP counts as its parts)."""
        peaks = []
        for row in self.intervals:
            held = peak = 0
            for iv in sorted(row, key=lambda iv: (iv.start, iv.end)):
                for x in iv.action.parts:
                    if x.kind == F:
                        held += 1
                        peak = max(peak, held)
                    elif x.kind in (B, W):
                        held -= 1
            peaks.append(peak)
        return peaks

    def memory(self, rank: int) -> list[tuple[Any, Any]]:
        """Rank ``rank``'s activation memory over time, in micro-batch-stage
        units: ``(time, held)`` after each change, starting ``(start, 0)``. An F
        adds 1 at its start; at their ends a B frees 1, an I ``1 - a``, a W
        ``a`` (``a = act_fraction_after_I``)."""
        a = self.act_fraction_after_I
        freed = {B: 1, I: 1 - a, W: a}
        held: Any = 0
        points = [(self.start, held)]
        for iv in sorted(self.intervals[rank], key=lambda iv: (iv.start, iv.end)):
            parts = iv.action.parts
            grow = sum(1 for x in parts if x.kind == F)
            if grow:
                held += grow
                points.append((iv.start, held))
            shrink = sum((freed[x.kind] for x in parts if x.kind in freed), 0)
            if shrink:
                held -= shrink
                points.append((iv.end, held))
        return points

    @property
    def peak_memory(self) -> list[Any]:
        """Per rank, the most activation memory held at once (:meth:`memory`),
        in micro-batch-stage units. Equals ``peak_activations`` for fused
        backwards; a split one holds ``a`` per micro-batch between its I and W."""
        return [max(held for _, held in self.memory(r)) for r in range(self.n_ranks)]

    def summary(self) -> str:
        """A few lines: makespan, bubble, and per rank busy / idle / peak held."""
        bubble = float(self.bubble_fraction)
        lines = [f"{self.name or 'timeline'}: makespan {float(self.makespan):g} {self.time_unit}, bubble {bubble:.4f}"]
        rows = zip(self.busy, self.idle, self.peak_activations, self.peak_memory)
        for r, (b, i, pk, mem) in enumerate(rows):
            lines.append(
                f"rank {r}: busy {float(b):g}  idle {float(i):g}  peak activations {pk}  peak memory {float(mem):g}"
            )
        return "\n".join(lines)


def simulate(schedule: Schedule, costs: Costs | Mapping[str, float] | None = None, *, check: bool = True) -> Timeline:
    """Run ``schedule``'s lists with ``costs`` (default: unit costs, F = B = 1,
    I = W = 1/2, free communication) and return the :class:`Timeline`.

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
    # per rank: consumer_key of a compute part -> the message it waits on
    feeding: list[dict[tuple, tuple[str, int, int]]] = [{} for _ in range(p)]
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
                    feeding[rank][consumer_key(a)] = schedule.message_key(a)
                    comm[rank].append(Interval(start, end, a))
                else:
                    keys = [feeding[rank][k] for k in map(consumer_key, a.parts) if k in feeding[rank]]
                    if any(key not in arrival for key in keys):
                        break  # the peer has not sent yet: try other ranks
                    start = max([start] + [arrival[key] for key in keys])
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
        act_fraction_after_I=costs.act_fraction_after_I,
    )


# -- JSON -------------------------------------------------------------------------------------


def _number(x: Any) -> float | int:
    return x if isinstance(x, int) else float(x)


def _action_json(a: Action) -> dict:
    entry: dict[str, Any] = {"kind": a.kind, "stage": a.stage, "mb": a.mb}
    if a.sub:
        entry["sub"] = [_action_json(x) for x in a.sub]
    return entry


def _action_from_json(entry: Mapping[str, Any]) -> Action:
    sub = tuple(_action_from_json(x) for x in entry.get("sub", ()))
    return Action(str(entry["kind"]), int(entry["stage"]), int(entry["mb"]), sub)


def timeline_to_json(timeline: Timeline, path: str | PathLike | None = None) -> dict:
    """The timeline in the JSON format of this module's docstring (compute and
    comm entries of a rank merged, in start order); written to ``path`` if
    given."""
    ranks = []
    for r in range(timeline.n_ranks):
        entries = list(timeline.intervals[r]) + (list(timeline.comm[r]) if r < len(timeline.comm) else [])
        entries.sort(key=lambda iv: (iv.start, iv.end))
        ranks.append([dict(_action_json(iv.action), start=_number(iv.start), end=_number(iv.end)) for iv in entries])
    data: dict[str, Any] = {"format": TIMELINE_FORMAT, "name": timeline.name, "time_unit": timeline.time_unit, "ranks": ranks}
    if timeline.act_fraction_after_I != Fraction(1, 2):
        data["act_fraction_after_I"] = _number(timeline.act_fraction_after_I)
    if timeline.n_micro is not None:
        data["n_micro"] = timeline.n_micro
    if timeline.stage_rank is not None:
        data["stage_rank"] = list(timeline.stage_rank)
    if path is not None:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    return data


def chrome_trace_to_json(trace: Mapping[str, Any], step: int | None = None) -> dict:
    """The timeline format from a run's Chrome trace (``train.trace=true``:
    ``RUN/trace.json``): one step's actions per rank (the last step by default),
    times in seconds from that step's first action."""
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "kind" in e.get("args", {})]
    if not spans:
        raise ValueError("the trace holds no pipeline actions")
    step = max(e["args"]["step"] for e in spans) if step is None else step
    spans = [e for e in spans if e["args"]["step"] == step]
    if not spans:
        raise ValueError(f"the trace has no step {step}")
    t0, n_ranks = min(e["ts"] for e in spans), max(e["pid"] for e in spans) + 1
    ranks: list[list[dict]] = [[] for _ in range(n_ranks)]
    for e in spans:
        a = e["args"]
        start = (e["ts"] - t0) / 1e6
        ranks[e["pid"]].append({"kind": a["kind"], "stage": a["stage"], "mb": a["mb"], "start": start, "end": start + e["dur"] / 1e6})
    return {"ranks": ranks, "name": f"measured, step {step}", "time_unit": "s"}


def timeline_from_json(source: Mapping[str, Any] | str | PathLike) -> Timeline:
    """A :class:`Timeline` from the JSON format (a parsed dict, or the path of
    a file), or from a run's Chrome trace (its last step). Each rank's entries
    are sorted by start time."""
    if isinstance(source, Mapping):
        data = source
    else:
        with open(source) as f:
            data = json.load(f)
    if "traceEvents" in data:
        data = chrome_trace_to_json(data)
    if "ranks" not in data or not isinstance(data["ranks"], list):
        raise ValueError('a timeline needs "ranks": a list per rank of {"kind","stage","mb","start","end"} entries')
    intervals: list[list[Interval]] = []
    comm: list[list[Interval]] = []
    for r, row in enumerate(data["ranks"]):
        compute_row, comm_row = [], []
        for n, entry in enumerate(row):
            try:
                action = _action_from_json(entry)
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
        act_fraction_after_I=data.get("act_fraction_after_I", Fraction(1, 2)),
    )
