"""Pipeline schedules as data: per rank, an ordered list of actions.

A schedule says, for every pipeline rank, what to run and in what order:
forward ``F`` and backward of (stage, micro-batch), and the point-to-point
messages between ranks (``SEND_F``/``RECV_F`` carry a stage's output
activation downstream, ``SEND_B``/``RECV_B`` carry the gradient of a stage's
input upstream). One executor runs any such list; ``validate.py`` rejects a
list that would skip work or deadlock before anything runs; ``simulator.py``
times it with per-action costs. A new schedule is a new generator here, not a
new executor.

The backward comes fused or split (Qi et al., 2024, "Zero Bubble Pipeline
Parallelism", arXiv:2401.10241):

- ``B``: the full backward, input gradient and weight gradients together;
- ``I``: the input gradient only (the paper's "B"), sent upstream at once;
- ``W``: the weight gradients of an earlier ``I`` of the same (stage, mb)
  (the paper's "W"), run whenever the rank would otherwise idle.

A (stage, mb) has either one ``B``, or one ``I`` and one ``W``. ``OVERLAP``
runs a forward of one micro-batch and a backward (``B`` or ``I``) of another
on the same rank as one step (DualPipe's overlapped forward-and-backward
chunk, whose communication hides behind the other's compute):
``Action("OVERLAP", -1, -1, sub=(F-action, backward-action))``. Naming: the
DualPipe README's and DeepSeek-V3's "B" is the *full* backward (xtrain's
``B``, = ``I`` + ``W``), the zero-bubble paper's "B" the input part (xtrain's
``I``); ``W`` is the same everywhere.

Every generator builds the *compute order* only (F, B, I, W, OVERLAP per
rank) and hands
it to :func:`add_communication`, the one place that inserts sends and
receives (as torch.distributed.pipelining lowers its compute-only tables),
then :func:`receives_in_send_order` posts each rank's receives in the order
its peer sends them (a no-op for the single-chain schedules).

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
- :func:`zb1p`: ZB-H1 (Qi et al., 2024, arXiv:2401.10241): 1F1B with split
  backwards, rank r delaying its weight gradients by r slots so they fill the
  cool-down; 1F1B's memory, a third of its bubble when F = I = W. Needs m >= p.
- :func:`dualpipe`: DualPipe (DeepSeek-AI, 2024, "DeepSeek-V3 Technical
  Report", arXiv:2412.19437; reference deepseek-ai/DualPipe): two copies of
  the model, micro-batches enter from both ends, overlapped F&B steps.
  Needs p even, m even, m >= 2p.
- :func:`dualpipev`: DualPipeV, DualPipe "cut in half" (Sea AI Lab; the same
  reference): 2p stages in a V over p ranks, no duplicated parameters.
  Needs m >= 2p.

Text format of one action (torch's): ``{stage}{kind}{mb}``, e.g. ``0F3`` is
the forward of micro-batch 3 on stage 0, ``2SEND_B5`` sends stage 2's input
gradient of micro-batch 5 upstream. Kinds are upper-case letters and
underscores (no digits), so the text parses back unambiguously
(:meth:`Action.parse`). An ``OVERLAP`` is written as its two sub-actions in
parentheses joined by ``+``: ``(2F5+0B3)`` runs ``2F5`` then ``0B3``.

Stages and paths. Stage ids are ``0..S-1``; stage s lives on rank
``stage_rank[s]``. A schedule has one or more *chains* (``Schedule.chains``;
by default the one chain 0, 1, ..., S-1): a micro-batch runs the stages of
its chain in order (``Schedule.mb_stages``), the k-th stage of a chain runs
layer block k (``Schedule.stage_layers_of``), the chain's first stage takes
the batch and its last computes the loss (``first_stages`` / ``last_stages``).
DualPipe has two chains over two copies of the model; every other schedule
here has one.

Message semantics (the contract with the executor). Stage s's neighbours are
the stages before and after it in its chain (:meth:`Schedule.prev_stage` /
:meth:`Schedule.next_stage`; s-1 and s+1 with one chain):

- ``F(s, i)`` needs stage s's input: the batch if s is the first stage of
  its chain; the output of ``F(s-1, i)`` handed over locally if stage s-1
  lives on the same rank; otherwise a preceding ``RECV_F(s, i)``.
- ``SEND_F(s, i)`` follows ``F(s, i)`` when stage s+1 lives on another rank;
  it matches ``RECV_F(s+1, i)`` on that rank.
- ``B(s, i)`` needs ``F(s, i)`` earlier on the same rank and the gradient of
  stage s's output: from the loss (scaled 1/m) on the last stage of its
  chain, locally from
  ``B(s+1, i)`` if stage s+1 is on the same rank, else a preceding
  ``RECV_B(s, i)``.
- ``SEND_B(s, i)`` follows ``B(s, i)`` when stage s-1 lives on another rank;
  it matches ``RECV_B(s-1, i)`` there.
- ``I(s, i)`` is ``B(s, i)`` without the weight gradients: the same inputs,
  the same ``SEND_B(s, i)`` after it (or local hand-over), so the upstream
  rank never waits for a weight gradient.
- ``W(s, i)`` needs ``I(s, i)`` earlier on the same rank and no message.
- ``OVERLAP`` with sub-actions (f, b): the receives either needs are posted
  before it, the sends either produces come after it; the executor runs f,
  then b (or both at once, if it can).
- Sends never block. A receive is posted at its RECV action and waited on
  just before the compute that consumes it. Each message is identified by
  :meth:`Schedule.message_key` (payload kind, producing stage, micro-batch),
  which an executor can turn into a distinct tag.

No torch here (nor in validate.py or simulator.py).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

# -- actions ----------------------------------------------------------------------------------

F = "F"  # forward of (stage, mb)
B = "B"  # full backward of (stage, mb): input gradient and weight gradient together
I = "I"  # input-gradient half of the backward (the zero-bubble paper's B); sends like B
W = "W"  # weight-gradient half, after the I of the same (stage, mb); no message
OVERLAP = "OVERLAP"  # a forward and a backward (B or I) of other micro-batches as one step (``sub``)
SEND_F = "SEND_F"  # send stage's output activation to the next stage's rank
RECV_F = "RECV_F"  # receive stage's input activation from the previous stage's rank
SEND_B = "SEND_B"  # send the gradient of stage's input to the previous stage's rank
RECV_B = "RECV_B"  # receive the gradient of stage's output from the next stage's rank

BACKWARD_KINDS = frozenset({B, I})  # the kinds that produce a stage's input gradient
COMPUTE_KINDS = frozenset({F, B, I, W, OVERLAP})
SEND_KINDS = frozenset({SEND_F, SEND_B})
RECV_KINDS = frozenset({RECV_F, RECV_B})
COMM_KINDS = SEND_KINDS | RECV_KINDS
KINDS = COMPUTE_KINDS | COMM_KINDS  # the kinds validate() and simulate() know today

_ACTION_RE = re.compile(r"^\s*(\d+)([A-Z][A-Z_]*)(\d+)\s*$")
_OVERLAP_RE = re.compile(r"^\s*\(([^()]*)\)\s*$")


@dataclass(frozen=True)
class Action:
    """One step of one rank: ``kind`` of micro-batch ``mb`` on stage ``stage``.

    For ``SEND_F`` the stage is the one whose output is sent; for ``RECV_F``
    the one that receives its input; for ``SEND_B`` the one whose input
    gradient is sent upstream; for ``RECV_B`` the one that receives the
    gradient of its output. ``str(a)`` is ``{stage}{kind}{mb}`` (``0F3``,
    ``1RECV_B2``); :meth:`parse` reads it back.

    ``sub`` is empty except for ``OVERLAP`` (stage and mb -1), which holds
    its two sub-actions, a forward then a backward (:meth:`overlap`); its text
    is ``(2F5+0B3)``.
    """

    kind: str
    stage: int
    mb: int
    sub: tuple = ()

    def __str__(self) -> str:
        if self.kind == OVERLAP:
            return "(" + "+".join(str(a) for a in self.sub) + ")"
        return f"{self.stage}{self.kind}{self.mb}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """``"0F3"`` -> ``Action("F", 0, 3)``; ``"(2F5+0B3)"`` -> the OVERLAP of
        ``2F5`` and ``0B3``. Any upper-case kind parses (validation decides
        which kinds are known)."""
        overlapped = _OVERLAP_RE.match(text)
        if overlapped is not None:
            parts = overlapped.group(1).split("+")
            try:
                return cls(OVERLAP, -1, -1, tuple(cls.parse(part) for part in parts))
            except ValueError as e:
                raise ValueError(f"cannot parse overlapped action {text!r}: {e}") from None
        match = _ACTION_RE.match(text)
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}: expected {{stage}}{{KIND}}{{mb}}, e.g. '0F3' or '1SEND_B2', "
                f"or an overlapped pair such as '(2F5+0B3)'"
            )
        return cls(match.group(2), int(match.group(1)), int(match.group(3)))

    @classmethod
    def overlap(cls, forward: "Action", backward: "Action") -> "Action":
        """The OVERLAP of ``forward`` (an F) and ``backward`` (a B or I of another micro-batch)."""
        return cls(OVERLAP, -1, -1, (forward, backward))

    @property
    def parts(self) -> tuple["Action", ...]:
        """The compute this action runs, in order: an OVERLAP's sub-actions, else itself."""
        return self.sub if self.kind == OVERLAP else (self,)

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

    Stages are ``0..S-1``; stage s lives on rank ``stage_rank[s]`` (any map:
    round-robin for interleaved, a V for DualPipeV). ``actions[r]`` is rank
    r's list in execution order.

    ``chains`` (default: the one chain ``[0, 1, ..., S-1]``) are the paths
    through the stages: each stage is in exactly one chain, and its position
    there is the layer block it runs (:meth:`stage_layers_of`). ``mb_chain[i]``
    is the chain micro-batch i takes (default: chain 0 for all). Only
    DualPipe has two chains (one per copy of the model).
    """

    name: str
    n_ranks: int
    n_micro: int
    stage_rank: list[int]
    actions: list[list[Action]]
    chains: list[list[int]] | None = None
    mb_chain: list[int] | None = None

    @property
    def n_stages(self) -> int:
        return len(self.stage_rank)

    @property
    def paths(self) -> list[list[int]]:
        """The chains of stages, each in the order a micro-batch runs them."""
        return [list(c) for c in self.chains] if self.chains is not None else [list(range(self.n_stages))]

    def _place(self, stage: int) -> tuple[list[int], int]:
        for chain in self.paths:
            if stage in chain:
                return chain, chain.index(stage)
        raise ValueError(f"stage {stage} is in no chain of schedule {self.name!r}")

    def stages_of(self, rank: int) -> list[int]:
        """The stages rank ``rank`` holds, in stage-id order."""
        return [s for s, r in enumerate(self.stage_rank) if r == rank]

    def rank_of(self, stage: int) -> int:
        return self.stage_rank[stage]

    def prev_stage(self, stage: int) -> int | None:
        """The stage feeding ``stage`` its input (None for a chain's first stage)."""
        chain, k = self._place(stage)
        return chain[k - 1] if k > 0 else None

    def next_stage(self, stage: int) -> int | None:
        """The stage consuming ``stage``'s output (None for a chain's last stage)."""
        chain, k = self._place(stage)
        return chain[k + 1] if k + 1 < len(chain) else None

    def stage_layers_of(self, stage: int) -> int:
        """The index of the layer block ``stage`` runs: its position in its chain
        (``stage`` itself with one chain; ``stage mod p`` for DualPipe, whose
        stage p+s runs a copy of block s)."""
        return self._place(stage)[1]

    @property
    def n_blocks(self) -> int:
        """How many layer blocks the model is cut into (the longest chain)."""
        return max(len(c) for c in self.paths)

    def stages_of_block(self, block: int) -> list[int]:
        """The stages that run layer block ``block``: one, or two for DualPipe,
        whose copies' weight gradients are summed over the rank pair."""
        return [s for s in range(self.n_stages) if self.stage_layers_of(s) == block]

    @property
    def first_stages(self) -> frozenset[int]:
        """Stages that take the batch as input: ``{0}``, or ``{0, p}`` for DualPipe."""
        return frozenset(c[0] for c in self.paths)

    @property
    def last_stages(self) -> frozenset[int]:
        """Stages that compute the loss: ``{S-1}``, or ``{p-1, 2p-1}`` for DualPipe."""
        return frozenset(c[-1] for c in self.paths)

    def chain_of_mb(self, mb: int) -> int:
        """The index (into :attr:`paths`) of the chain micro-batch ``mb`` takes."""
        return self.mb_chain[mb] if self.mb_chain is not None else 0

    def mb_stages(self, mb: int) -> list[int]:
        """The stages micro-batch ``mb`` runs, in forward order."""
        return self.paths[self.chain_of_mb(mb)]

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
        """Per rank, the compute actions only (sends and receives dropped;
        an OVERLAP stays one action)."""
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
    if schedule.chains is not None:
        head += f" chains={schedule.chains}"
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

    F takes RECV_F / gives SEND_F; B and I take RECV_B / give SEND_B; W has no
    message. An OVERLAP gets the receives of both sub-actions before it (the
    forward's first) and the sends of both after it.

    Receives are placed just in time, so a list is deadlock-free exactly when
    its compute order is (a rank never waits at a RECV before reaching the
    compute that needs it). Neighbours default to :class:`Schedule`'s
    one chain (s-1 and s+1); pass a schedule's ``prev_stage``/``next_stage``
    for its chains.
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
            if not a.is_compute or (a.kind == OVERLAP and not a.sub):
                raise ValueError(f"add_communication takes compute actions only; got {a} on rank {rank}")
            before, after = [], []
            for x in a.parts:
                if x.kind == F:
                    if remote(rank, prev_stage(x.stage)):
                        before.append(Action(RECV_F, x.stage, x.mb))
                    if remote(rank, next_stage(x.stage)):
                        after.append(Action(SEND_F, x.stage, x.mb))
                elif x.kind in BACKWARD_KINDS:
                    if remote(rank, next_stage(x.stage)):
                        before.append(Action(RECV_B, x.stage, x.mb))
                    if remote(rank, prev_stage(x.stage)):
                        after.append(Action(SEND_B, x.stage, x.mb))
                elif x.kind != W:
                    raise ValueError(f"add_communication: {a} on rank {rank} holds {x}, not an F, B, I or W")
            out += before + [a] + after
        lowered.append(out)
    return lowered


def from_compute(
    name: str,
    n_ranks: int,
    n_micro: int,
    stage_rank: Sequence[int],
    compute: Sequence[Sequence[Action]],
    chains: Sequence[Sequence[int]] | None = None,
    mb_chain: Sequence[int] | None = None,
) -> Schedule:
    """A :class:`Schedule` from a compute-only table, sends and receives added
    by :func:`add_communication` along the schedule's chains, receives then
    posted in each peer's send order (:func:`receives_in_send_order`; the
    path every generator takes)."""
    schedule = Schedule(
        name,
        n_ranks,
        n_micro,
        list(stage_rank),
        [],
        [list(c) for c in chains] if chains is not None else None,
        list(mb_chain) if mb_chain is not None else None,
    )
    schedule.actions = add_communication(stage_rank, compute, schedule.prev_stage, schedule.next_stage)
    schedule.actions = receives_in_send_order(schedule)
    return schedule


def receives_in_send_order(schedule: Schedule) -> list[list[Action]]:
    """The lists with each rank's receives from each peer moved earlier, where
    needed, so that they are posted in the order that peer sends (an untagged
    channel such as NCCL's matches sends and receives between two ranks in
    posting order). A receive only ever moves earlier, to just before the
    next receive from the same peer that the peer sends after it, so every
    compute still finds its inputs posted.

    The single-chain schedules already post in send order (no move). DualPipe
    and DualPipeV need it where two stages of a rank pair exchange
    activations and gradients both ways; the reference posts these receives
    early the same way (deepseek-ai/DualPipe posts the next forward's
    receive with the previous step's).
    """
    order: dict[tuple[int, int], dict[tuple[str, int, int], int]] = {}  # (src, dst) -> message -> send position
    for rank, row in enumerate(schedule.actions):
        for a in row:
            if a.kind in SEND_KINDS:
                channel = order.setdefault((rank, schedule.peer(a)), {})
                channel[schedule.message_key(a)] = len(channel)
    lowered = []
    for rank, row in enumerate(schedule.actions):
        by_channel: dict[int, list[tuple[int, int]]] = {}  # src -> [(send position, index in row)]
        for j, a in enumerate(row):
            if a.kind in RECV_KINDS:
                src = schedule.peer(a)
                t = order.get((src, rank), {}).get(schedule.message_key(a), len(row) + j)  # unmatched: leave in place
                by_channel.setdefault(src, []).append((t, j))
        keys: dict[int, tuple] = {j: (j, 1) for j in range(len(row))}
        for received in by_channel.values():
            anchor = len(row)
            for t, j in sorted(received, reverse=True):  # latest send first: anchor = earliest later receive
                anchor = min(anchor, j)
                keys[j] = (anchor, 0, 0 if anchor == j else -1, t, j)
        lowered.append([row[j] for j in sorted(range(len(row)), key=keys.__getitem__)])
    return lowered


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


def zb1p(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al., 2024, "Zero Bubble Pipeline Parallelism",
    arXiv:2401.10241; the order of torch.distributed.pipelining's ZB1P,
    ScheduleInterleavedZeroBubble, at one stage per rank).

    1F1B with every backward split into I (input gradient, sent upstream at
    once) and W (weight gradients). Rank r (stage r) runs 1F1B's order with I
    in place of B: w = min(p-1-r, m) warm-up forwards, then per backward slot
    k = 0..m-1 the forward of micro-batch w+k (while any is left) and I(k);
    its W's run in I order but r slots late (W(k-r) right after I(k)), and
    the last r of them after the last I. The delayed W's fill the cool-down
    where 1F1B idles, and the chain of backwards that drains the pipeline
    carries I's only.

    Bubble per rank (free messages): (p-1)(F+I-W) while W <= min(F, I), in
    the DualPipe README's notation (B the full backward, = I + W)
    (p-1)(F+B-2W): a third of 1F1B's (p-1)(F+B) when F = I = W. A W longer
    than F or I cannot hide, and the idle is (p-1)·max(F+I-W, F, I) for any
    costs. Activations: every rank holds at most p micro-batches whose W has
    not run (1F1B's peak, p, now on every rank), r of them on rank r only
    partly (I done, W pending).

    Rule on m: m >= p. With fewer micro-batches there are not enough weight
    gradients to fill the waits and the bubble exceeds the closed form (the
    same rule as :func:`interleaved_1f1b`).
    """
    _raise_on_problems("zb1p", p, m, 1)
    compute = []
    for r in range(p):
        warmup = min(p - 1 - r, m)
        row = [Action(F, r, i) for i in range(warmup)]
        for k in range(m):
            if warmup + k < m:
                row.append(Action(F, r, warmup + k))
            row.append(Action(I, r, k))
            if k >= r:
                row.append(Action(W, r, k - r))
        row += [Action(W, r, i) for i in range(max(0, m - r), m)]
        compute.append(row)
    return from_compute("zb1p", p, m, list(range(p)), compute)


def _dual_rank_order(n: int, h: int, n_mb: int, stage: tuple[int, int], mb: Callable[[int, int], int]) -> list[Action]:
    """One rank's compute order in DualPipe's eight phases (deepseek-ai/DualPipe,
    ``DualPipe.step`` / ``DualPipeV.step``), shared by both schedules.

    The rank holds two stages, ``stage[0]`` ("phase 0", the one whose
    micro-batches reach it first) and ``stage[1]``; ``mb(phase, k)`` is the
    k-th micro-batch through that stage, ``n_mb`` per phase. ``n`` is the
    number of ranks on the way from the entry to the turn (p/2 for DualPipe,
    p for DualPipeV) and ``h`` this rank's distance from the entry. With
    F0/F1 the forwards and B0/B1 the backwards of each phase:

    1. 2(n-h-1) F0                              warm-up
    2. h+1 x (F0 F1)
    3. n-h-1 x (I1 W F1)                        zero-bubble: W at once
    4. n_mb-2n+h+1 x ((F0&B1) (F1&B0))          the overlapped main loop; the
       rank at the turn (h = n-1) runs its first F0, B1 apart
    5. n-h-1 x (B1 (F1&B0))
    6. h+1 x (B1 B0)                            from its middle on as I, not B
    7. n-h-1 x (W I0)
    8. h+1 x W                                  weight-gradient cool-down

    W's run in the order of their I's (the reference's FIFO store).
    """
    f_count, b_count = [0, 0], [0, 0]
    weights: deque[Action] = deque()
    row: list[Action] = []

    def fwd(phase: int) -> Action:
        a = Action(F, stage[phase], mb(phase, f_count[phase]))
        f_count[phase] += 1
        return a

    def bwd(phase: int, split: bool = False) -> Action:
        a = Action(I if split else B, stage[phase], mb(phase, b_count[phase]))
        b_count[phase] += 1
        if split:
            weights.append(a)
        return a

    def weight() -> Action:
        a = weights.popleft()
        return Action(W, a.stage, a.mb)

    row += [fwd(0) for _ in range(2 * (n - h - 1))]
    for _ in range(h + 1):
        row += [fwd(0), fwd(1)]
    for _ in range(n - h - 1):
        row += [bwd(1, split=True), weight(), fwd(1)]
    for i in range(n_mb - 2 * n + h + 1):
        if i == 0 and h == n - 1:  # the reference does not overlap these two: a shorter bubble
            row += [fwd(0), bwd(1)]
        else:
            row.append(Action.overlap(fwd(0), bwd(1)))
        row.append(Action.overlap(fwd(1), bwd(0)))
    for _ in range(n - h - 1):
        row.append(bwd(1))
        row.append(Action.overlap(fwd(1), bwd(0)))
    split = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        row.append(bwd(1, split))
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        row.append(bwd(0, split))
    for _ in range(n - h - 1):
        row += [weight(), bwd(0, split=True)]
    row += [weight() for _ in range(h + 1)]
    assert not weights and f_count == b_count == [n_mb, n_mb], (f_count, b_count, len(weights))
    return row


def dualpipe_layout(p: int) -> tuple[list[int], list[list[int]]]:
    """DualPipe's stages: (stage_rank, chains). Direction 0 is stages 0..p-1,
    stage s on rank s; direction 1 is stages p..2p-1, stage p+s (a copy of
    block s) on rank p-1-s. Rank r holds stages r and 2p-1-r."""
    return list(range(p)) + list(range(p - 1, -1, -1)), [list(range(p)), list(range(p, 2 * p))]


def dualpipev_layout(p: int) -> list[int]:
    """DualPipeV's stage_rank: 2p stages in one chain folded into a V, stage s
    on rank s for s < p and on rank 2p-1-s for s >= p (rank 0 holds the first
    and the last stage, rank p-1 the turn)."""
    return list(range(p)) + list(range(p - 1, -1, -1))


def dualpipe(p: int, m: int) -> Schedule:
    """DualPipe (DeepSeek-AI, 2024, "DeepSeek-V3 Technical Report",
    arXiv:2412.19437, section 3.2.1; the phases of deepseek-ai/DualPipe's
    ``DualPipe.step``).

    Two copies of the model run in opposite directions (:func:`dualpipe_layout`):
    micro-batches 0..m/2-1 enter at rank 0 and take direction 0 (stages 0..p-1),
    m/2..m-1 enter at rank p-1 and take direction 1 (stages p..2p-1), as the
    reference feeds the first half of the batch to rank 0 and the second to
    rank p-1. Rank r holds block r of direction 0 and block p-1-r of
    direction 1, so each block's gradients are the sum over the rank pair
    (r, p-1-r). Each half of the ranks treats the direction entering on its
    side as "phase 0" and runs :func:`_dual_rank_order` with n = p/2 and
    h = min(r, p-1-r): warm-up forwards, the loop of overlapped F&B pairs
    (``OVERLAP``, a forward of one direction with a full backward of the
    other), and a cool-down of I's and W's.

    Rules (the reference's asserts): p even, m even, m >= 2p.
    Bubble per rank (free messages): (p/2-1)(F&B+B-3W) in the DualPipe
    README's notation (B the full backward, F&B an OVERLAP), exact when the
    forward costs as much as the input gradient (F = B-W) and W <= F
    (:func:`xtrain.formulas.pipeline_bubble_time` has the details);
    activations: p+1 (stage, micro-batch) pairs per rank at the peak, each
    1/p of the model, the README's "PP+1".
    """
    _raise_on_problems("dualpipe", p, m, 1)
    stage_rank, chains = dualpipe_layout(p)
    half, half_m = p // 2, m // 2
    compute = []
    for r in range(p):
        second = int(r >= half)  # phase 0 is the direction whose entry is on this rank's side

        def stage_of(phase: int, r: int = r, second: int = second) -> int:
            return r if phase ^ second == 0 else 2 * p - 1 - r

        def mb(phase: int, k: int, second: int = second) -> int:
            return (phase ^ second) * half_m + k

        compute.append(_dual_rank_order(half, min(r, p - 1 - r), half_m, (stage_of(0), stage_of(1)), mb))
    mb_chain = [0] * half_m + [1] * half_m
    return from_compute("dualpipe", p, m, stage_rank, compute, chains, mb_chain)


def dualpipev(p: int, m: int) -> Schedule:
    """DualPipeV (DualPipe "cut in half", Sea AI Lab; the phases of
    deepseek-ai/DualPipe's ``DualPipeV.step``; torch's ScheduleDualPipeV).

    One model cut into 2p stages in a V (:func:`dualpipev_layout`): rank r
    holds stages r ("phase 0", on the way down) and 2p-1-r ("phase 1", on the
    way back), so rank 0 takes the batch and computes the loss, and no
    parameter is duplicated. Every micro-batch takes the whole V. Rank r runs
    :func:`_dual_rank_order` with n = p and h = r.

    Rule (the reference's and torch's): m >= 2p. Bubble per rank (free
    messages, per-stage costs): (p-1)(F&B+B-3W), the DualPipe README's
    formula with its PP (stages) = 2p, exact under the same conditions as
    :func:`dualpipe`'s; activations: 2p+1 stages' worth per rank at the peak,
    each 1/(2p) of the model (the README's "PP+1").
    """
    _raise_on_problems("dualpipev", p, m, 1)
    compute = [_dual_rank_order(p, r, m, (r, 2 * p - 1 - r), lambda phase, k: k) for r in range(p)]
    return from_compute("dualpipev", p, m, dualpipev_layout(p), compute)


# -- registry and config rules ----------------------------------------------------------------

SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "zb1p": zb1p,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}
# Schedules that take v (strategy.pp_chunks, stages per rank); the others take (p, m) and need v == 1.
CHUNKED_SCHEDULES = frozenset({"interleaved_1f1b"})
# Schedules that place two stages on every rank themselves (pp_chunks stays 1).
TWO_STAGE_SCHEDULES = frozenset({"dualpipe", "dualpipev"})
# Schedules whose backwards are (partly) split into I and W.
SPLIT_BACKWARD_SCHEDULES = frozenset({"zb1p", "dualpipe", "dualpipev"})


def schedule_layout(name: str, p: int, v: int = 1) -> Schedule:
    """Schedule ``name``'s stages for p ranks and v stages per rank, without
    actions or micro-batches: ``stage_rank``, the chains, and so
    ``stage_layers_of``, ``n_blocks``, ``first_stages``, ``last_stages``,
    ``prev_stage``/``next_stage`` (they depend on (name, p, v) only, never on
    m). For cutting a model before the micro-batch count is known."""
    problems = schedule_problems(name, p, 2 * p if name in TWO_STAGE_SCHEDULES else p, v)
    if problems:
        raise ValueError("; ".join(problems))
    chains = None
    if name == "dualpipe":
        stage_rank, chains = dualpipe_layout(p)
    elif name == "dualpipev":
        stage_rank = dualpipev_layout(p)
    elif name == "interleaved_1f1b":
        stage_rank = [s % p for s in range(p * v)]
    else:
        stage_rank = list(range(p))
    return Schedule(name, p, 0, stage_rank, [[] for _ in range(p)], chains)


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


def zb1p_problems(p: int, m: int) -> list[str]:
    """ZB-H1's rule: micro_batches >= pp (:func:`zb1p`)."""
    if m >= p:
        return []
    return [
        f"zb1p needs micro_batches >= pp (rank r delays r weight gradients into the cool-down): "
        f"got micro_batches={m}, pp={p}; use {p}"
    ]


def dualpipe_problems(name: str, p: int, m: int) -> list[str]:
    """DualPipe's rules (deepseek-ai/DualPipe's asserts): pp even, and
    micro_batches even and >= 2·pp (each direction takes m/2 >= pp, so every
    rank reaches the overlapped loop); DualPipeV's: micro_batches >= 2·pp
    (its number of stages)."""
    problems = []
    if name == "dualpipe":
        if p % 2:
            near = f"{p - 1} or {p + 1}" if p > 1 else "2"
            problems.append(f"dualpipe needs an even pp (ranks pair up as r and pp-1-r): got pp={p}; use {near}")
        if m % 2 or m < 2 * p:
            problems.append(
                f"dualpipe needs micro_batches even and >= 2*pp (half enter from each end, at least pp each): "
                f"got micro_batches={m}, pp={p}; use {max(2 * p, m + m % 2)}"
            )
    elif name == "dualpipev" and m < 2 * p:
        problems.append(
            f"dualpipev needs micro_batches >= 2*pp (its number of stages): got micro_batches={m}, pp={p}; use {2 * p}"
        )
    return problems


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
        held = "two stages per rank, placed by the schedule" if name in TWO_STAGE_SCHEDULES else "one stage per rank"
        problems.append(
            f"pp_chunks must be 1 for {name} ({held}), got {v}; "
            f"only {', '.join(sorted(CHUNKED_SCHEDULES))} takes pp_chunks stages per rank"
        )
    if name == "zb1p":
        problems += zb1p_problems(p, m)
    problems += dualpipe_problems(name, p, m)
    return problems


def n_layer_blocks(name: str, p: int, v: int = 1) -> int:
    """How many contiguous layer blocks schedule ``name`` cuts the model into:
    p·v (v = 1 except for interleaved), 2p for DualPipeV, p for DualPipe
    (whose 2p stages run two copies of p blocks)."""
    if name == "dualpipev":
        return 2 * p
    if name == "dualpipe":
        return p
    return p * v


def check_schedule_config(name: str, p: int, m: int, v: int, n_layers: int) -> list[str]:
    """Every problem with ``strategy.pp_schedule=name``, ``strategy.pp=p``,
    ``train.micro_batches=m``, ``strategy.pp_chunks=v`` on a model of
    ``n_layers`` blocks, for config validation before any process starts.

    Rules: the schedule is known; p, m, v are integers >= 1; v == 1 unless
    the schedule is chunked (interleaved_1f1b accepts any v >= 1; v = 1 is
    valid and has 1F1B's bubble with a deeper warm-up); interleaved_1f1b
    needs m >= p and m % (m // p) == 0 (:func:`interleaved_allows`); zb1p
    needs m >= p; dualpipe needs p even,
    m even and m >= 2p; dualpipev needs m >= 2p; the model has at least one
    layer per layer block (:func:`n_layer_blocks`: p·v, 2p for dualpipev,
    p for dualpipe, whose 2p stages are two copies of p blocks; layers need
    not divide evenly).
    """
    problems = schedule_problems(name, p, m, v)
    shaped = all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (p, v))
    if name in SCHEDULES and shaped:
        blocks = n_layer_blocks(name, p, v)
        if not isinstance(n_layers, int) or n_layers < blocks:
            if name in TWO_STAGE_SCHEDULES:
                what = f"{blocks} layer blocks" + (" (each run by two stages)" if name == "dualpipe" else "")
                problems.append(f"the model has {n_layers} layers but {name} with pp={p} needs {what} of at least one layer each")
            else:
                problems.append(
                    f"the model has {n_layers} layers but {name} with pp={p} and pp_chunks={v} "
                    f"needs {blocks} stages of at least one layer each"
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
