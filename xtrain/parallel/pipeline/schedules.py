"""Pipeline schedules as data: per rank, an ordered list of actions.

A schedule says, for every pipeline rank, what to run and in what order:
forward ``F`` and full backward ``B`` of (stage, micro-batch), and the
point-to-point messages between ranks (``SEND_F``/``RECV_F`` carry a stage's
output activation downstream, ``SEND_B``/``RECV_B`` carry the gradient of a
stage's input upstream). One executor runs any such list; ``validate.py``
rejects a list that would skip work or deadlock before anything runs;
``simulator.py`` times it with per-action costs. A new schedule is a new
generator here, not a new executor.

Every generator builds the *compute order* only (F and B per rank) and hands
it to :func:`add_communication`, the one place that inserts sends and
receives (as torch.distributed.pipelining lowers its compute-only tables).

Schedules here:

- :func:`gpipe`: all forwards, then all backwards (Huang et al., 2019,
  "GPipe", arXiv:1811.06965). Holds m micro-batches of activations.
- :func:`one_f_one_b`: PipeDream-Flush (Narayanan et al., 2021,
  "Memory-Efficient Pipeline-Parallel DNN Training", arXiv:2006.09503):
  p-1-r warm-up forwards on rank r, then one forward / one backward, then the
  cool-down backwards. Same bubble as GPipe, at most p micro-batches held.
- :func:`interleaved_1f1b`: Megatron-LM's interleaved schedule (Narayanan
  et al., 2021, "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM", arXiv:2104.04473): v model chunks per rank,
  stage s on rank s % p, the bubble shrinks by v. Needs m >= p and m
  divisible into m // p equal groups (every multiple of p qualifies).

Text format of one action (torch's): ``{stage}{kind}{mb}``, e.g. ``0F3`` is
the forward of micro-batch 3 on stage 0, ``2SEND_B5`` sends stage 2's input
gradient of micro-batch 5 upstream. Kinds are upper-case letters and
underscores (no digits), so the text parses back unambiguously
(:meth:`Action.parse`).

Message semantics (the contract with the executor). Stage s's neighbours are
s-1 and s+1 (:meth:`Schedule.prev_stage` / :meth:`Schedule.next_stage`, the
one place to change for schedules whose micro-batches take other paths):

- ``F(s, i)`` needs stage s's input: the batch if s is the first stage; the
  output of ``F(s-1, i)`` handed over locally if stage s-1 lives on the same
  rank; otherwise a preceding ``RECV_F(s, i)``.
- ``SEND_F(s, i)`` follows ``F(s, i)`` when stage s+1 lives on another rank;
  it matches ``RECV_F(s+1, i)`` on that rank.
- ``B(s, i)`` needs ``F(s, i)`` earlier on the same rank and the gradient of
  stage s's output: from the loss on the last stage, locally from
  ``B(s+1, i)`` if stage s+1 is on the same rank, else a preceding
  ``RECV_B(s, i)``.
- ``SEND_B(s, i)`` follows ``B(s, i)`` when stage s-1 lives on another rank;
  it matches ``RECV_B(s-1, i)`` there.
- Sends never block. A receive is posted at its RECV action and waited on
  just before the compute that consumes it. Each message is identified by
  :meth:`Schedule.message_key` (payload kind, producing stage, micro-batch),
  which an executor can turn into a distinct tag.

No torch here (nor in validate.py or simulator.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

# -- actions ----------------------------------------------------------------------------------

F = "F"  # forward of (stage, mb)
B = "B"  # full backward of (stage, mb): input gradient and weight gradient together
SEND_F = "SEND_F"  # send stage's output activation to the next stage's rank
RECV_F = "RECV_F"  # receive stage's input activation from the previous stage's rank
SEND_B = "SEND_B"  # send the gradient of stage's input to the previous stage's rank
RECV_B = "RECV_B"  # receive the gradient of stage's output from the next stage's rank

COMPUTE_KINDS = frozenset({F, B})
SEND_KINDS = frozenset({SEND_F, SEND_B})
RECV_KINDS = frozenset({RECV_F, RECV_B})
COMM_KINDS = SEND_KINDS | RECV_KINDS
KINDS = COMPUTE_KINDS | COMM_KINDS  # the kinds validate() and simulate() know today

_ACTION_RE = re.compile(r"^\s*(\d+)([A-Z][A-Z_]*)(\d+)\s*$")


@dataclass(frozen=True)
class Action:
    """One step of one rank: ``kind`` of micro-batch ``mb`` on stage ``stage``.

    For ``SEND_F`` the stage is the one whose output is sent; for ``RECV_F``
    the one that receives its input; for ``SEND_B`` the one whose input
    gradient is sent upstream; for ``RECV_B`` the one that receives the
    gradient of its output. ``str(a)`` is ``{stage}{kind}{mb}`` (``0F3``,
    ``1RECV_B2``); :meth:`parse` reads it back.
    """

    kind: str
    stage: int
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.mb}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """``"0F3"`` -> ``Action("F", 0, 3)``; any upper-case kind parses (new
        kinds such as ``I`` or ``W`` need no change here)."""
        match = _ACTION_RE.match(text)
        if match is None:
            raise ValueError(f"cannot parse action {text!r}: expected {{stage}}{{KIND}}{{mb}}, e.g. '0F3' or '1SEND_B2'")
        return cls(match.group(2), int(match.group(1)), int(match.group(3)))

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @property
    def is_send(self) -> bool:
        return self.kind in SEND_KINDS

    @property
    def is_recv(self) -> bool:
        return self.kind in RECV_KINDS


def parse_actions(text: str) -> list[Action]:
    """A whitespace-separated row such as ``"0F0 0SEND_F0 0F1"`` -> actions."""
    return [Action.parse(tok) for tok in text.split()]


# -- schedules --------------------------------------------------------------------------------


@dataclass
class Schedule:
    """Per-rank action lists for ``n_ranks`` ranks and ``n_micro`` micro-batches.

    Stages are ``0..S-1`` in model order; stage s lives on rank
    ``stage_rank[s]`` (any map: round-robin for interleaved, a V for
    DualPipeV). ``actions[r]`` is rank r's list in execution order.
    """

    name: str
    n_ranks: int
    n_micro: int
    stage_rank: list[int]
    actions: list[list[Action]]

    @property
    def n_stages(self) -> int:
        return len(self.stage_rank)

    def stages_of(self, rank: int) -> list[int]:
        """The stages rank ``rank`` holds, in model order."""
        return [s for s, r in enumerate(self.stage_rank) if r == rank]

    def rank_of(self, stage: int) -> int:
        return self.stage_rank[stage]

    def prev_stage(self, stage: int) -> int | None:
        """The stage feeding ``stage`` its input (None for the first stage)."""
        return stage - 1 if stage > 0 else None

    def next_stage(self, stage: int) -> int | None:
        """The stage consuming ``stage``'s output (None for the last stage)."""
        return stage + 1 if stage + 1 < self.n_stages else None

    def peer(self, action: Action) -> int:
        """The rank at the other end of a send or receive."""
        neighbour = self._neighbour(action)
        if neighbour is None:
            way = "next" if action.kind in (SEND_F, RECV_B) else "previous"
            raise ValueError(f"{action} has no peer: stage {action.stage} has no {way} stage")
        return self.stage_rank[neighbour]

    def match(self, action: Action) -> Action:
        """The peer's action that completes this send or receive:
        ``SEND_F(s, i)`` <-> ``RECV_F(s+1, i)``, ``SEND_B(s, i)`` <-> ``RECV_B(s-1, i)``."""
        neighbour = self._neighbour(action)
        if neighbour is None:
            raise ValueError(f"{action} has no matching action: stage {action.stage} has no neighbour that way")
        other = {SEND_F: RECV_F, RECV_F: SEND_F, SEND_B: RECV_B, RECV_B: SEND_B}[action.kind]
        return Action(other, neighbour, action.mb)

    def message_key(self, action: Action) -> tuple[str, int, int]:
        """What a send or receive carries, the same on both ends:
        ``("F", s, i)`` for the output of F(s, i), ``("B", s, i)`` for the input
        gradient from B(s, i). An executor can derive a distinct tag from it."""
        if action.kind == SEND_F:
            return (F, action.stage, action.mb)
        if action.kind == SEND_B:
            return (B, action.stage, action.mb)
        if action.kind in RECV_KINDS:
            return self.message_key(self.match(action))
        raise ValueError(f"{action} is not a send or receive")

    def _neighbour(self, action: Action) -> int | None:
        if action.kind in (SEND_F, RECV_B):
            return self.next_stage(action.stage)
        if action.kind in (RECV_F, SEND_B):
            return self.prev_stage(action.stage)
        raise ValueError(f"{action} is not a send or receive")

    def compute_order(self) -> list[list[Action]]:
        """Per rank, the compute actions only (sends and receives dropped)."""
        return [[a for a in row if a.is_compute] for row in self.actions]

    def table(self, comm: bool = True) -> str:
        """One row per rank of compact action strings (see :func:`format_schedule`)."""
        return format_schedule(self, comm=comm)

    def __str__(self) -> str:
        return self.table()


def format_schedule(schedule: Schedule, comm: bool = True) -> str:
    """A header line, then ``rank r | a0 a1 ...`` per rank; ``comm=False``
    shows the compute order only. Every row parses back with
    :func:`parse_actions` after the ``|``."""
    rows = schedule.actions if comm else schedule.compute_order()
    width = max((len(str(a)) for row in rows for a in row), default=1)
    head = (
        f"{schedule.name}: p={schedule.n_ranks} m={schedule.n_micro} stages={schedule.n_stages} "
        f"stage_rank={schedule.stage_rank}"
    )
    lines = [head]
    for rank, row in enumerate(rows):
        lines.append(f"rank {rank} | " + " ".join(str(a).ljust(width) for a in row).rstrip())
    return "\n".join(lines)


# -- the one communication pass ---------------------------------------------------------------


def add_communication(
    stage_rank: Sequence[int],
    compute: Sequence[Sequence[Action]],
    prev_stage: Callable[[int], int | None] | None = None,
    next_stage: Callable[[int], int | None] | None = None,
) -> list[list[Action]]:
    """Lower compute-only lists to full lists: every cross-rank input gets a
    RECV right before its consumer, every cross-rank output a SEND right
    after its producer. Same-rank neighbours hand over locally (no action).

    Receives are placed just in time, so a list is deadlock-free exactly when
    its compute order is (a rank never waits at a RECV before reaching the
    compute that needs it). Neighbours default to :class:`Schedule`'s
    (s-1 and s+1).
    """
    chain = Schedule("", len(compute), 0, list(stage_rank), [])
    prev_stage = prev_stage or chain.prev_stage
    next_stage = next_stage or chain.next_stage

    def remote(rank: int, stage: int | None) -> bool:
        return stage is not None and stage_rank[stage] != rank

    lowered: list[list[Action]] = []
    for rank, row in enumerate(compute):
        out: list[Action] = []
        for a in row:
            if a.kind == F:
                if remote(rank, prev_stage(a.stage)):
                    out.append(Action(RECV_F, a.stage, a.mb))
                out.append(a)
                if remote(rank, next_stage(a.stage)):
                    out.append(Action(SEND_F, a.stage, a.mb))
            elif a.kind == B:
                if remote(rank, next_stage(a.stage)):
                    out.append(Action(RECV_B, a.stage, a.mb))
                out.append(a)
                if remote(rank, prev_stage(a.stage)):
                    out.append(Action(SEND_B, a.stage, a.mb))
            else:
                raise ValueError(f"add_communication takes compute actions only; got {a} on rank {rank}")
        lowered.append(out)
    return lowered


def from_compute(
    name: str, n_ranks: int, n_micro: int, stage_rank: Sequence[int], compute: Sequence[Sequence[Action]]
) -> Schedule:
    """A :class:`Schedule` from a compute-only table, sends and receives added
    by :func:`add_communication` (the path every generator takes)."""
    return Schedule(name, n_ranks, n_micro, list(stage_rank), add_communication(stage_rank, compute))


# -- generators -------------------------------------------------------------------------------


def gpipe(p: int, m: int) -> Schedule:
    """GPipe (Huang et al., 2019, arXiv:1811.06965): every rank runs the
    forwards of all m micro-batches, then their backwards (in the same
    micro-batch order). Stage r on rank r. Bubble (p-1)/(m+p-1); every rank
    holds the activations of all m micro-batches at the turn."""
    _raise_on_problems("gpipe", p, m, 1)
    compute = [[Action(F, r, i) for i in range(m)] + [Action(B, r, i) for i in range(m)] for r in range(p)]
    return from_compute("gpipe", p, m, list(range(p)), compute)


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B, PipeDream-Flush (Narayanan et al., 2021, arXiv:2006.09503).

    Rank r (stage r) runs w = min(p-1-r, m) warm-up forwards, then m-w steady
    pairs (forward of micro-batch w+k, backward of micro-batch k), then the w
    cool-down backwards. The bubble is GPipe's, (p-1)/(m+p-1), but rank r
    holds at most min(p-r, m) micro-batches of activations instead of m.
    """
    _raise_on_problems("1f1b", p, m, 1)
    compute = []
    for r in range(p):
        warmup = min(p - 1 - r, m)
        row = [Action(F, r, i) for i in range(warmup)]
        for k in range(m - warmup):
            row += [Action(F, r, warmup + k), Action(B, r, k)]
        row += [Action(B, r, i) for i in range(m - warmup, m)]
        compute.append(row)
    return from_compute("1f1b", p, m, list(range(p)), compute)


def interleaved_group_size(p: int, m: int) -> int:
    """Micro-batches per group in :func:`interleaved_1f1b`: p when m % p == 0
    (Megatron-LM), else m split into ``m // p`` equal groups (each of p to
    2p-1 micro-batches). Only meaningful where :func:`interleaved_allows`
    holds."""
    return m // max(1, m // p)


def interleaved_allows(p: int, m: int) -> bool:
    """The rule on m: at least p micro-batches, divisible into m // p equal
    groups. True for every multiple of p and for every m in [p, 2p)."""
    return m >= p and m % (m // p) == 0


def interleaved_warmup(p: int, m: int, v: int, rank: int) -> int:
    """Warm-up forwards on ``rank`` in :func:`interleaved_1f1b`:
    ``min((v-1)·g + 2·(p-1-rank), v·m)`` with g the group size (Megatron-LM's
    count, g = p when m % p == 0)."""
    return min((v - 1) * interleaved_group_size(p, m) + 2 * (p - 1 - rank), v * m)


def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Interleaved 1F1B (Narayanan et al., 2021, arXiv:2104.04473, Megatron-LM).

    There are S = p·v stages; stage s lives on rank s % p, so rank r holds
    the v model chunks r, r+p, ..., r+(v-1)p. Micro-batches go in groups of
    g (:func:`interleaved_group_size`; g = p when m % p == 0): rank r runs
    the forwards of a group on chunk 0, then on chunk 1, ..., then the next
    group, i.e. its k-th forward is chunk (k mod gv) div g of micro-batch
    (k div gv)·g + k mod g. Backwards run in the same order with the chunks
    reversed (chunk v-1 first). Rank r starts with :func:`interleaved_warmup`
    = min((v-1)g + 2(p-1-r), vm) forwards, then alternates one forward and
    one backward, then drains the remaining backwards.

    Rule on m (:func:`interleaved_allows`): m >= p and m % (m // p) == 0:
    Megatron's m % p == 0, relaxed to any m that splits into m // p equal
    groups of p to 2p-1 micro-batches (torch.distributed.pipelining relaxes
    it the same way, and also runs m < p, which we refuse: the bubble then
    exceeds the closed form)
    (p = 4: m = 4, 5, 6, 7, 8, 10, 12, 15, 16, ... but not 9, 11, 13, 14).
    For every allowed shape, with unit costs (any F and B, the same for every
    action) and free communication, the bubble is exactly (p-1)/(v·m+p-1).
    Rank r holds at most min(w_r + 1, v·m) chunks of activations, w_r the
    warm-up count. v = 1 is allowed: 1F1B's bubble with a deeper warm-up.
    """
    _raise_on_problems("interleaved_1f1b", p, m, v)
    group = interleaved_group_size(p, m)

    def chunk_and_mb(k: int) -> tuple[int, int]:
        in_group = k % (group * v)
        return in_group // group, (k // (group * v)) * group + in_group % group

    total = v * m
    compute = []
    for r in range(p):
        forwards, backwards = [], []
        for k in range(total):
            chunk, mb = chunk_and_mb(k)
            forwards.append(Action(F, chunk * p + r, mb))
            backwards.append(Action(B, (v - 1 - chunk) * p + r, mb))
        warmup = interleaved_warmup(p, m, v, r)
        row = forwards[:warmup]
        for k in range(total - warmup):
            row += [forwards[warmup + k], backwards[k]]
        row += backwards[total - warmup :]
        compute.append(row)
    stage_rank = [s % p for s in range(p * v)]
    return from_compute("interleaved_1f1b", p, m, stage_rank, compute)


# -- registry and config rules ----------------------------------------------------------------

SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
}
# Schedules that take v (strategy.pp_chunks, stages per rank); the others take (p, m) and need v == 1.
CHUNKED_SCHEDULES = frozenset({"interleaved_1f1b"})


def interleaved_problems(p: int, m: int, v: int) -> list[str]:
    """The rule on m for :func:`interleaved_1f1b` (:func:`interleaved_allows`),
    as a message naming the nearest allowed values."""
    if interleaved_allows(p, m):
        return []
    lower = next((k for k in range(m - 1, p - 1, -1) if interleaved_allows(p, k)), None)
    upper = next(k for k in range(max(m + 1, p), 2 * max(m, p) + 1) if interleaved_allows(p, k))
    near = f"{lower} or {upper}" if lower is not None else f"{upper}"
    return [
        f"interleaved_1f1b needs micro_batches >= pp, split into micro_batches // pp equal groups "
        f"(micro_batches % (micro_batches // pp) == 0; every multiple of pp qualifies): "
        f"got micro_batches={m}, pp={p}; use {near}"
    ]


def schedule_problems(name: str, p: int, m: int, v: int = 1) -> list[str]:
    """Every problem with building schedule ``name`` for p ranks, m
    micro-batches and v stages per rank (empty when it can be built)."""
    problems = []
    if name not in SCHEDULES:
        return [f"unknown pipeline schedule {name!r}; choose one of: {', '.join(SCHEDULES)}"]
    for key, value in (("pp", p), ("micro_batches", m), ("pp_chunks", v)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{key} must be an integer >= 1, got {value!r}")
    if problems:
        return problems
    if name in CHUNKED_SCHEDULES:
        if name == "interleaved_1f1b":
            problems += interleaved_problems(p, m, v)
    elif v != 1:
        problems.append(
            f"pp_chunks must be 1 for {name} (one stage per rank), got {v}; "
            f"only {', '.join(sorted(CHUNKED_SCHEDULES))} holds several stages per rank"
        )
    return problems


def check_schedule_config(name: str, p: int, m: int, v: int, n_layers: int) -> list[str]:
    """Every problem with ``strategy.pp_schedule=name``, ``strategy.pp=p``,
    ``train.micro_batches=m``, ``strategy.pp_chunks=v`` on a model of
    ``n_layers`` blocks, for config validation before any process starts.

    Rules: the schedule is known; p, m, v are integers >= 1; v == 1 unless
    the schedule is chunked (interleaved_1f1b accepts any v >= 1; v = 1 is
    valid and has 1F1B's bubble with a deeper warm-up); interleaved_1f1b
    needs m >= p and m % (m // p) == 0 (:func:`interleaved_allows`); the
    model has at least one layer per stage (n_layers >= p·v; layers need
    not divide evenly over the stages).
    """
    problems = schedule_problems(name, p, m, v)
    shaped = all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (p, v))
    if name in SCHEDULES and shaped:
        stages = p * v
        if not isinstance(n_layers, int) or n_layers < stages:
            problems.append(
                f"the model has {n_layers} layers but {name} with pp={p} and pp_chunks={v} "
                f"needs {stages} stages of at least one layer each"
            )
    return problems


def build_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """The schedule ``name`` (a key of :data:`SCHEDULES`) for p ranks, m
    micro-batches and v stages per rank; ``ValueError`` names the rule broken."""
    _raise_on_problems(name, p, m, v)
    if name in CHUNKED_SCHEDULES:
        return SCHEDULES[name](p, m, v)
    return SCHEDULES[name](p, m)


def _raise_on_problems(name: str, p: int, m: int, v: int) -> None:
    problems = schedule_problems(name, p, m, v)
    if problems:
        raise ValueError("; ".join(problems))
