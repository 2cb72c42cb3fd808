"""Reject a pipeline schedule that would skip work or hang, before anything runs.

:func:`validate` raises :class:`ScheduleError` (a ``ValueError``) listing
every problem found; each names the rank, the action's index in that rank's
list (0-based) and the action, as ``rank 1, action 4 (0B3): ...``. A
missing action, which has no index, is named as ``rank 1, missing 0B3``.

Checks, in order (the deadlock check runs only on a list that passes the
others, since it assumes every message has both ends):

1. shape: one list per rank, stage_rank maps every stage to a rank, the
   chains cover every stage once and every micro-batch takes one, every
   action's kind is known and its stage and micro-batch are in range; an
   OVERLAP holds a forward then a backward (B or I) of different
   micro-batches, and no other action holds sub-actions;
2. ownership: an action runs on the rank that holds its stage (for an
   OVERLAP, both sub-actions), and only on stages its micro-batch passes;
3. work: on its owner, every (stage, micro-batch) of a micro-batch's chain
   has exactly one F and either one B, or one I and one W;
4. data: a backward (B or I) after its F; an F after its input is there (a
   RECV_F before it, or the F of the previous stage on the same rank); a
   backward after its output gradient is there (the loss on a chain's last
   stage, a RECV_B before it, or the B or I of the next stage on the same
   rank); a W after the I of its (stage, micro-batch), never beside a B of
   it; a send after the compute it sends (SEND_B after the B or I), and only
   where the neighbour stage lives on another rank. An OVERLAP counts as its
   sub-actions, in order, at its index;
5. matching: every send has exactly one matching receive on the peer and
   every receive a send (``Schedule.match``);
6. order between a pair of ranks (``p2p_order``): by default messages are
   *tagged* (the executor gives each (kind, stage, micro-batch) its own tag,
   so receives may be posted in any order relative to the peer's sends).
   ``p2p_order="fifo"`` models an untagged channel (NCCL matches sends and
   receives between two ranks in posting order): the receives that rank d
   posts from rank s must come in the order rank s sends;
7. deadlock: the lists are run with non-blocking sends and, by default
   (``recv_blocks=True``), a RECV that blocks until the peer has issued the
   matching send. That is stricter than the executor, which posts the
   receive at the RECV and waits only just before the compute that consumes
   it (``recv_blocks=False``; an OVERLAP waits for the receives of both its
   sub-actions before it starts); a list that passes the strict check cannot
   hang under the executor, because each rank gets at least as far. The
   report names every stuck rank and the action it waits on.

No torch here.
"""

from __future__ import annotations

from collections import defaultdict

from xtrain.parallel.pipeline.schedules import (
    BACKWARD_KINDS,
    COMM_KINDS,
    KINDS,
    OVERLAP,
    RECV_B,
    RECV_F,
    RECV_KINDS,
    SEND_F,
    SEND_KINDS,
    Action,
    B,
    F,
    I,
    Schedule,
    W,
)

MAX_LISTED = 20  # problems spelled out in one error message


class ScheduleError(ValueError):
    """A schedule that would skip work or hang; ``problems`` lists each one."""

    def __init__(self, name: str, problems: list[str]):
        self.problems = list(problems)
        shown = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        super().__init__(
            f"schedule {name!r} is invalid ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  "
            + "\n  ".join(shown)
            + more
        )


def validate(schedule: Schedule, *, p2p_order: str = "tagged", recv_blocks: bool = True) -> None:
    """Raise :class:`ScheduleError` if ``schedule`` would skip work, compute
    without its inputs, leave a message unmatched, or deadlock.

    ``p2p_order``: ``"tagged"`` (default; each message has its own tag) or
    ``"fifo"`` (receives between a pair of ranks must follow the send order).
    ``recv_blocks``: model a RECV as blocking where it stands (default,
    strict) or as posted there and waited on by its consumer (the executor).
    """
    problems = find_problems(schedule, p2p_order=p2p_order, recv_blocks=recv_blocks)
    if problems:
        raise ScheduleError(schedule.name, problems)


def find_problems(schedule: Schedule, *, p2p_order: str = "tagged", recv_blocks: bool = True) -> list[str]:
    """Every problem :func:`validate` would report, as strings (empty: valid)."""
    if p2p_order not in ("tagged", "fifo"):
        raise ValueError(f"p2p_order must be 'tagged' or 'fifo', got {p2p_order!r}")
    problems = _shape_problems(schedule)
    if problems:
        return problems
    problems = _static_problems(schedule)
    if not problems and p2p_order == "fifo":
        problems = _fifo_problems(schedule)
    if not problems:
        problems = _deadlock_problems(schedule, recv_blocks=recv_blocks)
    return problems


def where(rank: int, index: int, action: Action) -> str:
    """``rank r, action j (text)``: how every message names an action."""
    return f"rank {rank}, action {index} ({action})"


# -- 1. shape ---------------------------------------------------------------------------------


def _shape_problems(s: Schedule) -> list[str]:
    problems = []
    if s.n_ranks < 1:
        problems.append(f"n_ranks must be >= 1, got {s.n_ranks}")
    if s.n_micro < 1:
        problems.append(f"n_micro must be >= 1, got {s.n_micro}")
    if len(s.actions) != s.n_ranks:
        problems.append(f"{len(s.actions)} action lists for {s.n_ranks} ranks")
    if s.n_stages < 1:
        problems.append("stage_rank is empty: no stages")
    for stage, rank in enumerate(s.stage_rank):
        if not 0 <= rank < s.n_ranks:
            problems.append(f"stage {stage} is mapped to rank {rank}, outside 0..{s.n_ranks - 1}")
    problems += _chain_problems(s)
    if problems:
        return problems
    for rank, row in enumerate(s.actions):
        for j, a in enumerate(row):
            problems += _action_shape_problems(s, where(rank, j, a), a)
    return problems


def _chain_problems(s: Schedule) -> list[str]:
    if s.chains is None and s.mb_chain is None:
        return []
    problems = []
    placed = [stage for chain in s.paths for stage in chain]
    if any(not chain for chain in s.paths):
        problems.append(f"chains {s.chains}: a chain is empty")
    if sorted(placed) != list(range(s.n_stages)):
        problems.append(f"chains {s.chains} must hold every stage 0..{s.n_stages - 1} exactly once")
    if s.mb_chain is not None:
        if len(s.mb_chain) != s.n_micro:
            problems.append(f"mb_chain has {len(s.mb_chain)} entries for {s.n_micro} micro-batches")
        bad = sorted({c for c in s.mb_chain if not 0 <= c < len(s.paths)})
        if bad:
            problems.append(f"mb_chain names chains {bad}, outside 0..{len(s.paths) - 1}")
    return problems


def _action_shape_problems(s: Schedule, here: str, a: Action) -> list[str]:
    if a.kind not in KINDS:
        return [f"{here}: unknown kind {a.kind!r} (known: {', '.join(sorted(KINDS))})"]
    if a.kind == OVERLAP:
        sub = a.sub
        if (a.stage, a.mb) != (-1, -1):
            return [f"{here}: an OVERLAP has stage -1 and mb -1 (its sub-actions name theirs), got {a.stage}, {a.mb}"]
        if len(sub) != 2 or not all(isinstance(x, Action) for x in sub) or sub[0].kind != F or sub[1].kind not in BACKWARD_KINDS:
            return [f"{here}: an OVERLAP holds a forward then a backward (F, then B or I), got ({', '.join(map(str, sub))})"]
        problems = [p for x in sub for p in _action_shape_problems(s, here, x)]
        if not problems and sub[0].mb == sub[1].mb:
            problems.append(f"{here}: an OVERLAP runs two different micro-batches, got micro-batch {sub[0].mb} twice")
        return problems
    if a.sub:
        return [f"{here}: only an OVERLAP holds sub-actions"]
    if not 0 <= a.stage < s.n_stages:
        return [f"{here}: stage {a.stage} outside 0..{s.n_stages - 1}"]
    if not 0 <= a.mb < s.n_micro:
        return [f"{here}: micro-batch {a.mb} outside 0..{s.n_micro - 1}"]
    if a.stage not in s.mb_stages(a.mb):
        return [f"{here}: micro-batch {a.mb} does not pass stage {a.stage} (its stages: {s.mb_stages(a.mb)})"]
    return []


# -- 2-5. ownership, work, data, matching -----------------------------------------------------


def _static_problems(s: Schedule) -> list[str]:
    problems: list[str] = []
    # per rank: compute (an OVERLAP's sub-actions one by one) or comm action -> index of its first occurrence
    positions: list[dict[Action, int]] = []

    for rank, row in enumerate(s.actions):
        seen: dict[Action, int] = {}
        # (stage, mb) whose backward this rank splits: messages then name the I, not a B
        split = {(x.stage, x.mb) for a in row for x in a.parts if x.kind in (I, W)}
        for j, a in enumerate(row):
            wrong = [x for x in a.parts if s.stage_rank[x.stage] != rank]
            if wrong:
                for x in wrong:
                    problems.append(f"{where(rank, j, a)}: stage {x.stage} lives on rank {s.stage_rank[x.stage]}, not on rank {rank}")
                continue
            for x in a.parts:
                here = where(rank, j, a) if x is a else f"{where(rank, j, a)}, sub-action {x}"
                if x in seen:
                    problems.append(f"{here}: duplicate of action {seen[x]} on the same rank")
                    continue
                problems += _data_problems(s, rank, here, x, seen, split)
                seen[x] = j
        positions.append(seen)

    # 3. work: on the owner, one F and (one B, or one I and one W) of every (stage, mb) of a chain.
    for stage in range(s.n_stages):
        owner = s.stage_rank[stage]
        seen = positions[owner]
        for mb in range(s.n_micro):
            if stage not in s.mb_stages(mb):
                continue
            fused, inp, weight = (Action(k, stage, mb) in seen for k in (B, I, W))
            for kind in (F,) if (fused or inp or weight) else (F, B):
                a = Action(kind, stage, mb)
                if a not in seen:
                    problems.append(
                        f"rank {owner}, missing {a}: stage {stage} lives on rank {owner}, whose list of "
                        f"{len(s.actions[owner])} actions has no {kind} of micro-batch {mb}"
                    )
            if inp and not weight and not fused:
                problems.append(
                    f"rank {owner}, missing {Action(W, stage, mb)}: {Action(I, stage, mb)} runs at action "
                    f"{seen[Action(I, stage, mb)]}, but no W computes its weight gradients"
                )

    # 5. matching: each send has its receive on the peer, each receive its send.
    for rank, seen in enumerate(positions):
        for a, j in seen.items():
            if a.kind not in COMM_KINDS:
                continue
            try:
                peer, other = s.peer(a), s.match(a)
            except ValueError:
                continue  # already reported: no peer
            if peer == rank:
                continue  # already reported: local hand-over
            if other not in positions[peer]:
                what = "send without a matching receive" if a.kind in SEND_KINDS else "receive without a matching send"
                problems.append(f"{where(rank, j, a)}: {what}: no {other} on rank {peer}")
    return problems


def _data_problems(s: Schedule, rank: int, here: str, a: Action, seen: dict[Action, int], split: set) -> list[str]:
    """What ``a`` (a compute part or a comm action) needs that has not happened
    earlier on ``rank`` (``seen``)."""

    def remote(stage: int | None) -> bool:
        return stage is not None and s.stage_rank[stage] != rank

    def backward(stage: int, mb: int) -> Action:  # the backward this rank runs for (stage, mb)
        return Action(I if (stage, mb) in split else B, stage, mb)

    def done_backward(stage: int, mb: int) -> bool:
        return Action(B, stage, mb) in seen or Action(I, stage, mb) in seen

    problems = []
    prev, nxt = s.prev_stage(a.stage), s.next_stage(a.stage)
    if a.kind == F:
        if remote(prev):
            need = Action(RECV_F, a.stage, a.mb)
            if need not in seen:
                problems.append(
                    f"{here}: F without its input: no {need} earlier on rank {rank} "
                    f"(stage {prev} lives on rank {s.stage_rank[prev]})"
                )
        elif prev is not None and Action(F, prev, a.mb) not in seen:
            problems.append(
                f"{here}: F without its input: {Action(F, prev, a.mb)} (same rank, handed over locally) has not run earlier"
            )
    elif a.kind in BACKWARD_KINDS:
        if Action(F, a.stage, a.mb) not in seen:
            problems.append(f"{here}: {a.kind} before its F: no {Action(F, a.stage, a.mb)} earlier on rank {rank}")
        other = [Action(k, a.stage, a.mb) for k in ((I, W) if a.kind == B else (B,))]
        clash = [x for x in other if x in seen]
        if clash:
            problems.append(
                f"{here}: {a} beside {clash[0]} (action {seen[clash[0]]}): a (stage, micro-batch) has "
                f"one B, or one I and one W"
            )
        if remote(nxt):
            need = Action(RECV_B, a.stage, a.mb)
            if need not in seen:
                problems.append(
                    f"{here}: {a.kind} without its output gradient: no {need} earlier on rank {rank} "
                    f"(stage {nxt} lives on rank {s.stage_rank[nxt]})"
                )
        elif nxt is not None and not done_backward(nxt, a.mb):
            problems.append(
                f"{here}: {a.kind} without its output gradient: {backward(nxt, a.mb)} (same rank, handed over "
                f"locally) has not run earlier"
            )
    elif a.kind == W:
        if Action(I, a.stage, a.mb) not in seen:
            if Action(B, a.stage, a.mb) in seen:
                problems.append(
                    f"{here}: W after {Action(B, a.stage, a.mb)} (action {seen[Action(B, a.stage, a.mb)]}): "
                    f"that full backward already computed the weight gradients"
                )
            else:
                problems.append(f"{here}: W before its I: no {Action(I, a.stage, a.mb)} earlier on rank {rank}")
    elif a.kind in COMM_KINDS:
        neighbour = nxt if a.kind in (SEND_F, RECV_B) else prev
        if neighbour is None:
            end = "last" if a.kind in (SEND_F, RECV_B) else "first"
            problems.append(f"{here}: stage {a.stage} is the {end} stage: there is no peer")
        elif not remote(neighbour):
            problems.append(
                f"{here}: stage {neighbour} lives on this rank too: the tensor is handed over locally, "
                f"with no send or receive"
            )
        elif a.kind == SEND_F and Action(F, a.stage, a.mb) not in seen:
            problems.append(f"{here}: send before the compute it sends: no {Action(F, a.stage, a.mb)} earlier on rank {rank}")
        elif a.kind in SEND_KINDS and a.kind != SEND_F and not done_backward(a.stage, a.mb):
            problems.append(f"{here}: send before the compute it sends: no {backward(a.stage, a.mb)} earlier on rank {rank}")
    return problems


# -- 6. FIFO order ----------------------------------------------------------------------------


def _fifo_problems(s: Schedule) -> list[str]:
    sends: dict[tuple[int, int], list[tuple[int, Action]]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[tuple[int, Action]]] = defaultdict(list)
    for rank, row in enumerate(s.actions):
        for j, a in enumerate(row):
            if a.kind in SEND_KINDS:
                sends[(rank, s.peer(a))].append((j, a))
            elif a.kind in RECV_KINDS:
                recvs[(s.peer(a), rank)].append((j, a))
    problems = []
    for (src, dst), posted in sorted(recvs.items()):
        sent = sends.get((src, dst), [])
        for k, ((j, a), (sj, sa)) in enumerate(zip(posted, sent)):
            if s.message_key(a) != s.message_key(sa):
                problems.append(
                    f"{where(dst, j, a)}: receives out of order on the untagged channel from rank {src}: "
                    f"message {k} on it is {sa} (rank {src}, action {sj}), but this receive expects "
                    f"{s.match(a)}"
                )
                break  # later ones are shifted by this one
    return problems


# -- 7. deadlock ------------------------------------------------------------------------------


def _deadlock_problems(s: Schedule, *, recv_blocks: bool) -> list[str]:
    """Run the lists: sends never block; a RECV (or, with recv_blocks=False,
    the compute consuming it; for an OVERLAP, the receives of both parts)
    waits until the peer has issued the send."""
    issued: set[tuple[str, int, int]] = set()  # message keys sent so far
    pointer = [0] * s.n_ranks
    # With recv_blocks=False a compute waits on the receives that feed its parts.
    feeding: list[dict[int, list[tuple[Action, tuple[str, int, int]]]]] = [{} for _ in range(s.n_ranks)]
    if not recv_blocks:
        for rank, row in enumerate(s.actions):
            posted = {}
            for j, a in enumerate(row):
                if a.kind in RECV_KINDS:
                    posted[consumer_key(a)] = a
                elif a.is_compute:
                    needs = [posted[k] for k in map(consumer_key, a.parts) if k in posted]
                    if needs:
                        feeding[rank][j] = [(r, s.message_key(r)) for r in needs]

    def blocker(rank: int, j: int, a: Action) -> tuple[Action, tuple[str, int, int]] | None:
        if a.kind in RECV_KINDS:
            if recv_blocks and s.message_key(a) not in issued:
                return a, s.message_key(a)
            return None
        for need in feeding[rank].get(j, ()):
            if need[1] not in issued:
                return need
        return None

    progress = True
    while progress:
        progress = False
        for rank, row in enumerate(s.actions):
            while pointer[rank] < len(row):
                a = row[pointer[rank]]
                if blocker(rank, pointer[rank], a) is not None:
                    break
                if a.kind in SEND_KINDS:
                    issued.add(s.message_key(a))
                pointer[rank] += 1
                progress = True
    stuck = [r for r in range(s.n_ranks) if pointer[r] < len(s.actions[r])]
    if not stuck:
        return []
    lines = []
    for rank in stuck:
        j = pointer[rank]
        a = s.actions[rank][j]
        recv, _ = blocker(rank, j, a)
        peer = s.peer(recv)
        send = s.match(recv)
        waits = f"waits for {send} from rank {peer}"
        if recv != a:
            waits = f"waits on its {recv} for {send} from rank {peer}"
        state = (
            f"rank {peer} is stuck at action {pointer[peer]} ({s.actions[peer][pointer[peer]]})"
            if peer in stuck
            else f"rank {peer} finished without sending it"
        )
        lines.append(f"{where(rank, j, a)}: deadlock: {waits}; {state}")
    done = s.n_ranks - len(stuck)
    lines.insert(0, f"deadlock: ranks {stuck} are stuck ({done} of {s.n_ranks} ranks finished)")
    return lines


def consumer_key(a: Action) -> tuple[str, int, int] | None:
    """What a receive feeds and a compute part consumes, the same on both:
    ``("F", s, i)`` for RECV_F(s, i) and F(s, i); ``("backward", s, i)`` for
    RECV_B(s, i) and B(s, i) or I(s, i); None for anything else (W)."""
    if a.kind in (RECV_F, F):
        return ("F", a.stage, a.mb)
    if a.kind == RECV_B or a.kind in BACKWARD_KINDS:
        return ("backward", a.stage, a.mb)
    return None
