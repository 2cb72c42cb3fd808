"""The comm ledger: per rank, every collective's op, group, bytes and wall time.

Training reads it once per optimizer step (``take_step``) to log bytes by
collective into metrics.jsonl, and prints ``summary_rows`` at exit.
Bytes are what this rank's algorithm sends and receives on the wire; for the
built-in (torch) implementation they are the ring algorithm's figures
(nccl-tests' convention), since the library does not report its traffic.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Entry:
    calls: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    time_s: float = 0.0
    messages: int = 0  # point-to-point messages sent (hand-written implementation only)

    def add(self, sent: int, recv: int, seconds: float, messages: int = 0) -> None:
        self.calls += 1
        self.bytes_sent += sent
        self.bytes_recv += recv
        self.time_s += seconds
        self.messages += messages


class Ledger:
    def __init__(self):
        self.enabled = True
        self.total: dict[tuple[str, str], Entry] = defaultdict(Entry)
        self.step: dict[tuple[str, str], Entry] = defaultdict(Entry)

    def record(
        self, op: str, group: str, bytes_sent: int, bytes_recv: int, seconds: float, messages: int = 0
    ) -> None:
        if not self.enabled:
            return
        self.total[(op, group)].add(bytes_sent, bytes_recv, seconds, messages)
        self.step[(op, group)].add(bytes_sent, bytes_recv, seconds, messages)

    def take_step(self) -> dict[str, dict]:
        """Per-collective totals since the last call, keyed "op@group"; then reset."""
        out = {f"{op}@{g}": vars(e).copy() for (op, g), e in sorted(self.step.items())}
        self.step.clear()
        return out

    def reset(self) -> None:
        self.total.clear()
        self.step.clear()

    def summary_rows(self) -> list[tuple[str, str, int, int, int, float]]:
        """(op, group, calls, bytes_sent, bytes_recv, time_s) for every collective seen."""
        return [(op, g, e.calls, e.bytes_sent, e.bytes_recv, e.time_s) for (op, g), e in sorted(self.total.items())]

    def entry(self, op: str, group: str) -> Entry:
        """Totals for one collective on one group (zeros if never seen)."""
        return self.total.get((op, group), Entry())

    def bytes_sent(self, op: str | None = None, group: str | None = None) -> int:
        return sum(
            e.bytes_sent
            for (o, g), e in self.total.items()
            if (op is None or o == op) and (group is None or g == group)
        )
