"""Which columns of each sequence a context-parallel rank holds, and which
attention blocks it computes: pure data, no torch.distributed.

A sequence of T columns is cut into equal chunks. ``contiguous``: cp chunks,
rank r holds chunk r. ``zigzag`` (Megatron CP, ring-flash-attention's
zigzag): 2·cp chunks, rank r holds chunks r and 2·cp−1−r, so under a causal
mask every rank has the same work (an early and a late chunk).

A block plan lists, for a query rank and the rank whose keys/values it holds,
the pieces of attention to compute in local coordinates, each either full
(every key visible) or causal (the diagonal): query chunk a sees key chunk b
fully when b < a, causally when b == a, and not at all when b > a. Chunks a
rank holds are in increasing order, so its own block is one causal block
over its whole local sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class Block:
    """Local query rows [q_lo, q_hi) against local key columns [k_lo, k_hi), in chunk units."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    causal: bool

    def scaled(self, c: int) -> tuple[slice, slice, bool]:
        """(query slice, key slice, causal) in columns, for chunks of ``c`` columns."""
        return slice(self.q_lo * c, self.q_hi * c), slice(self.k_lo * c, self.k_hi * c), self.causal

    def area(self) -> float:
        """Query-key pairs computed, in chunk² units (a causal c × c block counts as ½)."""
        n = (self.q_hi - self.q_lo) * (self.k_hi - self.k_lo)
        return n / 2 if self.causal else float(n)


@dataclass(frozen=True)
class SequenceLayout:
    """The cut of each sequence over ``cp`` ranks (``kind`` in LAYOUTS)."""

    kind: str
    cp: int

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"strategy.cp_layout={self.kind!r} is not one of {list(LAYOUTS)}")

    @property
    def n_chunks(self) -> int:
        return 2 * self.cp if self.kind == "zigzag" else self.cp

    @property
    def chunks_per_rank(self) -> int:
        return self.n_chunks // self.cp

    def chunks(self, rank: int) -> tuple[int, ...]:
        """The chunk indices rank ``rank`` holds, in increasing order."""
        if self.kind == "zigzag":
            return (rank, 2 * self.cp - 1 - rank)
        return (rank,)

    def columns(self, rank: int, seq_len: int) -> torch.Tensor:
        """The global columns (= rotary positions) rank ``rank`` holds, in local order."""
        return _columns(self, rank, seq_len)

    def natural_order(self, seq_len: int) -> torch.Tensor:
        """Index that sorts the concatenation of every rank's columns (rank order)
        into position order: ``gathered[:, natural_order]`` is the whole sequence."""
        return _natural_order(self, seq_len)

    def plan(self, q_rank: int, kv_rank: int) -> tuple[Block, ...]:
        """The blocks rank ``q_rank`` computes with the keys/values of ``kv_rank``."""
        return _plan(self, q_rank, kv_rank)

    def work(self, rank: int) -> float:
        """Query-key pairs rank ``rank`` computes over all kv ranks, in chunk² units."""
        return sum(b.area() for j in range(self.cp) for b in self.plan(rank, j))


@cache
def _plan(layout: SequenceLayout, q_rank: int, kv_rank: int) -> tuple[Block, ...]:
    n = layout.chunks_per_rank
    if q_rank == kv_rank:
        return (Block(0, n, 0, n, True),)
    qch, kch = layout.chunks(q_rank), layout.chunks(kv_rank)
    # key chunks are increasing, so the visible ones of a query chunk are a prefix
    visible = [sum(b < a for b in kch) for a in qch]
    blocks, i = [], 0
    while i < n:
        j = i
        while j + 1 < n and visible[j + 1] == visible[i]:
            j += 1
        if visible[i]:
            blocks.append(Block(i, j + 1, 0, visible[i], False))
        i = j + 1
    return tuple(blocks)


@cache
def _columns(layout: SequenceLayout, rank: int, seq_len: int) -> torch.Tensor:
    c = seq_len // layout.n_chunks
    return torch.cat([torch.arange(ch * c, (ch + 1) * c) for ch in layout.chunks(rank)])


@cache
def _natural_order(layout: SequenceLayout, seq_len: int) -> torch.Tensor:
    gathered = torch.cat([layout.columns(r, seq_len) for r in range(layout.cp)])
    return torch.argsort(gathered)


def check_layout(kind: str, cp: int, seq_len: int) -> list[str]:
    """Why this cut cannot be made (empty when it can)."""
    if kind not in LAYOUTS:
        return [f"strategy.cp_layout={kind!r} is not one of {list(LAYOUTS)}"]
    parts = 2 * cp if kind == "zigzag" else cp
    if seq_len % parts:
        why = f"{'2·cp' if kind == 'zigzag' else 'cp'}: strategy.cp_layout={kind} cuts each sequence into {parts} chunks"
        return [f"train.seq_len={seq_len} is not divisible by {parts} ({why})"]
    return []


def ring_table(layout: SequenceLayout) -> list[list[str]]:
    """For the docs: row per rank, column per ring step, what the rank computes
    with the block it holds then (``full``, ``causal``, ``half``: a fraction of
    the block, ``skip``)."""
    rows = []
    for r in range(layout.cp):
        row = []
        for s in range(layout.cp):
            j = (r - s) % layout.cp
            blocks = layout.plan(r, j)
            area = sum(b.area() for b in blocks)
            full = layout.chunks_per_rank**2
            word = "skip" if not blocks else "causal" if blocks[0].causal else "full" if area == full else f"{area / full:g}"
            row.append(f"kv{j}:{word}")
        rows.append(row)
    return rows
