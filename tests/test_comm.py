"""xtrain.comm against torch.distributed: every collective, many group shapes, dtypes and lengths.

Each spawn runs hundreds of cases (starting ranks costs seconds); a worker
returns the cases that disagreed, and the test asserts there are none.

Agreement rule: integer dtypes, MAX/MIN and data movement (gathers,
broadcast, scatter, all-to-all) are bitwise equal to torch's result. Float
SUM/AVG/PRODUCT agree within round-off: both sides add n terms in the
tensor's dtype in different orders, so the tolerance is
``rtol = atol = 4 * n * eps(dtype)`` (inputs are O(1)): fp32 ~ 1e-6 n,
bf16 ~ 0.03 n.

Cases come from a fixed matrix (every op x every dtype at two lengths on a
non-contiguous subgroup) plus hypothesis-drawn cases (lengths biased to the
edges: 0, 1, not divisible by the group size; random groups, roots, uneven
all-to-all splits, segment sizes that force deep pipelines, tree vs chain).
Hypothesis draws the cases in the parent, deterministically; all ranks run
the same list.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xtrain.comm import SOLO, CollectiveTimeout, CommError, get_comm, label_group
from xtrain.spawn import run_on_ranks

# The case-matrix tests run on gloo (CPU tensors) unless XTRAIN_TEST_BACKEND=nccl
# (CUDA tensors, one GPU per rank: the 8-rank test needs 8 GPUs).
BACKEND = os.environ.get("XTRAIN_TEST_BACKEND", "gloo")
if BACKEND not in ("gloo", "nccl"):
    raise ValueError(f"XTRAIN_TEST_BACKEND={BACKEND!r}: use gloo or nccl")

DTYPES = ["float32", "float64", "float16", "bfloat16", "int32", "int64"]
REDUCING = ["all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "reduce"]
MOVING = [
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather",
    "broadcast",
    "gather",
    "scatter",
    "all_to_all_single",
    "all_to_all",
    "send_recv",
    "barrier",
]
OPS = REDUCING + MOVING
RED_OPS = ["SUM", "AVG", "MAX", "MIN", "PRODUCT", "BAND", "BOR", "BXOR"]
BITWISE = ("BAND", "BOR", "BXOR")  # integer dtypes only, as on gloo

# Groups of an 8-rank world, by name: sizes 8, 5, 4, 4, 3, 2 and 1; most are
# not contiguous or do not start at rank 0. "single" is each rank alone (a
# real one-member process group), "solo" the SOLO sentinel.
GROUPS_8 = {
    "world": None,
    "five": [1, 2, 4, 6, 7],
    "evens": [0, 2, 4, 6],
    "odds": [1, 3, 5, 7],
    "three": [3, 5, 7],
    "pair": [6, 3],
    "single": "single",
    "solo": "solo",
}
GROUPS_3 = {"world": None, "pair": [2, 0], "single": "single", "solo": "solo"}
GROUPS_4 = {"world": None, "inner": [1, 2], "single": "single", "solo": "solo"}


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    dtype: str
    numel: int
    group: str
    red: str = "SUM"
    root: int = 0  # index into the group's ranks
    noncontig: bool = False
    async_op: bool = False
    seg_bytes: int = 1 << 20
    tree_max: int = 64 << 10
    seed: int = 0
    nccl_style: bool = False  # post as on NCCL (p2p.NCCL_STYLE)


# ---------------------------------------------------------------- inputs


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _values(case: Case, who: int, numel: int) -> torch.Tensor:
    """Deterministic inputs for rank ``who``: every rank can rebuild every other's."""
    g = torch.Generator().manual_seed(case.seed * 1009 + who * 7919 + numel)
    dt = _dtype(case.dtype)
    if dt.is_floating_point:
        if case.red == "PRODUCT":
            x = torch.rand(numel, generator=g, dtype=torch.float64, device="cpu") + 0.5
        else:
            x = torch.randn(numel, generator=g, dtype=torch.float64, device="cpu")
        return x.to(device=torch.get_default_device(), dtype=dt)
    lo, hi = (-2, 3) if case.red == "PRODUCT" else (-50, 50)
    return torch.randint(lo, hi, (numel,), generator=g, dtype=dt, device="cpu").to(torch.get_default_device())


def _maybe_strided(x: torch.Tensor, noncontig: bool) -> torch.Tensor:
    """The same values in a tensor that is not contiguous (every other element of a buffer)."""
    if not noncontig:
        return x
    buf = torch.zeros(x.numel(), 2, dtype=x.dtype)
    view = buf[:, 0]
    view.copy_(x)
    return view


def _red(name):
    return getattr(dist.ReduceOp, name)


def _tolerances(dtype: torch.dtype, n: int):
    eps = torch.finfo(dtype).eps
    return 4 * n * eps, 4 * n * eps


def _same(case: Case, n: int, got: torch.Tensor, want: torch.Tensor) -> str | None:
    got, want = got.reshape(-1), want.reshape(-1)
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    dt = _dtype(case.dtype)
    exact = not dt.is_floating_point or case.op not in REDUCING or case.red in ("MAX", "MIN")
    if exact:
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[:3].flatten().tolist()
            return f"not bitwise equal at {bad}: {got[bad].tolist()} vs {want[bad].tolist()}"
        return None
    rtol, atol = _tolerances(dt, n)
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except AssertionError as e:
        return str(e).splitlines()[0:4].__repr__()
    return None


# ---------------------------------------------------------------- one case on one rank


def _a2a_matrix(case: Case, n: int) -> list[list[int]]:
    """rows[i][j]: rows group rank i sends to j (same on every rank; zeros included)."""
    rng = random.Random(case.seed)
    return [[rng.choice([0, 0, 1, 2, 3, case.numel % 7 + 1]) for _ in range(n)] for _ in range(n)]


def _run_case(comm, case: Case, groups, me_global: int) -> str | None:
    """Run one case with xtrain and with torch; return a description of any disagreement."""
    import xtrain.comm.direct as direct
    import xtrain.comm.p2p as p2p
    import xtrain.comm.ring as ring
    import xtrain.comm.tree as tree

    ranks, gx, gt = groups
    n, me = len(ranks), ranks.index(me_global)
    p2p.NCCL_STYLE = case.nccl_style
    ring.SEGMENT_BYTES = case.seg_bytes
    direct.SENDS_FIRST = case.seed % 2 == 0  # direct exchanges' two posting orders, case by case
    # all-reduce by ring or by two-shot (gloo only; NCCL keeps the ring), case by case
    two_shot = case.seed // 2 % 2 == 1
    direct.TWO_SHOT_MIN_CHUNK_BYTES, direct.TWO_SHOT_MAX_CHUNK_BYTES = (0, 1 << 62) if two_shot else (1 << 62, 0)
    tree.TREE_MAX_BYTES = case.tree_max
    # Where the tree is switched off, broadcast takes each of its other shapes in turn
    # (star, scatter + ring, chain); otherwise the default size thresholds apply.
    forced = case.tree_max == 0
    tree.STAR_MAX_BYTES = (1 << 62 if case.seed % 3 == 0 else 0) if forced else 2 << 20
    tree.SCATTER_RING_MAX_BYTES = (1 << 62 if case.seed % 3 == 1 else 0) if forced else 16 << 20
    dt = _dtype(case.dtype)
    red = _red(case.red)
    root = ranks[case.root % n]
    k = case.numel

    def done(work):
        if case.async_op:
            assert work is not None and work.wait()
        else:
            assert work is None

    op = case.op
    if op == "all_reduce":
        x = _values(case, me_global, k)
        want = x.clone()
        dist.all_reduce(want, op=red, group=gt)
        t = _maybe_strided(x, case.noncontig)
        done(comm.all_reduce(t, op=red, group=gx, async_op=case.async_op))
        return _same(case, n, t, want)
    if op in ("reduce_scatter_tensor", "reduce_scatter_single"):
        x = _values(case, me_global, k * n)
        want = torch.empty(k, dtype=dt)
        dist.reduce_scatter_single(want, x.clone(), op=red, group=gt)
        out = _maybe_strided(torch.full((k,), 7, dtype=dt), case.noncontig)
        done(getattr(comm, op)(out, _maybe_strided(x, case.noncontig), op=red, group=gx, async_op=case.async_op))
        return _same(case, n, out, want)
    if op == "reduce":
        x = _values(case, me_global, k)
        want = x.clone()
        dist.reduce(want, root, op=red, group=gt)
        t = _maybe_strided(x.clone(), case.noncontig)
        done(comm.reduce(t, root, op=red, group=gx, async_op=case.async_op))
        if me_global == root:
            return _same(case, n, t, want)
        return None if torch.equal(t, x) else "non-root input changed"
    if op in ("all_gather_into_tensor", "all_gather_single"):
        x = _values(case, me_global, k)
        want = torch.empty(n * k, dtype=dt)
        dist.all_gather_into_tensor(want, x, group=gt)
        out = _maybe_strided(torch.zeros(n * k, dtype=dt), case.noncontig)
        done(getattr(comm, op)(out, _maybe_strided(x, case.noncontig), group=gx, async_op=case.async_op))
        return _same(case, n, out, want)
    if op == "all_gather":
        x = _values(case, me_global, k)
        want = [torch.empty(k, dtype=dt) for _ in range(n)]
        dist.all_gather(want, x, group=gt)
        outs = [_maybe_strided(torch.zeros(k, dtype=dt), case.noncontig and i % 2 == 0) for i in range(n)]
        done(comm.all_gather(outs, _maybe_strided(x, case.noncontig), group=gx, async_op=case.async_op))
        return _same(case, n, torch.cat(outs), torch.cat(want))
    if op == "broadcast":
        x = _values(case, me_global, k)
        want = x.clone()
        dist.broadcast(want, root, group=gt)
        t = _maybe_strided(x, case.noncontig)
        done(comm.broadcast(t, root, group=gx, async_op=case.async_op))
        return _same(case, n, t, want)
    if op == "gather":
        x = _values(case, me_global, k)
        is_root = me_global == root
        want = [torch.empty(k, dtype=dt) for _ in range(n)] if is_root else None
        dist.gather(x, want, dst=root, group=gt)
        outs = [_maybe_strided(torch.zeros(k, dtype=dt), case.noncontig) for _ in range(n)] if is_root else None
        done(comm.gather(_maybe_strided(x, case.noncontig), outs, dst=root, group=gx, async_op=case.async_op))
        return _same(case, n, torch.cat(outs), torch.cat(want)) if is_root else None
    if op == "scatter":
        is_root = me_global == root
        pieces = [_values(case, me_global * 100 + i, k) for i in range(n)] if is_root else None
        want = torch.empty(k, dtype=dt)
        dist.scatter(want, pieces, src=root, group=gt)
        out = _maybe_strided(torch.zeros(k, dtype=dt), case.noncontig)
        done(comm.scatter(out, pieces, src=root, group=gx, async_op=case.async_op))
        return _same(case, n, out, want)
    if op == "all_to_all_single":
        rows = _a2a_matrix(case, n)
        in_splits = rows[me]
        out_splits = [rows[i][me] for i in range(n)]
        width = 1 + case.numel % 3
        x = _values(case, me_global, sum(in_splits) * width).view(-1, width)
        want = torch.empty(sum(out_splits), width, dtype=dt)
        dist.all_to_all_single(want, x, out_splits, in_splits, group=gt)
        out = torch.zeros(sum(out_splits), width, dtype=dt)
        if case.noncontig:
            out = torch.zeros(width, sum(out_splits), dtype=dt).t()
            x = x.t().contiguous().t()
        done(comm.all_to_all_single(out, x, out_splits, in_splits, group=gx, async_op=case.async_op))
        return _same(case, n, out, want)
    if op == "all_to_all":
        rows = _a2a_matrix(case, n)
        ins = [_values(case, me_global * 100 + j, rows[me][j]) for j in range(n)]
        if case.seed % 2:
            # gloo's list all_to_all needs equal sizes: compare uneven ones with the inputs themselves
            want = [_values(case, ranks[i] * 100 + me, rows[i][me]) for i in range(n)]
        else:
            rows = [[k % 5] * n for _ in range(n)]
            ins = [_values(case, me_global * 100 + j, rows[me][j]) for j in range(n)]
            want = [torch.empty(rows[i][me], dtype=dt) for i in range(n)]
            dist.all_to_all(want, ins, group=gt)
        outs = [_maybe_strided(torch.zeros(rows[i][me], dtype=dt), case.noncontig) for i in range(n)]
        done(comm.all_to_all(outs, [_maybe_strided(t, case.noncontig) for t in ins], group=gx, async_op=case.async_op))
        return _same(case, n, torch.cat(outs), torch.cat(want))
    if op == "barrier":
        done(comm.barrier(group=gx, async_op=case.async_op))
        return None
    if op == "send_recv":
        if n == 1:
            return None
        # a ring of point-to-point messages: even group ranks send first, odd ones receive first
        x = _values(case, me_global, k)
        got = torch.zeros(k, dtype=dt)
        nxt, prv = ranks[(me + 1) % n], ranks[(me - 1) % n]
        pg = gx if gx is not None and gx is not SOLO else None
        if me % 2 == 0:
            comm.send(x, nxt, group=pg, tag=3)
            sender = comm.recv(got, prv, group=pg, tag=3)
        else:
            sender = comm.recv(got, prv, group=pg, tag=3)
            comm.send(x, nxt, group=pg, tag=3)
        if sender != prv:
            return f"recv returned sender {sender}, expected {prv}"
        return _same(case, n, got, _values(case, prv, k))
    raise AssertionError(op)


def _make_groups(world: int, rank: int, spec: dict):
    """Every rank creates every group in the same order; returns name -> (ranks, xtrain group, torch group)."""
    made = {}
    singles = [dist.new_group([r]) for r in range(world)]
    for name, members in spec.items():
        if members is None:
            made[name] = (list(range(world)), None, None)
        elif members == "single":
            made[name] = ([rank], singles[rank], singles[rank])
        elif members == "solo":
            made[name] = ([rank], SOLO, singles[rank])
        else:
            g = dist.new_group(sorted(members))
            label_group(g, name)
            made[name] = (sorted(members), g, g)
    return made


def _cases_worker(rank: int, world: int, spec: dict, cases: list[Case]):
    import warnings

    warnings.simplefilter("ignore", FutureWarning)  # torch's reference calls use the older names
    if BACKEND == "nccl":
        torch.set_default_device("cuda")  # every tensor of the cases, xtrain's and torch's alike
    comm = get_comm("xtrain")
    groups = _make_groups(world, rank, spec)
    failures = []
    for case in cases:
        ranks = groups[case.group][0]
        if rank not in ranks:
            continue
        try:
            problem = _run_case(comm, case, groups[case.group], rank)
        except Exception as e:  # noqa: BLE001 - report it; peers may hang, the pg timeout bounds that
            problem = f"raised {type(e).__name__}: {e}"
            failures.append((case, problem))
            break
        if problem:
            failures.append((case, problem))
    return failures


def _check(world: int, spec: dict, cases: list[Case], timeout: float = 240):
    results = run_on_ranks(_cases_worker, world, spec, cases, backend=BACKEND, timeout=timeout, pg_timeout=30)
    failures = [(r, c, p) for r, fs in enumerate(results) for c, p in fs]
    assert not failures, "\n".join(f"rank {r}: {c}: {p}" for r, c, p in failures[:20])


# ---------------------------------------------------------------- case lists


def _matrix_cases(groups, lengths=(13, 1001)) -> list[Case]:
    """Every op x every dtype x awkward lengths, on the given groups."""
    cases, seed = [], 0
    for group in groups:
        for op in OPS:
            for dtype in DTYPES:
                for numel in lengths:
                    seed += 1
                    red = RED_OPS[seed % len(RED_OPS)] if op in REDUCING else "SUM"
                    if red == "AVG" and "float" not in dtype or red in BITWISE and "float" in dtype:
                        red = "SUM"
                    cases.append(
                        Case(
                            op, dtype, numel, group, red=red, root=seed, noncontig=seed % 3 == 0,
                            async_op=seed % 4 == 1, seg_bytes=64 if numel > 100 else 1 << 20,
                            tree_max=0 if seed % 2 else 64 << 10, seed=seed,
                        )
                    )
    return cases


def _every_op_every_group(groups) -> list[Case]:
    """Each op and reduce op on each group, deep-pipelined, at a length not divisible by the group size."""
    cases, seed = [], 10_000
    for group in groups:
        for op in OPS:
            for red in RED_OPS if op in REDUCING else ["SUM"]:
                seed += 1
                dtype = "int32" if red in BITWISE else "float32"
                cases.append(Case(op, dtype, 37, group, red=red, root=seed, seg_bytes=16, tree_max=0, seed=seed))
    return cases


def _case_strategy(groups):
    float_dtypes = [d for d in DTYPES if "float" in d]

    @st.composite
    def case(draw):
        op = draw(st.sampled_from(OPS))
        dtype = draw(st.sampled_from(DTYPES))
        reds = [r for r in RED_OPS if r not in BITWISE] if dtype in float_dtypes else [r for r in RED_OPS if r != "AVG"]
        return Case(
            op=op,
            dtype=dtype,
            numel=draw(st.one_of(st.integers(0, 9), st.integers(0, 3000))),
            group=draw(st.sampled_from(groups)),
            red=draw(st.sampled_from(reds)) if op in REDUCING else "SUM",
            root=draw(st.integers(0, 7)),
            noncontig=draw(st.booleans()),
            async_op=draw(st.booleans()),
            seg_bytes=draw(st.sampled_from([8, 100, 4096, 1 << 20])),
            tree_max=draw(st.sampled_from([0, 64 << 10])),
            seed=draw(st.integers(0, 2**31 - 1)),
        )

    return case()


def _drawn_cases(groups, count: int) -> list[Case]:
    """``count`` hypothesis-drawn cases, the same list on every run."""
    out: list[Case] = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(_case_strategy(groups))
    def collect(case):
        out.append(case)

    collect()
    return out[:count]


# ---------------------------------------------------------------- tests


@pytest.mark.timeout(300)
def test_every_collective_matches_torch_on_8_ranks():
    """Group sizes 8, 5, 4, 3, 2, 1 (real and SOLO) in one 8-rank world."""
    names = list(GROUPS_8)
    cases = _every_op_every_group(names) + _matrix_cases(["five"], lengths=(1001,)) + _drawn_cases(names, 60)
    _check(8, GROUPS_8, cases)


@pytest.mark.timeout(200)
def test_every_collective_matches_torch_on_3_ranks():
    """An odd world, group=None (torch's WORLD), a subgroup listed out of order, size 1."""
    names = list(GROUPS_3)
    cases = _every_op_every_group(names) + _matrix_cases(["world", "pair"]) + _drawn_cases(names, 150)
    _check(3, GROUPS_3, cases)


@pytest.mark.timeout(200)
def test_large_tensors_pipeline_on_4_ranks():
    """MB-sized ragged tensors spanning many segments, each dtype, default tree/chain switch."""
    cases = []
    for i, dtype in enumerate(DTYPES):
        for op in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "reduce", "all_to_all_single"):
            numel = (1 << 20) // _dtype(dtype).itemsize + 5  # ~1 MB, not divisible by 4
            red = "MAX" if "int" in dtype else "SUM"
            cases.append(
                Case(op, dtype, numel, "world", red=red, root=i, noncontig=i == 1, async_op=i == 2,
                     seg_bytes=64 << 10, seed=i)
            )
    _check(4, GROUPS_4, cases)


@pytest.mark.timeout(200)
def test_nccl_posting_discipline_over_gloo_on_4_ranks():
    """The code path NCCL takes (batch_isend_irecv, each receive posted with its step's send,
    broadcast by tree or chain), run over gloo: every op on every group, deep pipelines,
    each dtype at awkward lengths, and MB-sized tensors."""
    names = list(GROUPS_4)
    cases = _every_op_every_group(names) + _matrix_cases(["world", "inner"], lengths=(0, 13, 1001))
    cases += [
        Case(op, dtype, (1 << 20) // _dtype(dtype).itemsize + 5, "world", red="MAX" if "int" in dtype else "SUM",
             root=i, seg_bytes=64 << 10, tree_max=0, seed=i)
        for i, dtype in enumerate(DTYPES)
        for op in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "reduce", "all_to_all_single")
    ]
    _check(4, GROUPS_4, [dataclasses.replace(c, nccl_style=True) for c in cases])


# ---- concurrency, failure


def _two_async_groups_worker(rank: int, world: int):
    comm = get_comm("xtrain")
    evens, odds = dist.new_group([0, 2]), dist.new_group([1, 3])
    label_group(evens, "evens")
    label_group(odds, "odds")
    world_g, mine = None, evens if rank % 2 == 0 else odds
    out = []
    for length in (5, 100_003):
        a = torch.full((length,), float(rank + 1))
        b = torch.arange(length, dtype=torch.float64) * (rank + 1)
        # two collectives in flight at once: one on the rank's pair group, one on the world,
        # issued in opposite orders on even and odd ranks' partners is not allowed by torch
        # semantics, so issue both, then wait in opposite orders
        w1 = comm.all_reduce(a, group=mine, async_op=True)
        w2 = comm.all_gather_into_tensor(torch.empty(world * length, dtype=torch.float64), b, group=world_g, async_op=True)
        g_out = torch.empty(world * length, dtype=torch.float64)
        w3 = comm.all_gather_into_tensor(g_out, b, group=world_g, async_op=True)
        for w in ([w3, w2, w1] if rank % 2 else [w1, w2, w3]):
            w.wait()
        partner_sum = (1 + 3) if rank % 2 == 0 else (2 + 4)
        out.append(bool(torch.all(a == partner_sum)))
        want = torch.cat([torch.arange(length, dtype=torch.float64) * (r + 1) for r in range(world)])
        out.append(bool(torch.equal(g_out, want)))
    return out


def test_two_async_collectives_on_different_groups_complete():
    results = run_on_ranks(_two_async_groups_worker, 4, timeout=120, pg_timeout=20)
    assert all(all(r) for r in results), results


def _absent_rank_worker(rank: int, world: int, pg_timeout: float):
    """Rank 2 is alive but never joins; ranks 0 and 1 must fail, not hang."""
    comm = get_comm("xtrain")
    tp, ep = dist.new_group([0, 1, 2]), dist.new_group([0, 1, 2])
    label_group(tp, "tp")
    label_group(ep, "ep")
    if rank == 2:
        time.sleep(pg_timeout * 4)
        return None
    out = []
    for name, call in (
        ("all_reduce", lambda: comm.all_reduce(torch.ones(1000), group=tp)),
        ("all_to_all_single", lambda: comm.all_to_all_single(torch.empty(3), torch.ones(3), group=ep, async_op=True).wait()),
    ):
        t0 = time.perf_counter()
        try:
            call()
            out.append((name, "no error", "", time.perf_counter() - t0))
        except (CollectiveTimeout, CommError) as e:
            out.append((name, type(e).__name__, str(e), time.perf_counter() - t0))
    return out


def test_absent_rank_fails_within_timeout_naming_op_and_group():
    pg_timeout = 2.0
    results = run_on_ranks(_absent_rank_worker, 3, pg_timeout, timeout=60, pg_timeout=pg_timeout)
    for op, group in (("all_reduce", "tp"), ("all_to_all_single", "ep")):
        kinds = []
        for rank in (0, 1):
            name, kind, msg, seconds = next(r for r in results[rank] if r[0] == op)
            kinds.append(kind)
            assert kind in ("CollectiveTimeout", "CommError"), (rank, op, kind)
            assert f"{op} on group '{group}'" in msg, msg
            assert seconds < 2 * pg_timeout + 1, (rank, op, seconds)
        assert "CollectiveTimeout" in kinds, results


def _recv_from_any_worker(rank: int, world: int):
    """Ranks 1..n-1 send their rank to rank 0, which receives from any source, with each comm."""
    senders = {}
    for tag, name in enumerate(("xtrain", "torch"), start=5):  # a tag each: the phases must not match
        comm = get_comm(name)
        box = torch.tensor([float(rank)])
        if rank:
            comm.send(box, 0, tag=tag)
            continue
        got = []
        for _ in range(world - 1):
            src = comm.recv(box, tag=tag)
            got.append((src, int(box.item())))
        senders[name] = sorted(got)
    return senders


def test_recv_from_any_source_returns_the_sender():
    results = run_on_ranks(_recv_from_any_worker, 3, timeout=60)
    for name in ("xtrain", "torch"):
        assert results[0][name] == [(1, 1), (2, 2)], (name, results[0])


def _size_mismatch_worker(rank: int, world: int):
    comm = get_comm("xtrain")
    messages = []
    for call in (lambda: comm.reduce_scatter_tensor(torch.empty(3), torch.empty(7)),
                 lambda: comm.all_gather_into_tensor(torch.empty(7), torch.empty(3))):
        with pytest.raises(ValueError) as e:
            call()
        messages.append(str(e.value))
    return messages


def test_size_mismatch_is_refused_before_any_message():
    """gloo hangs on these until its timeout; xtrain refuses them at once on every rank."""
    for messages in run_on_ranks(_size_mismatch_worker, 2, timeout=60):
        assert messages == [
            "reduce_scatter_tensor: input has 7 elements, expected group size 2 x output's 3",
            "all_gather_into_tensor: output has 7 elements, expected group size 2 x input's 3",
        ]


# ---- single-process behaviour (no process group)


def test_solo_group_collectives_are_local_copies():
    comm = get_comm("xtrain")
    x = torch.arange(6.0)
    comm.all_reduce(x, group=SOLO)
    assert torch.equal(x, torch.arange(6.0))
    out = torch.empty(6)
    comm.reduce_scatter_tensor(out, torch.arange(6.0), group=SOLO)
    assert torch.equal(out, torch.arange(6.0))
    out2 = torch.empty(6)
    w = comm.all_gather_into_tensor(out2, torch.arange(6.0), group=SOLO, async_op=True)
    assert w.wait() and torch.equal(out2, torch.arange(6.0))
    lst = [torch.empty(2)]
    comm.all_to_all(lst, [torch.ones(2)], group=SOLO)
    assert torch.equal(lst[0], torch.ones(2))
    assert comm.ledger.summary_rows() == []  # nothing on the wire, nothing in the ledger


def test_integer_avg_is_refused_like_gloo():
    comm = get_comm("xtrain")
    with pytest.raises(TypeError, match="AVG"):
        comm.all_reduce(torch.ones(3, dtype=torch.int32), op=dist.ReduceOp.AVG, group=SOLO)


def test_tree_shape():
    from xtrain.comm.tree import tree_children, tree_parent, tree_rounds

    for n in range(1, 17):
        reached = {0}
        for v in range(n):
            for c in tree_children(v, n):
                assert tree_parent(c) == v and c < n
                reached.add(c)
        assert reached == set(range(n))
        assert len(tree_children(0, n)) == tree_rounds(n)


def test_scratch_buffers_are_reused_exclusively_and_bounded():
    from xtrain.comm import scratch

    scratch.clear()
    a, raw_a = scratch.take(1000, torch.float32, torch.device("cpu"))
    b, raw_b = scratch.take(1000, torch.float32, torch.device("cpu"))
    assert a.numel() == b.numel() == 1000 and a.dtype == torch.float32
    assert raw_a.data_ptr() != raw_b.data_ptr()  # in use by two callers at once: two buffers
    scratch.give(raw_a)
    c, raw_c = scratch.take(500, torch.float64, torch.device("cpu"))  # fits in a's 4000 bytes
    assert raw_c.data_ptr() == raw_a.data_ptr() and c.dtype == torch.float64 and c.numel() == 500
    scratch.give(raw_b)
    scratch.give(raw_c)
    big = torch.empty(scratch.MAX_KEEP_BYTES + 1, dtype=torch.uint8)
    scratch.give(big)  # too large to keep
    d, raw_d = scratch.take(10, torch.int64, torch.device("cpu"))
    assert raw_d.data_ptr() != big.data_ptr()
    scratch.clear()


def test_all_reduce_takes_two_shot_for_mid_sizes_on_gloo_only():
    from xtrain.comm.direct import use_two_shot

    kib, mib = 1 << 10, 1 << 20
    assert not use_two_shot(1 * mib - 4, 4)  # chunk under 256 KiB: ring
    assert use_two_shot(1 * mib, 4) and use_two_shot(8 * mib, 4)
    assert not use_two_shot(8 * mib + 4, 4)  # chunk over 2 MiB: ring
    assert use_two_shot(16 * mib, 8) and not use_two_shot(1 * mib, 8)
    assert use_two_shot(768 * kib, 3) and not use_two_shot(768 * kib - 3, 3)  # ceil(S/n) is the chunk
    assert not use_two_shot(256 * kib, 1)
    assert not use_two_shot(4 * mib, 4, post_ahead=False)  # NCCL: the ring


def test_broadcast_shape_follows_the_cost_model_and_thresholds():
    from xtrain.comm import ring, tree

    seg = ring.SEGMENT_BYTES
    assert tree.use_tree(seg, 4, 4)  # one segment: tree (2 rounds) beats chain (3 hops)
    assert not tree.use_tree(2 * seg, 4, 4)  # two segments: chain 4 half-times = tree's 4
    assert tree.use_tree(64 << 20, 2, 4)  # two ranks: one message either way
    assert tree.use_tree(2 * seg, 8, 4) and not tree.use_tree(3 * seg, 8, 4)
    # broadcast on gloo (receives posted ahead): tree, star, scatter + ring, chain by size
    mib = 1 << 20
    assert tree.broadcast_shape(64 << 10, 4, 4) == "tree"
    assert tree.broadcast_shape((64 << 10) + 4, 4, 4) == "star"
    assert tree.broadcast_shape(2 * mib, 4, 4) == "star"
    assert tree.broadcast_shape(2 * mib + 4, 4, 4) == "scatter_ring"
    assert tree.broadcast_shape(16 * mib, 4, 4) == "scatter_ring"
    assert tree.broadcast_shape(16 * mib + 4, 4, 4) == "chain"
    assert tree.broadcast_shape(64 * mib, 2, 4) == "tree"
    # without posting ahead (NCCL) only the tree and the chain, as the cost model says
    assert tree.broadcast_shape(2 * mib, 4, 4, post_ahead=False) == "tree"
    assert tree.broadcast_shape(2 * seg, 4, 4, post_ahead=False) == "chain"
