"""Reject a pipeline schedule that would skip work or hang, before anything runs.

:func:`validate` raises :class:`ScheduleError` (a ``ValueError``) listing
every problem found; each names the rank, the action's index in that rank's
list (0-based) and the action, as ``rank 1, action 4 (0B3): ...``. A
missing action, which has no index, is named as ``rank 1, missing 0B3``.

Checks, in order (the deadlock check runs only on a list that passes the
others, since it assumes every message has both ends):

1. shape: one list per rank, stage_rank maps every stage to a rank, every
   action's kind is known and its stage and micro-batch are in range;
2. ownership: an action runs on the rank that holds its stage;
3. work: exactly one F and one B of every (stage, micro-batch) on its owner;
4. data: a B after its F; an F after its input is there (a RECV_F before it,
   or the F of the previous stage on the same rank); a B after its output
   gradient is there (the loss on the last stage, a RECV_B before it, or the
   B of the next stage on the same rank); a send after the compute it sends,
   and only where the neighbour stage lives on another rank;
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
   it (``recv_blocks=False``); a list that passes the strict check cannot
   hang under the executor, because each rank gets at least as far. The
   report names every stuck rank and the action it waits on.

No torch here.
"""

from __future__ import annotations

from collections import defaultdict

from xtrain.parallel.pipeline.schedules import (
    B,
    COMM_KINDS,
    F,
    KINDS,
    RECV_B,
    RECV_F,
    RECV_KINDS,
    SEND_F,
    SEND_KINDS,
    Action,
    Schedule,
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
    if problems:
        return problems
    for rank, row in enumerate(s.actions):
        for j, a in enumerate(row):
            if a.kind not in KINDS:
                problems.append(f"{where(rank, j, a)}: unknown kind {a.kind!r} (known: {', '.join(sorted(KINDS))})")
            elif not 0 <= a.stage < s.n_stages:
                problems.append(f"{where(rank, j, a)}: stage {a.stage} outside 0..{s.n_stages - 1}")
            elif not 0 <= a.mb < s.n_micro:
                problems.append(f"{where(rank, j, a)}: micro-batch {a.mb} outside 0..{s.n_micro - 1}")
    return problems


# -- 2-5. ownership, work, data, matching -----------------------------------------------------


def _static_problems(s: Schedule) -> list[str]:
    problems: list[str] = []
    positions: list[dict[Action, int]] = []  # per rank: action -> index of its first occurrence

    def remote(rank: int, stage: int | None) -> bool:
        return stage is not None and s.stage_rank[stage] != rank

    for rank, row in enumerate(s.actions):
        seen: dict[Action, int] = {}
        for j, a in enumerate(row):
            here = where(rank, j, a)
            owner = s.stage_rank[a.stage]
            if owner != rank:
                problems.append(f"{here}: stage {a.stage} lives on rank {owner}, not on rank {rank}")
                continue
            if a in seen:
                problems.append(f"{here}: duplicate of action {seen[a]} on the same rank")
                continue
            prev, nxt = s.prev_stage(a.stage), s.next_stage(a.stage)
            if a.kind == F:
                if remote(rank, prev):
                    need = Action(RECV_F, a.stage, a.mb)
                    if need not in seen:
                        problems.append(
                            f"{here}: F without its input: no {need} earlier on rank {rank} "
                            f"(stage {prev} lives on rank {s.stage_rank[prev]})"
                        )
                elif prev is not None and Action(F, prev, a.mb) not in seen:
                    problems.append(
                        f"{here}: F without its input: {Action(F, prev, a.mb)} (same rank, handed over locally) "
                        f"has not run earlier"
                    )
            elif a.kind == B:
                if Action(F, a.stage, a.mb) not in seen:
                    problems.append(f"{here}: B before its F: no {Action(F, a.stage, a.mb)} earlier on rank {rank}")
                if remote(rank, nxt):
                    need = Action(RECV_B, a.stage, a.mb)
                    if need not in seen:
                        problems.append(
                            f"{here}: B without its output gradient: no {need} earlier on rank {rank} "
                            f"(stage {nxt} lives on rank {s.stage_rank[nxt]})"
                        )
                elif nxt is not None and Action(B, nxt, a.mb) not in seen:
                    problems.append(
                        f"{here}: B without its output gradient: {Action(B, nxt, a.mb)} (same rank, handed over "
                        f"locally) has not run earlier"
                    )
            elif a.kind in COMM_KINDS:
                neighbour = nxt if a.kind in (SEND_F, RECV_B) else prev
                if neighbour is None:
                    end = "last" if a.kind in (SEND_F, RECV_B) else "first"
                    problems.append(f"{here}: stage {a.stage} is the {end} stage: there is no peer")
                elif not remote(rank, neighbour):
                    problems.append(
                        f"{here}: stage {neighbour} lives on this rank too: the tensor is handed over locally, "
                        f"with no send or receive"
                    )
                elif a.kind in SEND_KINDS:
                    producer = Action(F if a.kind == SEND_F else B, a.stage, a.mb)
                    if producer not in seen:
                        problems.append(f"{here}: send before the compute it sends: no {producer} earlier on rank {rank}")
            seen[a] = j
        positions.append(seen)

    # 3. work: exactly one F and one B of every (stage, mb) on its owner.
    for stage in range(s.n_stages):
        owner = s.stage_rank[stage]
        for mb in range(s.n_micro):
            for kind in (F, B):
                a = Action(kind, stage, mb)
                if a not in positions[owner]:
                    problems.append(
                        f"rank {owner}, missing {a}: stage {stage} lives on rank {owner}, whose list of "
                        f"{len(s.actions[owner])} actions has no {kind} of micro-batch {mb}"
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
    the compute consuming it) waits until the peer has issued the send."""
    issued: set[tuple[str, int, int]] = set()  # message keys sent so far
    pointer = [0] * s.n_ranks
    # With recv_blocks=False a compute waits on the receives that feed it.
    feeding: list[dict[Action, tuple[Action, tuple[str, int, int]]]] = [{} for _ in range(s.n_ranks)]
    if not recv_blocks:
        for rank, row in enumerate(s.actions):
            for a in row:
                if a.kind == RECV_F:
                    feeding[rank][Action(F, a.stage, a.mb)] = (a, s.message_key(a))
                elif a.kind == RECV_B:
                    feeding[rank][Action(B, a.stage, a.mb)] = (a, s.message_key(a))

    def blocker(rank: int, a: Action) -> tuple[Action, tuple[str, int, int]] | None:
        if a.kind in RECV_KINDS:
            if recv_blocks and s.message_key(a) not in issued:
                return a, s.message_key(a)
            return None
        need = feeding[rank].get(a)
        if need is not None and need[1] not in issued:
            return need
        return None

    progress = True
    while progress:
        progress = False
        for rank, row in enumerate(s.actions):
            while pointer[rank] < len(row):
                a = row[pointer[rank]]
                if blocker(rank, a) is not None:
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
        recv, _ = blocker(rank, a)
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
