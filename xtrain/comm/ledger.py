"""The comm ledger: per rank, every collective's op, group, bytes and wall time.

Training reads it once per optimizer step (``take_step``) to log bytes by
collective into metrics.jsonl, and prints ``summary_rows`` at exit.
Bytes are what this rank's algorithm sends and receives on the wire; for the
built-in (torch) implementation they are the ring algorithm's figures
(nccl-tests' convention), since the library does not report its traffic.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


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

    def record(
        self, op: str, group: str, bytes_sent: int, bytes_recv: int, start: float, end: float, blocked: float,
        messages: int = 0,
    ) -> None:
        """One completed call: issued at ``start``, complete at ``end`` (perf_counter
        seconds), ``blocked`` of it spent with the caller waiting."""
        if not self.enabled:
            return
        self.total[(op, group)].add(bytes_sent, bytes_recv, start, end, blocked, messages)
        self.step[(op, group)].add(bytes_sent, bytes_recv, start, end, blocked, messages)

    def take_step(self) -> dict[str, dict]:
        """Per-collective totals since the last call, keyed "op@group"; then reset."""
        out = {f"{op}@{g}": e.as_dict() for (op, g), e in sorted(self.step.items())}
        self.step.clear()
        return out

    def reset(self) -> None:
        self.total.clear()
        self.step.clear()

    def summary_rows(self) -> list[tuple[str, str, int, int, int, float, float]]:
        """(op, group, calls, bytes_sent, bytes_recv, wall_s, blocked_s) for every collective seen."""
        return [
            (op, g, e.calls, e.bytes_sent, e.bytes_recv, e.wall_s, e.blocked_s) for (op, g), e in sorted(self.total.items())
        ]

    def entry(self, op: str, group: str) -> Entry:
        """Totals for one collective on one group (zeros if never seen)."""
        return self.total.get((op, group), Entry())

    def bytes_sent(self, op: str | None = None, group: str | None = None) -> int:
        return sum(
            e.bytes_sent
            for (o, g), e in self.total.items()
            if (op is None or o == op) and (group is None or g == group)
        )
