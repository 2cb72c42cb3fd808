"""The comm ledger: per rank, every collective's op, group, bytes and wall time.

Keys are ``(op, group)``: ``op`` is the name of the method the caller
called (``all_gather_into_tensor`` and ``all_gather`` are two keys, so are
``isend`` and ``send``), ``group`` the group's label (``groups.group_label``:
its mesh axes, "world", or its ranks such as ``g[0,2]``), so no two groups
share an entry.

Training reads it once per optimizer step (``take_step``) to log bytes by
collective into metrics.jsonl, and prints ``summary_rows`` at exit.
``Comm.ledger_table`` gathers every rank's ledger into one table
(``merge`` / ``format_table`` here).
Bytes are what this rank's algorithm sends and receives on the wire; for the
built-in (torch) implementation they are the ring algorithm's figures
(nccl-tests' convention), since the library does not report its traffic.

Async calls are recorded by whatever completes them (a comm thread, or the
backend's own future), so the ledger is thread-safe; the time the caller
then spends in ``wait()`` is added to ``blocked_s`` when it returns.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

# Ledger keys of the methods that share an algorithm family (``xtrain.formulas``' names).
FAMILY = {
    "all_gather_into_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "all_gather": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "all_to_all": "all_to_all",
}


def op_family(op: str) -> str:
    """The algorithm family of a ledger op (``all_gather_into_tensor`` -> ``all_gather``)."""
    return FAMILY.get(op, op)


@dataclass
class Entry:
    """Totals for one collective on one group.

    Two times, because async calls overlap each other and the computation:

    - ``wall_s``: wall time during which at least one call was in flight, from
      issue to completion, with overlapping calls merged (a union of intervals),
      so it never exceeds the run's own wall time;
    - ``blocked_s``: time the calling thread spent waiting on the op (inside a
      synchronous call, or inside ``wait()`` of an async one): the part that
      communication did not hide behind compute.
    """

    calls: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    wall_s: float = 0.0
    blocked_s: float = 0.0
    messages: int = 0  # point-to-point messages sent (hand-written implementation only)
    _covered_until: float = field(default=float("-inf"), repr=False)

    def add(self, sent: int, recv: int, start: float, end: float, blocked: float, messages: int = 0) -> None:
        self.calls += 1
        self.bytes_sent += sent
        self.bytes_recv += recv
        # Calls are recorded as they complete, so ends arrive in time order and
        # the union grows by the part of [start, end] past what is covered.
        self.wall_s += max(0.0, end - max(start, self._covered_until))
        self._covered_until = max(self._covered_until, end)
        self.blocked_s += blocked
        self.messages += messages

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class Ledger:
    def __init__(self):
        self.enabled = True
        self.total: dict[tuple[str, str], Entry] = defaultdict(Entry)
        self.step: dict[tuple[str, str], Entry] = defaultdict(Entry)
        self._lock = threading.Lock()

    def record(
        self, op: str, group: str, bytes_sent: int, bytes_recv: int, start: float, end: float | None, blocked: float,
        messages: int = 0,
    ) -> None:
        """One completed call: issued at ``start``, complete at ``end`` (perf_counter
        seconds; ``None``: now), ``blocked`` of it spent with the caller waiting."""
        if not self.enabled:
            return
        key = (op, group)
        with self._lock:
            if end is None:
                end = time.perf_counter()
            self.total[key].add(bytes_sent, bytes_recv, start, end, blocked, messages)
            self.step[key].add(bytes_sent, bytes_recv, start, end, blocked, messages)

    def add_blocked(self, op: str, group: str, seconds: float) -> None:
        """Time a caller spent in ``wait()`` on an async call already recorded."""
        if not self.enabled or seconds <= 0:
            return
        key = (op, group)
        with self._lock:
            self.total[key].blocked_s += seconds
            self.step[key].blocked_s += seconds

    def take_step(self) -> dict[str, dict]:
        """Per-collective totals since the last call, keyed "op@group"; then reset."""
        with self._lock:
            out = {f"{op}@{g}": e.as_dict() for (op, g), e in sorted(self.step.items())}
            self.step.clear()
        return out

    def reset(self) -> None:
        with self._lock:
            self.total.clear()
            self.step.clear()

    def summary_rows(self) -> list[tuple[str, str, int, int, int, float, float]]:
        """(op, group, calls, bytes_sent, bytes_recv, wall_s, blocked_s) for every collective seen."""
        with self._lock:
            items = sorted(self.total.items())
        return [(op, g, e.calls, e.bytes_sent, e.bytes_recv, e.wall_s, e.blocked_s) for (op, g), e in items]

    def entry(self, op: str, group: str) -> Entry:
        """Totals for one collective (the method name called) on one group label (zeros if never seen)."""
        with self._lock:
            return self.total.get((op, group), Entry())

    def bytes_sent(self, op: str | None = None, group: str | None = None) -> int:
        with self._lock:
            items = list(self.total.items())
        return sum(e.bytes_sent for (o, g), e in items if (op is None or o == op) and (group is None or g == group))


# ---- every rank's ledger in one table -------------------------------------------


def merge(per_rank: list[list[tuple]], ranks: list[int]) -> list[dict]:
    """One row per (op, group) from each rank's ``summary_rows``: figures by global rank.

    Each row: ``op``, ``group``, and ``calls``, ``bytes_sent``, ``bytes_recv``,
    ``wall_s``, ``blocked_s`` as ``{rank: value}`` (ranks that never called it
    are absent).
    """
    rows: dict[tuple[str, str], dict] = {}
    fields = ("calls", "bytes_sent", "bytes_recv", "wall_s", "blocked_s")
    for rank, summary in zip(ranks, per_rank):
        for op, g, *values in summary:
            row = rows.setdefault((op, g), {"op": op, "group": g, **{f: {} for f in fields}})
            for f, v in zip(fields, values):
                row[f][rank] = v
    return [rows[k] for k in sorted(rows)]


def format_table(rows: list[dict]) -> str:
    """A plain-text table of ``merge``'s rows: one line per op, group and rank."""

    def human(n: float) -> str:
        for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if n >= scale:
                return f"{n / scale:.1f} {unit}"
        return f"{int(n)} B"

    head = f"{'op':<24} {'group':<12} {'rank':>4} {'calls':>6} {'sent':>11} {'received':>11} {'in flight':>10} {'blocked':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        for rank in sorted(r["calls"]):
            lines.append(
                f"{r['op']:<24} {r['group']:<12} {rank:>4} {r['calls'][rank]:>6} {human(r['bytes_sent'][rank]):>11} "
                f"{human(r['bytes_recv'][rank]):>11} {r['wall_s'][rank] * 1e3:>8.2f}ms {r['blocked_s'][rank] * 1e3:>8.2f}ms"
            )
    return "\n".join(lines)
