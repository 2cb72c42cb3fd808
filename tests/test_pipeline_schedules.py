"""Pipeline schedules as data: generators, validator, simulator (pure Python).

Every schedule at several shapes is valid, does each (stage, micro-batch)'s
F and B exactly once on its owner, and its unit-cost simulation has the
closed-form bubble of ``xtrain.formulas``; hand-broken lists are rejected
with messages that name the rank and the action.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from xtrain.formulas import pipeline_bubble_fraction
from xtrain.parallel.pipeline import (
    SCHEDULES,
    Action,
    Costs,
    Schedule,
    ScheduleError,
    Timeline,
    add_communication,
    build_schedule,
    check_schedule_config,
    find_problems,
    from_compute,
    parse_actions,
    simulate,
    timeline_from_json,
    timeline_to_json,
    validate,
)
from xtrain.parallel.pipeline.schedules import interleaved_allows, interleaved_warmup

ROOT = Path(__file__).resolve().parents[1]


def _shapes():
    """(name, p, m, v): p in 1..4; m = p, 2p and a non-multiple (p+1, and
    m < p for the schedules that allow it); v in {2, 3} for interleaved."""
    shapes = []
    for p in (1, 2, 3, 4):
        for m in sorted({p, 2 * p, p + 1, max(1, p - 1)}):
            shapes += [("gpipe", p, m, 1), ("1f1b", p, m, 1)]
            for v in (2, 3):
                if interleaved_allows(p, m):
                    shapes.append(("interleaved_1f1b", p, m, v))
    return shapes


SHAPES = _shapes()
IDS = [f"{n}-p{p}-m{m}-v{v}" for n, p, m, v in SHAPES]


# -- actions and text --------------------------------------------------------------------------


def test_action_text_round_trips_and_rejects_garbage():
    for a in (Action("F", 0, 3), Action("B", 12, 0), Action("SEND_F", 2, 5), Action("RECV_B", 1, 10), Action("W", 3, 1)):
        assert Action.parse(str(a)) == a
    assert str(Action("F", 0, 3)) == "0F3" and str(Action("SEND_B", 2, 5)) == "2SEND_B5"
    for bad in ("F3", "0F", "0f3", "0F3x", ""):
        with pytest.raises(ValueError, match="cannot parse action"):
            Action.parse(bad)


def test_table_has_one_row_per_rank_that_parses_back():
    s = build_schedule("interleaved_1f1b", 2, 4, 2)
    lines = s.table().splitlines()
    assert lines[0].startswith("interleaved_1f1b: p=2 m=4 stages=4")
    assert [parse_actions(line.split("|", 1)[1]) for line in lines[1:]] == s.actions
    compute = [parse_actions(line.split("|", 1)[1]) for line in s.table(comm=False).splitlines()[1:]]
    assert compute == s.compute_order()


# -- every schedule at every shape --------------------------------------------------------------


@pytest.mark.parametrize("name,p,m,v", SHAPES, ids=IDS)
def test_schedule_is_valid_and_does_all_work_once_on_the_owner(name, p, m, v):
    s = build_schedule(name, p, m, v)
    assert s.n_stages == p * v and s.n_ranks == p == len(s.actions)
    validate(s)
    validate(s, p2p_order="fifo")  # also safe on an untagged (NCCL-like) channel
    validate(s, recv_blocks=False)
    for rank, row in enumerate(s.actions):
        assert all(s.stage_rank[a.stage] == rank for a in row)
        counts = Counter((a.kind, a.stage, a.mb) for a in row if a.is_compute)
        expected = {(k, st, i) for k in "FB" for st in s.stages_of(rank) for i in range(m)}
        assert set(counts) == expected and set(counts.values()) == {1}
    # Sends and receives come from the one shared pass over the compute order.
    assert add_communication(s.stage_rank, s.compute_order()) == s.actions


@pytest.mark.parametrize("name,p,m,v", SHAPES, ids=IDS)
@pytest.mark.parametrize("f,b", [(1, 1), (1, 2)])
def test_unit_cost_bubble_equals_the_closed_form(name, p, m, v, f, b):
    timeline = simulate(build_schedule(name, p, m, v), Costs(F=Fraction(f), B=Fraction(b)))
    chunks = p * v
    exact = Fraction(p - 1, (v * m if name == "interleaved_1f1b" else m) + p - 1)
    assert timeline.bubble_fraction == exact
    assert abs(float(timeline.bubble_fraction) - pipeline_bubble_fraction(name, p, m, v)) < 1e-12
    # Every rank idles (p-1)(F+B) in action units; the work is v·m·(F+B).
    assert timeline.idle == [(p - 1) * (f + b)] * p
    assert timeline.busy == [v * m * (f + b)] * p
    assert timeline.makespan == (v * m + p - 1) * (f + b)
    assert sum(len(row) for row in timeline.intervals) == 2 * m * chunks


@pytest.mark.parametrize("name,p,m,v", SHAPES, ids=IDS)
def test_peak_activations_per_rank(name, p, m, v):
    peaks = simulate(build_schedule(name, p, m, v)).peak_activations
    if name == "gpipe":
        assert peaks == [m] * p
    elif name == "1f1b":
        assert peaks == [min(p - r, m) for r in range(p)]
    else:  # in chunks (one (stage, micro-batch) pair each): warm-up + 1, at most v·m
        assert peaks == [min(interleaved_warmup(p, m, v, r) + 1, v * m) for r in range(p)]


def test_interleaved_follows_megatron_order_and_warmup():
    p, m, v = 4, 8, 2
    assert [interleaved_warmup(p, m, v, r) for r in range(p)] == [10, 8, 6, 4]  # (v-1)p + 2(p-1-r)
    s = build_schedule("interleaved_1f1b", p, m, v)
    assert s.stage_rank == [0, 1, 2, 3, 0, 1, 2, 3] and s.stages_of(1) == [1, 5]
    rank0 = " ".join(str(a) for a in s.compute_order()[0])
    # groups of p micro-batches through chunk 0, then chunk 1; backwards start with chunk 1
    assert rank0.startswith("0F0 0F1 0F2 0F3 4F0 4F1 4F2 4F3 0F4 0F5 0F6 4B0 0F7 4B1 4F4 4B2")
    assert rank0.endswith("4B4 4B5 4B6 4B7 0B4 0B5 0B6 0B7")
    # the last rank's last stage hands its output to rank 0's next chunk
    assert Action("SEND_F", 3, 0) in s.actions[3] and Action("RECV_F", 4, 0) in s.actions[0]


def test_interleaved_with_one_rank_hands_over_locally():
    s = build_schedule("interleaved_1f1b", 1, 3, 3)
    assert all(a.is_compute for a in s.actions[0])
    validate(s)
    assert simulate(s).bubble_fraction == 0


def test_interleaved_beyond_multiples_of_p_meets_the_closed_form():
    # m in [p, 2p) is one group of m; m = 10 on p = 4 is two groups of 5.
    for p, m, v in [(4, 5, 2), (4, 7, 3), (4, 10, 2), (3, 5, 2), (5, 12, 2)]:
        timeline = simulate(build_schedule("interleaved_1f1b", p, m, v), Costs(F=1, B=2))
        assert timeline.bubble_fraction == Fraction(p - 1, v * m + p - 1)


# -- the validator catches broken lists ---------------------------------------------------------


def _gpipe_2x2(rank0: str, rank1: str) -> Schedule:
    return Schedule("hand", 2, 2, [0, 1], [parse_actions(rank0), parse_actions(rank1)])


GOOD0 = "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1"
GOOD1 = "1RECV_F0 1F0 1RECV_F1 1F1 1B0 1SEND_B0 1B1 1SEND_B1"


def _problems(s: Schedule, **kw) -> str:
    with pytest.raises(ScheduleError) as info:
        validate(s, **kw)
    assert isinstance(info.value, ValueError) and info.value.problems
    return str(info.value)


def test_hand_written_good_list_passes():
    validate(_gpipe_2x2(GOOD0, GOOD1))


def test_validator_reports_deadlock_from_a_swapped_pair():
    # Rank 0 waits for the gradient of micro-batch 0 before sending micro-batch 1's
    # activation, which rank 1 needs before it runs the backward that sends the gradient.
    message = _problems(_gpipe_2x2("0F0 0SEND_F0 0RECV_B0 0B0 0F1 0SEND_F1 0RECV_B1 0B1", GOOD1))
    assert "deadlock" in message
    assert "rank 0, action 2 (0RECV_B0): deadlock: waits for 1SEND_B0 from rank 1" in message
    assert "rank 1, action 2 (1RECV_F1): deadlock: waits for 0SEND_F1 from rank 0" in message


def test_validator_reports_deadlock_at_the_consumer_when_receives_are_posted_early():
    # Posting a receive early is fine for the executor, which waits at the consumer ...
    early = _gpipe_2x2("0RECV_B0 0F0 0SEND_F0 0F1 0SEND_F1 0B0 0RECV_B1 0B1", GOOD1)
    validate(early, recv_blocks=False)
    # ... but not under the strict model, where the RECV itself blocks.
    assert "rank 0, action 0 (0RECV_B0): deadlock" in _problems(early)
    # A real cycle is caught in the executor's model too, at the compute.
    stuck = _gpipe_2x2("0F0 0SEND_F0 0RECV_B0 0B0 0F1 0SEND_F1 0RECV_B1 0B1", GOOD1)
    message = _problems(stuck, recv_blocks=False)
    assert "rank 0, action 3 (0B0): deadlock: waits on its 0RECV_B0 for 1SEND_B0 from rank 1" in message


def test_validator_reports_a_missing_backward():
    message = _problems(_gpipe_2x2(GOOD0, "1RECV_F0 1F0 1RECV_F1 1F1 1B0 1SEND_B0 1SEND_B1"))
    assert "rank 1, missing 1B1" in message
    assert "rank 1, action 6 (1SEND_B1): send before the compute it sends: no 1B1 earlier on rank 1" in message


def test_validator_reports_a_backward_before_its_forward():
    message = _problems(_gpipe_2x2(GOOD0, "1RECV_F0 1B0 1F0 1RECV_F1 1F1 1SEND_B0 1B1 1SEND_B1"))
    assert "rank 1, action 1 (1B0): B before its F: no 1F0 earlier on rank 1" in message


def test_validator_reports_a_receive_without_a_send():
    message = _problems(_gpipe_2x2(GOOD0, "1RECV_F0 1F0 1RECV_F1 1F1 1B0 1B1 1SEND_B1"))
    assert "rank 0, action 4 (0RECV_B0): receive without a matching send: no 1SEND_B0 on rank 1" in message


def test_validator_reports_a_send_without_a_receive_and_a_forward_without_input():
    message = _problems(_gpipe_2x2(GOOD0, "1F0 1RECV_F1 1F1 1B0 1SEND_B0 1B1 1SEND_B1"))
    assert "rank 1, action 0 (1F0): F without its input: no 1RECV_F0 earlier on rank 1" in message
    assert "rank 0, action 1 (0SEND_F0): send without a matching receive: no 1RECV_F0 on rank 1" in message


def test_validator_reports_wrong_rank_duplicates_unknown_kinds_and_needless_sends():
    message = _problems(_gpipe_2x2(GOOD0 + " 1F0", GOOD1))
    assert "rank 0, action 8 (1F0): stage 1 lives on rank 1, not on rank 0" in message
    message = _problems(_gpipe_2x2("0F0 0F0 " + GOOD0[4:], GOOD1))
    assert "rank 0, action 1 (0F0): duplicate of action 0 on the same rank" in message
    message = _problems(_gpipe_2x2(GOOD0 + " 0X0", GOOD1))
    assert "rank 0, action 8 (0X0): unknown kind 'X'" in message
    # W is a known kind now (split backward), but not after a full B of the same pair
    message = _problems(_gpipe_2x2(GOOD0 + " 0W0", GOOD1))
    assert "rank 0, action 8 (0W0): W after 0B0 (action 5)" in message
    one_rank = build_schedule("interleaved_1f1b", 1, 1, 2)
    one_rank.actions[0].insert(1, Action("SEND_F", 0, 0))
    assert "rank 0, action 1 (0SEND_F0): stage 1 lives on this rank too" in _problems(one_rank)
    one_rank.actions[0][1:2] = []
    one_rank.actions[0].reverse()  # backwards first: the local hand-over is not there yet
    assert "(same rank, handed over locally)" in _problems(one_rank)


def test_fifo_order_is_checked_only_for_untagged_channels():
    reordered = _gpipe_2x2(GOOD0, "1RECV_F1 1RECV_F0 1F0 1F1 1B0 1SEND_B0 1B1 1SEND_B1")
    validate(reordered)  # tagged: any posting order
    message = _problems(reordered, p2p_order="fifo")
    assert "rank 1, action 0 (1RECV_F1): receives out of order on the untagged channel from rank 0" in message


def test_simulator_refuses_a_deadlocked_list_even_unchecked():
    stuck = _gpipe_2x2("0F0 0SEND_F0 0RECV_B0 0B0 0F1 0SEND_F1 0RECV_B1 0B1", GOOD1)
    with pytest.raises(ScheduleError, match=r"rank 0, action 3 \(0B0\): deadlock in simulation"):
        simulate(stuck, check=False)


def test_any_stage_to_rank_map_works():
    # A V (DualPipeV's map): rank 0 holds stages 0 and 3, rank 1 stages 1 and 2.
    m = 3
    compute = [
        [Action("F", 0, i) for i in range(m)] + [Action("F", 3, i) for i in range(m)]
        + [Action("B", 3, i) for i in range(m)] + [Action("B", 0, i) for i in range(m)],
        [a for i in range(m) for a in (Action("F", 1, i), Action("F", 2, i))]
        + [a for i in range(m) for a in (Action("B", 2, i), Action("B", 1, i))],
    ]
    s = from_compute("v-shape", 2, m, [0, 1, 1, 0], compute)
    validate(s)
    # stage 1 -> 2 and the gradient 2 -> 1 stay on rank 1: no message
    assert not {Action("SEND_F", 1, 0), Action("RECV_F", 2, 0), Action("SEND_B", 2, 0), Action("RECV_B", 1, 0)} & set(s.actions[1])
    assert Action("SEND_F", 2, 0) in s.actions[1] and Action("RECV_F", 3, 0) in s.actions[0]
    assert simulate(s).peak_activations == [2 * m, 2 * m]


# -- build_schedule and config rules ------------------------------------------------------------


def test_build_schedule_errors_name_the_rule():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'; choose one of: gpipe, 1f1b, interleaved_1f1b"):
        build_schedule("zb", 4, 8)
    with pytest.raises(ValueError, match=r"interleaved_1f1b needs micro_batches >= pp.*got micro_batches=9, pp=4; use 8 or 10"):
        build_schedule("interleaved_1f1b", 4, 9, 2)
    with pytest.raises(ValueError, match=r"got micro_batches=3, pp=4; use 4"):
        build_schedule("interleaved_1f1b", 4, 3, 2)
    with pytest.raises(ValueError, match="pp_chunks must be 1 for 1f1b"):
        build_schedule("1f1b", 4, 8, 2)
    with pytest.raises(ValueError, match="micro_batches must be an integer >= 1"):
        build_schedule("gpipe", 2, 0)
    assert set(SCHEDULES) == {"gpipe", "1f1b", "interleaved_1f1b", "zb1p", "dualpipe", "dualpipev"}


def test_interleaved_rule_on_m():
    assert [m for m in range(1, 17) if interleaved_allows(4, m)] == [4, 5, 6, 7, 8, 10, 12, 15, 16]
    assert all(interleaved_allows(p, k * p) for p in range(1, 7) for k in range(1, 6))


def test_check_schedule_config_lists_every_problem():
    assert check_schedule_config("interleaved_1f1b", 4, 8, 2, n_layers=8) == []
    problems = check_schedule_config("interleaved_1f1b", 4, 9, 2, n_layers=6)
    assert len(problems) == 2
    assert "multiple of pp" in problems[0] and "needs 8 stages" in problems[1]
    problems = check_schedule_config("gpipe", 2, 4, 3, n_layers=2)
    assert "pp_chunks must be 1 for gpipe" in problems[0] and "needs 6 stages" in problems[1]
    assert check_schedule_config("nope", 2, 4, 1, n_layers=8) == [
        "unknown pipeline schedule 'nope'; choose one of: gpipe, 1f1b, interleaved_1f1b, zb1p, dualpipe, dualpipev"
    ]


# -- simulator: costs, latency, measured timelines ---------------------------------------------


def test_latency_adds_two_fills_to_gpipe():
    for p, m in [(2, 2), (3, 4), (4, 8)]:
        latency = Fraction(1, 4)
        timeline = simulate(build_schedule("gpipe", p, m), Costs(F=1, B=2, latency=latency))
        assert timeline.makespan == (m + p - 1) * 3 + 2 * (p - 1) * latency
        assert simulate(build_schedule("1f1b", p, m), Costs(F=1, B=2, latency=latency)).makespan >= timeline.makespan


def test_per_stage_costs_and_costs_from_a_timeline_round_trip():
    s = build_schedule("1f1b", 3, 5)
    costs = Costs(per_stage={("F", 0): 1, ("B", 0): 2, ("F", 1): 3, ("B", 1): 5, ("F", 2): 1, ("B", 2): 1})
    timeline = simulate(s, costs)
    assert {iv.duration for iv in timeline.intervals[1] if iv.action.kind == "B"} == {5}
    measured = Costs.from_timeline(timeline)
    assert dict(measured.per_stage) == dict(costs.per_stage)
    assert simulate(s, measured).intervals == timeline.intervals
    # The slow stage sets the pace: 1F1B's steady state runs at rank 1's F+B.
    assert timeline.idle[1] < timeline.idle[0]
    with pytest.raises(KeyError, match="no cost for action kind 'X'"):
        Costs().duration(Action("X", 0, 0))


def test_timeline_json_round_trip(tmp_path):
    timeline = simulate(build_schedule("interleaved_1f1b", 2, 4, 2), {"F": 1, "B": 2, "latency": 0.5})
    data = timeline_to_json(timeline, tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text()) == data
    assert set(data["ranks"][0][0]) == {"kind", "stage", "mb", "start", "end"}
    back = timeline_from_json(tmp_path / "t.json")
    assert back.intervals == timeline.intervals and back.comm == timeline.comm
    assert back.stage_rank == timeline.stage_rank and back.name == "interleaved_1f1b"
    assert back.bubble_fraction == pytest.approx(float(timeline.bubble_fraction), abs=1e-12)


def test_measured_timeline_with_only_ranks_and_an_offset_clock():
    raw = {
        "ranks": [
            [{"kind": "F", "stage": 0, "mb": 0, "start": 100.0, "end": 101.0},
             {"kind": "SEND_F", "stage": 0, "mb": 0, "start": 101.0, "end": 101.0},
             {"kind": "B", "stage": 0, "mb": 0, "start": 104.0, "end": 106.0}],
            [{"kind": "B", "stage": 1, "mb": 0, "start": 102.0, "end": 104.0},
             {"kind": "F", "stage": 1, "mb": 0, "start": 101.0, "end": 102.0}],
        ]
    }
    t = timeline_from_json(raw)
    assert isinstance(t, Timeline) and t.time_unit == "s"
    assert t.makespan == 6.0 and t.busy == [3.0, 3.0] and t.idle == [3.0, 3.0]
    assert t.bubble_fraction == 0.5 and t.peak_activations == [1, 1]
    assert [iv.action.kind for iv in t.intervals[1]] == ["F", "B"] and len(t.comm[0]) == 1
    with pytest.raises(ValueError, match="rank 0, entry 0"):
        timeline_from_json({"ranks": [[{"kind": "F", "stage": 0}]]})


# -- purity and the plot script ----------------------------------------------------------------


@pytest.mark.parametrize("module", ["schedules", "validate", "simulator", "draw"])
def test_pure_modules_import_no_torch(module):
    tree = ast.parse((ROOT / "xtrain" / "parallel" / "pipeline" / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
            if node.module and node.module.startswith("xtrain"):
                assert node.module.startswith("xtrain.parallel.pipeline."), node.module
    assert "torch" not in imported and "numpy" not in imported


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plot_script_draws_all_and_a_measured_timeline(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("plot_schedule", ROOT / "scripts" / "plot_schedule.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)  # in-process: the CLI is main(argv)
    out = tmp_path / "all.png"
    assert plot.main(["--all", "--pp", "3", "--micro", "6", "--chunks", "2", "--text", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "rank 2 | 2F0" in printed and "interleaved_1f1b: makespan" in printed
    measured = tmp_path / "run_timeline.json"
    timeline_to_json(simulate(build_schedule("1f1b", 2, 3), Costs(F=0.01, B=0.02)), measured)
    assert plot.main(["--measured", str(measured), "--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").stat().st_size > 5_000


def test_schedule_is_a_plain_dataclass():
    s = build_schedule("gpipe", 2, 2)
    assert dataclasses.replace(s, name="x").actions == s.actions
    assert find_problems(s) == []
