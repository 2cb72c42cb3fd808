"""Split backward (I, W), overlapped F&B, ZB-H1, DualPipe and DualPipeV (pure Python).

Each new schedule at several shapes is valid (also on an untagged channel),
runs every (stage, micro-batch) of its micro-batches' chains once, follows
its reference's order (torch.distributed.pipelining's generators where it
has one, deepseek-ai/DualPipe's phases), and its simulated idle per rank is
the closed form of ``xtrain.formulas.pipeline_bubble_time`` (the DualPipe
README's table); peak activations are 1F1B's p for ZB-H1 and p+1 for
DualPipe. Hand-broken lists with I, W and OVERLAP are rejected by name.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from fractions import Fraction
from types import SimpleNamespace

import pytest

from xtrain.formulas import pipeline_bubble_time
from xtrain.parallel.pipeline import (
    SCHEDULES,
    Action,
    Costs,
    Schedule,
    ScheduleError,
    add_communication,
    build_schedule,
    check_schedule_config,
    find_problems,
    from_compute,
    parse_actions,
    receives_in_send_order,
    schedule_layout,
    simulate,
    timeline_from_json,
    timeline_to_json,
    validate,
)

NEW_SHAPES = (
    [("zb1p", p, m) for p in (1, 2, 3, 4, 5) for m in sorted({p, p + 1, 2 * p})]
    + [("dualpipe", p, m) for p in (2, 4, 6) for m in (2 * p, 2 * p + 2, 4 * p)]
    + [("dualpipev", p, m) for p in (1, 2, 3, 4) for m in (2 * p, 2 * p + 1, 3 * p)]
)
IDS = [f"{n}-p{p}-m{m}" for n, p, m in NEW_SHAPES]


def _costs(f, i, w, fb=None) -> Costs:
    return Costs(F=Fraction(f), B=Fraction(i + w), I=Fraction(i), W=Fraction(w), overlap=None if fb is None else Fraction(fb))


# -- the action vocabulary ---------------------------------------------------------------------


def test_overlap_text_round_trips_and_old_actions_are_unchanged():
    a = Action.overlap(Action("F", 2, 5), Action("B", 0, 3))
    assert a == Action("OVERLAP", -1, -1, sub=(Action("F", 2, 5), Action("B", 0, 3)))
    assert str(a) == "(2F5+0B3)" and Action.parse("(2F5+0B3)") == a
    assert a.parts == (Action("F", 2, 5), Action("B", 0, 3)) and a.is_compute
    for text in ("0I3", "2W0", "(1F4+6I2)"):
        assert str(Action.parse(text)) == text
    row = "0F0 (0F1+3B0) 0SEND_F1 0I1 0W1"
    assert " ".join(map(str, parse_actions(row))) == row
    table = build_schedule("dualpipe", 2, 4).table()
    rows = [parse_actions(line.split("|", 1)[1]) for line in table.splitlines()[1:]]
    assert rows == build_schedule("dualpipe", 2, 4).actions and "chains=[[0, 1], [2, 3]]" in table
    plain = Action("F", 0, 3)
    assert plain.sub == () and plain.parts == (plain,) and str(plain) == "0F3"
    for bad in ("(0F1+)", "(0F1+0B2", "((0F1+0B2)+0F3)", "()"):
        with pytest.raises(ValueError, match="cannot parse"):
            Action.parse(bad)


# -- stages, chains and what the executor asks ---------------------------------------------------


def test_dualpipe_layout_has_two_chains_over_two_copies():
    p, m = 4, 8
    s = build_schedule("dualpipe", p, m)
    assert s.stage_rank == [0, 1, 2, 3, 3, 2, 1, 0] and s.paths == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [s.stage_layers_of(st) for st in range(2 * p)] == [0, 1, 2, 3, 0, 1, 2, 3] and s.n_blocks == p
    assert s.first_stages == {0, 4} and s.last_stages == {3, 7}
    assert (s.prev_stage(4), s.next_stage(3), s.prev_stage(5), s.next_stage(6)) == (None, None, 4, 7)
    assert [s.mb_stages(i) for i in (0, 3, 4, 7)] == [[0, 1, 2, 3]] * 2 + [[4, 5, 6, 7]] * 2
    assert s.stages_of(1) == [1, 6] and s.stages_of_block(1) == [1, 5]  # block 1's copies: ranks 1 and 2
    assert s.rank_of(5) == 2 and schedule_layout("dualpipe", p).paths == s.paths


def test_dualpipev_and_single_chain_layouts():
    s = build_schedule("dualpipev", 3, 6)
    assert s.stage_rank == [0, 1, 2, 2, 1, 0] and s.paths == [list(range(6))]
    assert s.first_stages == {0} and s.last_stages == {5} and s.stages_of(0) == [0, 5]
    assert [s.stage_layers_of(st) for st in range(6)] == list(range(6)) and s.n_blocks == 6
    assert s.next_stage(2) == 3 and s.mb_stages(5) == list(range(6))
    one = build_schedule("1f1b", 4, 4)
    assert one.chains is None and one.first_stages == {0} and one.last_stages == {3}
    assert [one.stage_layers_of(st) for st in range(4)] == [0, 1, 2, 3]
    for name, v in (("interleaved_1f1b", 2), ("zb1p", 1), ("dualpipev", 1), ("gpipe", 1)):
        layout = schedule_layout(name, 4, v)
        built = build_schedule(name, 4, 8, v)
        assert layout.stage_rank == built.stage_rank and layout.paths == built.paths and layout.n_micro == 0
    with pytest.raises(ValueError, match="even pp"):
        schedule_layout("dualpipe", 3)


# -- every new schedule at several shapes -----------------------------------------------------------


@pytest.mark.parametrize("name,p,m", NEW_SHAPES, ids=IDS)
def test_new_schedule_is_valid_and_runs_its_chains_once(name, p, m):
    s = build_schedule(name, p, m)
    validate(s)
    validate(s, recv_blocks=False)
    validate(s, p2p_order="fifo")  # receives_in_send_order: safe on NCCL's untagged channel too
    for rank, row in enumerate(s.actions):
        parts = [x for a in row if a.is_compute for x in a.parts]
        counts = Counter((x.kind, x.stage, x.mb) for x in parts)
        assert set(counts.values()) == {1}
        for st in s.stages_of(rank):
            for i in range(m):
                if st not in s.mb_stages(i):
                    assert not any((k, st, i) in counts for k in "FBIW")
                    continue
                assert ("F", st, i) in counts
                assert (("B", st, i) in counts) != (("I", st, i) in counts and ("W", st, i) in counts)
        for a in row:
            if a.kind == "OVERLAP":
                f, b = a.sub
                assert f.kind == "F" and b.kind in "BI" and f.mb != b.mb
    # Sends and receives: the shared pass, receives then posted in send order.
    lowered = add_communication(s.stage_rank, s.compute_order(), s.prev_stage, s.next_stage)
    assert [Counter(row) for row in lowered] == [Counter(row) for row in s.actions]
    assert receives_in_send_order(Schedule(s.name, p, m, s.stage_rank, lowered, s.chains, s.mb_chain)) == s.actions


def test_overlap_gets_both_receives_before_and_both_sends_after():
    s = build_schedule("dualpipe", 4, 8)
    row = s.actions[1]
    j = row.index(Action.overlap(Action("F", 6, 6), Action("B", 1, 0)))
    assert row[j - 2 : j] == [Action("RECV_F", 6, 6), Action("RECV_B", 1, 0)]
    assert row[j + 1 : j + 3] == [Action("SEND_F", 6, 6), Action("SEND_B", 1, 0)]
    # W needs no message; I sends its input gradient upstream as B does.
    k = row.index(Action("I", 6, 7))
    assert row[k - 1] == Action("RECV_B", 6, 7) and row[k + 1] == Action("SEND_B", 6, 7)
    assert row[-2:] == [Action("W", 6, 7), Action("W", 1, 3)]


def test_receives_follow_the_peers_send_order_where_add_communication_would_not():
    s = build_schedule("dualpipev", 3, 6)
    lowered = add_communication(s.stage_rank, s.compute_order(), s.prev_stage, s.next_stage)
    just_in_time = Schedule(s.name, 3, 6, s.stage_rank, lowered)
    assert "receives out of order on the untagged channel" in "\n".join(find_problems(just_in_time, p2p_order="fifo"))
    validate(just_in_time)  # tagged: fine either way
    # rank 1 posts 1F4's receive before 4I0's (rank 0 sends 0F4 first), as the reference pre-posts it
    row = s.actions[1]
    assert row.index(Action("RECV_F", 1, 4)) < row.index(Action("RECV_B", 4, 0)) < row.index(Action("I", 4, 0))


# -- each follows its reference ------------------------------------------------------------------------


def test_zb1p_is_1f1b_with_weight_gradients_delayed_r_slots():
    s = build_schedule("zb1p", 4, 8)
    rows = [" ".join(map(str, row)) for row in s.compute_order()]
    assert rows[0].startswith("0F0 0F1 0F2 0F3 0I0 0W0 0F4 0I1 0W1")  # rank 0: W right after its I
    assert rows[3].startswith("3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3F4 3I4 3W1")  # rank 3: 3 slots late
    assert rows[3].endswith("3I7 3W4 3W5 3W6 3W7")
    warmups = [next(j for j, a in enumerate(row) if a.kind == "I") for row in s.compute_order()]
    assert warmups == [4, 3, 2, 1]  # 1F1B's p-1-r warm-up forwards, then the first forward of the steady state


def test_dualpipe_follows_the_reference_phases():
    """deepseek-ai/DualPipe ``DualPipe.step`` at p=4 (n = p/2 = 2), m=8 (4 per
    direction), written out by hand: rank 0 (h=0) runs 2 F0, 1x(F0 F1),
    1x(I1 W F1), 1x((F0&B1) (F1&B0)), 1x(B1 (F1&B0)), 1x(B1 I0), 1x(W I0), W;
    rank 1 (h=1, the middle rank) has no zero-bubble phases 3 and 7 and runs
    its first main-step pair apart."""
    rows = [" ".join(map(str, row)) for row in build_schedule("dualpipe", 4, 8).compute_order()]
    assert rows[0] == "0F0 0F1 0F2 7F4 7I4 7W4 7F5 (0F3+7B5) (7F6+0B0) 7B6 (7F7+0B1) 7B7 0I2 0W2 0I3 0W3"
    assert rows[1] == "1F0 6F4 1F1 6F5 1F2 6B4 (6F6+1B0) (1F3+6B5) (6F7+1B1) 6B6 1B2 6I7 1I3 6W7 1W3"
    # ranks p-1-r mirror ranks r with the directions swapped (phase 0 enters on each half's side)
    assert rows[3] == "4F4 4F5 4F6 3F0 3I0 3W0 3F1 (4F7+3B1) (3F2+4B4) 3B2 (3F3+4B5) 3B3 4I6 4W6 4I7 4W7"


def _phase_counts(p: int, m: int, r: int) -> list[int]:
    """The reference's step counts on rank r (steps 1..8), DualPipe."""
    n, h, k = p // 2, min(r, p - 1 - r), m // 2
    return [2 * (n - h - 1), h + 1, n - h - 1, k - 2 * n + h + 1, n - h - 1, h + 1, n - h - 1, h + 1]


@pytest.mark.parametrize("p,m", [(2, 4), (4, 10), (6, 12), (8, 20)])
def test_dualpipe_phase_sizes_match_the_reference(p, m):
    s = build_schedule("dualpipe", p, m)
    for r, row in enumerate(s.compute_order()):
        c = _phase_counts(p, m, r)
        overlaps = sum(a.kind == "OVERLAP" for a in row)
        middle = min(r, p - 1 - r) == p // 2 - 1  # the reference runs its first main-step pair apart
        assert overlaps == 2 * c[3] + c[4] - middle
        assert sum(a.kind == "W" for a in row) == sum(a.kind == "I" for a in row) == c[2] + c[6] + c[7]
        leading = next(j for j, a in enumerate(row) if a.kind != "F" or a.stage != row[0].stage)
        assert leading == c[0] + 1  # 2(n-h-1) warm-up forwards, then step 2's first F0
        assert [a.kind for a in row[-c[7] :]] == ["W"] * c[7]


@pytest.mark.parametrize("p,m", [(1, 2), (2, 4), (3, 7), (4, 10), (5, 12)])
def test_dualpipev_equals_torch_schedule_dualpipev(p, m):
    """torch's ScheduleDualPipeV (itself written from deepseek-ai/DualPipe's
    DualPipeV.step) gives the same compute order on every rank."""
    ts = pytest.importorskip("torch.distributed.pipelining.schedules")
    ours = build_schedule("dualpipev", p, m).compute_order()
    for r in range(p):
        theirs = ts.ScheduleDualPipeV._calculate_single_rank_operations(SimpleNamespace(pp_group_size=p, _n_microbatches=m), r)
        assert [_torch_text(ts, a) for a in theirs if a is not None] == [str(a) for a in ours[r]]


@pytest.mark.parametrize("p,m", [(2, 2), (3, 4), (4, 8), (5, 6), (4, 12)])
def test_zb1p_equals_torch_zb1p_with_one_stage_per_rank(p, m):
    ts = pytest.importorskip("torch.distributed.pipelining.schedules")
    ours = build_schedule("zb1p", p, m).compute_order()
    for r in range(p):
        this = SimpleNamespace(pp_group_size=p, _n_microbatches=m, n_local_stages=1, microbatches_per_round=m // max(1, m // p))
        theirs = ts.ScheduleInterleavedZeroBubble._calculate_single_rank_operations(this, r)
        assert [_torch_text(ts, a) for a in theirs if a is not None] == [str(a) for a in ours[r]]


def _torch_text(ts, a) -> str:
    if a.sub_actions:
        return "(" + "+".join(_torch_text(ts, x) for x in a.sub_actions) + ")"
    kind = {
        ts._ComputationType.FORWARD: "F",
        ts._ComputationType.FULL_BACKWARD: "B",
        ts._ComputationType.BACKWARD_INPUT: "I",
        ts._ComputationType.BACKWARD_WEIGHT: "W",
    }[a.computation_type]
    return f"{a.stage_index}{kind}{a.microbatch_index}"


# -- closed forms: the DualPipe README's table ------------------------------------------------------------

# (F, I, W) with I = B - W: the README figure's unit costs, and a slower forward/backward pair.
UNIT, HEAVY = (1, 1, 1), (2, 2, 1)


@pytest.mark.parametrize("f,i,w", [UNIT, HEAVY, (3, 2, 1), (1, 2, 1)])
@pytest.mark.parametrize("p", [2, 3, 4])
def test_zb1p_idle_is_p_minus_1_times_f_plus_b_minus_2w(p, f, i, w):
    b = i + w
    for m in (p, p + 1, 2 * p):
        timeline = simulate(build_schedule("zb1p", p, m), _costs(f, i, w))
        assert timeline.idle == [(p - 1) * (f + b - 2 * w)] * p == [pipeline_bubble_time("zb1p", p, f, b, w)] * p
        one = simulate(build_schedule("1f1b", p, m), _costs(f, i, w))
        assert one.idle == [(p - 1) * (f + b)] * p == [pipeline_bubble_time("1f1b", p, f, b, w)] * p
    if (f, i, w) == UNIT:  # a third of 1F1B's when F = I = W
        assert 3 * timeline.idle[0] == one.idle[0]


def test_zb1p_idle_when_w_cannot_hide():
    # W longer than F: the gap it fills is F long, so idle (p-1)·max(F+B-2W, F, B-W).
    for p, (f, i, w) in [(4, (1, 1, 2)), (3, (1, 3, 2)), (4, (3, 1, 2))]:
        timeline = simulate(build_schedule("zb1p", p, 2 * p), _costs(f, i, w))
        assert timeline.idle == [(p - 1) * max(f + i - w, f, i)] * p == [pipeline_bubble_time("zb1p", p, f, i + w, w)] * p


@pytest.mark.parametrize("f,i,w", [UNIT, HEAVY, (3, 3, 2)])
@pytest.mark.parametrize("p", [2, 4, 6])
def test_dualpipe_idle_is_half_p_minus_1_times_fb_plus_b_minus_3w(p, f, i, w):
    b = i + w
    for m in (2 * p, 2 * p + 2, 4 * p):
        # F&B = F + B (the reference figure's overlapped cells): the same idle on every rank
        timeline = simulate(build_schedule("dualpipe", p, m), _costs(f, i, w))
        assert timeline.idle == [(p // 2 - 1) * (f + b + b - 3 * w)] * p == [pipeline_bubble_time("dualpipe", p, f, b, w)] * p
        # F&B = B (as fast as the backward alone): the middle ranks idle the closed form, the outer ones less
        fast = simulate(build_schedule("dualpipe", p, m), _costs(f, i, w, fb=b))
        assert max(fast.idle) == (p // 2 - 1) * (2 * b - 3 * w) == pipeline_bubble_time("dualpipe", p, f, b, w, FB=b)
        assert fast.idle[p // 2] == max(fast.idle) and fast.idle[0] <= max(fast.idle)


def test_dualpipev_idle_is_the_readme_formula_with_pp_its_stages():
    # The README's DualPipeV row, PP = 2p stages on p ranks: (p-1)(F&B+B-3W), per-stage costs.
    for p in (1, 2, 3, 4):
        for f, i, w in (UNIT, HEAVY):
            b = i + w
            timeline = simulate(build_schedule("dualpipev", p, 2 * p + 2), _costs(f, i, w))
            assert timeline.idle == [(p - 1) * (f + 2 * b - 3 * w)] * p == [pipeline_bubble_time("dualpipev", p, f, b, w)] * p
    # Stages half a rank's share (F = I = W = 1/2): 3 per rank, against 1F1B's 9 on the same 4 ranks.
    half = Fraction(1, 2)
    assert simulate(build_schedule("dualpipev", 4, 8), _costs(half, half, half)).idle == [3] * 4


def test_readme_formula_is_an_approximation_when_forward_and_input_grad_differ():
    # Outside F = I the table is off by a W-sized term either way (the simulation is the measure).
    p = 4
    assert simulate(build_schedule("dualpipe", p, 8), _costs(1, 2, 1)).idle == [3] * p
    assert pipeline_bubble_time("dualpipe", p, 1, 3, 1) == 4
    assert simulate(build_schedule("dualpipe", p, 8), _costs(2, 1, 1)).idle == [4] * p
    assert pipeline_bubble_time("dualpipe", p, 2, 2, 1) == 3
    with pytest.raises(ValueError, match="no closed-form bubble time"):
        pipeline_bubble_time("nope", 4, 1, 2, 1)


# -- memory -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2, 4, 6])
def test_peak_activations_1f1b_p_zb1p_p_dualpipe_p_plus_1_dualpipev_2p_plus_1(p):
    costs = _costs(1, 1, 1)
    assert max(simulate(build_schedule("1f1b", p, 2 * p), costs).peak_activations) == p
    zb = simulate(build_schedule("zb1p", p, 2 * p), costs)
    assert zb.peak_activations == [p] * p  # 1F1B's peak, now on every rank
    # between I and W a micro-batch holds half its activations (the default fraction)
    assert zb.peak_memory == [p - Fraction(r, 2) for r in range(p)]
    dual = simulate(build_schedule("dualpipe", p, 2 * p + 2), costs)
    assert dual.peak_activations == [p + 1] * p and dual.peak_memory == [p + 1] * p  # "Activation PP+1"
    v = simulate(build_schedule("dualpipev", p, 2 * p), costs)
    assert v.peak_activations == [2 * p + 1] * p  # PP+1 with PP = its 2p stages (each half a rank's share)


def test_memory_curve_follows_f_i_w_and_the_fraction():
    s = build_schedule("zb1p", 2, 2)
    for a in (Fraction(1, 4), Fraction(0), Fraction(1)):
        expected = [2, 1 + a]  # rank 1 holds micro-batch 0's share a while micro-batch 1 runs
        timeline = simulate(s, Costs(F=1, B=2, W=1, act_fraction_after_I=a))
        assert timeline.peak_memory == expected
        for r in range(2):
            curve = timeline.memory(r)
            assert curve[0][1] == 0 and curve[-1][1] == 0 and min(h for _, h in curve) >= 0
    # rank 1 (stage 1, W one slot late): F0 I0 F1 I1 W0 W1
    curve = simulate(s, Costs(F=1, B=2, W=1)).memory(1)
    assert [h for _, h in curve] == [0, 1, Fraction(1, 2), Fraction(3, 2), 1, Fraction(1, 2), 0]
    with pytest.raises(ValueError, match="act_fraction_after_I"):
        Costs(act_fraction_after_I=2)


# -- costs and timelines ----------------------------------------------------------------------------------


def test_costs_of_split_and_overlapped_actions():
    c = Costs(F=1, B=3)
    assert (c.input_cost, c.weight_cost) == (Fraction(3, 2), Fraction(3, 2))  # halves by default
    assert (Costs(B=3, W=1).input_cost, Costs(B=3, I=1).weight_cost) == (2, 2)
    assert Costs(B=3, kinds={"W": 1}).input_cost == 2
    ov = Action.overlap(Action("F", 0, 1), Action("B", 1, 0))
    assert Costs(F=1, B=2).duration(ov) == 3 and Costs(F=1, B=2, overlap=Fraction(5, 2)).duration(ov) == Fraction(5, 2)
    assert Costs(F=1, B=2, W=Fraction(1, 2)).duration(Action.overlap(Action("F", 0, 1), Action("I", 1, 0))) == Fraction(5, 2)
    assert Costs(per_stage={("I", 0): 7}).duration(Action("I", 0, 0)) == 7


def test_overlap_shortens_dualpipe_and_timelines_round_trip_through_json(tmp_path):
    s = build_schedule("dualpipe", 4, 8)
    slow, fast = simulate(s, _costs(1, 1, 1)), simulate(s, _costs(1, 1, 1, fb=Fraction(5, 2)))
    assert fast.makespan < slow.makespan
    ov = [iv for iv in fast.intervals[0] if iv.action.kind == "OVERLAP"]
    assert ov and all(iv.duration == Fraction(5, 2) for iv in ov)
    data = timeline_to_json(fast, tmp_path / "t.json")
    assert any("sub" in e for e in data["ranks"][0])
    back = timeline_from_json(tmp_path / "t.json")
    assert back.intervals == fast.intervals and back.peak_memory == fast.peak_memory
    # measured costs (per kind and stage; OVERLAP as one mean) re-simulate the same timeline
    assert simulate(s, Costs.from_timeline(fast)).intervals == fast.intervals


# -- the validator on broken lists -----------------------------------------------------------------------------


def _two_ranks(rank0: str, rank1: str, m: int = 2) -> Schedule:
    return Schedule("hand", 2, m, [0, 1], [parse_actions(rank0), parse_actions(rank1)])


ZB0 = "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0I0 0RECV_B1 0I1 0W0 0W1"
ZB1 = "1RECV_F0 1F0 1RECV_F1 1F1 1I0 1SEND_B0 1I1 1SEND_B1 1W0 1W1"


def _problems(s: Schedule, **kw) -> str:
    with pytest.raises(ScheduleError) as info:
        validate(s, **kw)
    return str(info.value)


def test_split_backward_lists_pass_and_wrong_ones_are_named():
    validate(_two_ranks(ZB0, ZB1))
    early_w = _two_ranks("0F0 0SEND_F0 0F1 0SEND_F1 0W0 0RECV_B0 0I0 0RECV_B1 0I1 0W1", ZB1)
    assert "rank 0, action 4 (0W0): W before its I: no 0I0 earlier on rank 0" in _problems(early_w)
    message = _problems(_two_ranks(ZB0.replace(" 0W1", ""), ZB1))
    assert "rank 0, missing 0W1: 0I1 runs at action 7, but no W computes its weight gradients" in message
    message = _problems(_two_ranks(ZB0 + " 0W1", ZB1))
    assert "rank 0, action 10 (0W1): duplicate of action 9 on the same rank" in message
    message = _problems(_two_ranks("0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0I0 0RECV_B1 0B1 0W0 0I1", ZB1))
    assert "rank 0, action 9 (0I1): 0I1 beside 0B1 (action 7): a (stage, micro-batch) has one B, or one I and one W" in message
    message = _problems(_two_ranks(ZB0, "1RECV_F0 1F0 1RECV_F1 1F1 1SEND_B0 1I0 1I1 1SEND_B1 1W0 1W1"))
    assert "rank 1, action 4 (1SEND_B0): send before the compute it sends: no 1I0 earlier on rank 1" in message


def test_overlap_rules_are_checked():
    good1 = "1RECV_F0 1F0 1RECV_F1 1F1 1B0 1SEND_B0 1B1 1SEND_B1"
    overlapped0 = "0F0 0SEND_F0 0RECV_B0 (0F1+0B0) 0SEND_F1 0RECV_B1 0B1"
    # Legal shape (different micro-batches on owned stages), but it deadlocks: rank 1
    # needs 0F1 before it sends the gradient 0B0 waits for.
    message = _problems(_two_ranks(overlapped0, good1), recv_blocks=False)
    assert "rank 0, action 3 ((0F1+0B0)): deadlock: waits on its 0RECV_B0 for 1SEND_B0 from rank 1" in message
    one_rank = Schedule("one", 1, 2, [0, 0], [parse_actions("0F0 1F0 (0F1+1B0) 1F1 0B0 1B1 0B1")])
    validate(one_rank)  # local hand-overs through an OVERLAP
    for text, expected in [
        ("0F0 (0F1+0F0) 1F0", "an OVERLAP holds a forward then a backward (F, then B or I), got (0F1, 0F0)"),
        ("0F0 1F0 (1F1+1B1) 1B0", "an OVERLAP runs two different micro-batches, got micro-batch 1 twice"),
        ("0F0 1F0 (0F1+1B0) 1F1 0B0 1B1 0B1 0W1", "rank 0, action 7 (0W1): W after 0B1 (action 6)"),
    ]:
        broken = Schedule("one", 1, 2, [0, 0], [parse_actions(text)])
        assert expected in "\n".join(find_problems(broken))
    two = _two_ranks("0F0 0SEND_F0 (0F1+1B0) 0RECV_B0 0B0 0F1", good1)
    assert "rank 0, action 2 ((0F1+1B0)): stage 1 lives on rank 1, not on rank 0" in _problems(two)
    bad_fields = Schedule("one", 1, 1, [0], [[Action("OVERLAP", 0, 0, (Action("F", 0, 0), Action("B", 0, 0)))]])
    assert "an OVERLAP has stage -1 and mb -1" in "\n".join(find_problems(bad_fields))
    stray = Schedule("one", 1, 1, [0], [[Action("F", 0, 0, (Action("F", 0, 0),)), Action("B", 0, 0)]])
    assert "only an OVERLAP holds sub-actions" in "\n".join(find_problems(stray))


def test_micro_batches_stay_on_their_chain():
    s = build_schedule("dualpipe", 2, 4)
    broken = Schedule(s.name, 2, 4, s.stage_rank, [row[:] for row in s.actions], s.chains, s.mb_chain)
    broken.actions[0].append(Action("F", 0, 3))  # micro-batch 3 takes direction 1 (stages 2, 3)
    assert "micro-batch 3 does not pass stage 0 (its stages: [2, 3])" in "\n".join(find_problems(broken))
    bad_chain = Schedule(s.name, 2, 4, s.stage_rank, s.actions, [[0, 1], [2]], s.mb_chain)
    assert "must hold every stage 0..3 exactly once" in "\n".join(find_problems(bad_chain))
    short = Schedule(s.name, 2, 4, s.stage_rank, s.actions, s.chains, [0, 1])
    assert "mb_chain has 2 entries for 4 micro-batches" in "\n".join(find_problems(short))


def test_any_two_chain_table_lowers_through_from_compute():
    # Two one-stage chains on one rank each, micro-batch 0 on chain 0, micro-batch 1 on chain 1.
    s = from_compute("two", 2, 2, [0, 1], [parse_actions("0F0 0B0"), parse_actions("1F1 1B1")], [[0], [1]], [0, 1])
    assert s.actions == [parse_actions("0F0 0B0"), parse_actions("1F1 1B1")]  # both stages are first and last
    validate(s)
    assert simulate(s).makespan == 2


# -- rules, before any collective ---------------------------------------------------------------------------------


def test_rules_of_the_new_schedules():
    assert {"zb1p", "dualpipe", "dualpipev"} <= set(SCHEDULES)
    with pytest.raises(ValueError, match=r"dualpipe needs an even pp .*got pp=3; use 2 or 4"):
        build_schedule("dualpipe", 3, 6)
    with pytest.raises(ValueError, match=r"dualpipe needs micro_batches even and >= 2\*pp .*got micro_batches=7, pp=4; use 8"):
        build_schedule("dualpipe", 4, 7)
    with pytest.raises(ValueError, match=r"micro_batches=9, pp=4; use 10"):
        build_schedule("dualpipe", 4, 9)
    with pytest.raises(ValueError, match=r"dualpipev needs micro_batches >= 2\*pp .*got micro_batches=7, pp=4; use 8"):
        build_schedule("dualpipev", 4, 7)
    with pytest.raises(ValueError, match=r"zb1p needs micro_batches >= pp .*got micro_batches=3, pp=4; use 4"):
        build_schedule("zb1p", 4, 3)
    with pytest.raises(ValueError, match=r"pp_chunks must be 1 for dualpipev \(two stages per rank, placed by the schedule\)"):
        build_schedule("dualpipev", 2, 4, 2)
    assert build_schedule("dualpipev", 1, 2).n_stages == 2 and build_schedule("zb1p", 1, 1).n_stages == 1


def test_check_schedule_config_counts_layer_blocks():
    assert check_schedule_config("dualpipe", 4, 8, 1, n_layers=4) == []  # two copies of 4 blocks
    assert check_schedule_config("dualpipev", 4, 8, 1, n_layers=8) == []
    problems = check_schedule_config("dualpipev", 4, 6, 1, n_layers=7)
    assert len(problems) == 2 and "2*pp" in problems[0] and "needs 8 layer blocks" in problems[1]
    problems = check_schedule_config("dualpipe", 3, 5, 1, n_layers=2)
    assert len(problems) == 3 and "needs 3 layer blocks (each run by two stages)" in problems[2]
    assert check_schedule_config("zb1p", 4, 4, 1, n_layers=4) == []


# -- the side-by-side comparison ----------------------------------------------------------------------------------


def test_pipeline_sim_prints_every_schedule(capsys, tmp_path):
    from xtrain import pipeline_sim

    assert pipeline_sim.main(["--pp", "4", "--micro", "8", "--f", "1", "--b", "2", "--w", "1"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(lines) == {"gpipe", "1f1b", "interleaved_1f1b", "zb1p", "dualpipe", "dualpipev"}
    # idle per rank and the closed form: 1F1B 9, ZB-H1 3 (a third), DualPipe 2, DualPipeV 3 (half-size stages)
    assert lines["1f1b"][3:8] == ["9", "9", "9", "9", "9"] and lines["zb1p"][3:8] == ["3"] * 5
    assert lines["dualpipe"][3:8] == ["2"] * 5 and lines["dualpipev"][3:8] == ["3"] * 5
    assert lines["dualpipe"][8:12] == ["5"] * 4  # peak activations p+1
    rows = pipeline_sim.compare(3, 5, Costs(F=1, B=2), ["zb1p", "dualpipe"])
    assert "error" in rows[1] and "even pp" in rows[1]["error"] and "not run" in pipeline_sim.table(rows)
    if importlib.util.find_spec("matplotlib") is not None:
        out_png = tmp_path / "sim.png"
        assert pipeline_sim.main(["--pp", "2", "--micro", "4", "--overlap", "2.5", "--plot", str(out_png)]) == 0
        assert out_png.stat().st_size > 10_000
