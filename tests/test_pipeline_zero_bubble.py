"""Split-backward schedules against strategy=single: ZB-H1, DualPipe and
DualPipeV at pp=2 and pp=4, each at its smallest micro-batch count and at twice
it, tied and untied embeddings, and one composition each with dp (zero1) and
tp; with both comms; per-step losses within 1e-5 relative and final parameters within 1e-5
over 10 fp32 steps on model=tiny with enough layers. Plus the Chrome trace."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parity import TINY_10_STEPS, assert_parity, run_many, single_reference
from xtrain.parallel.pipeline.schedules import schedule_problems

BASE = TINY_10_STEPS
LAYERS = {"zb1p": 1, "dualpipe": 1, "dualpipev": 2}  # layer blocks per pipeline rank


def min_micro(name: str, p: int) -> int:
    return next(m for m in range(1, 8 * p + 1) if not schedule_problems(name, p, m, 1))


def cases(p: int):
    out = []
    for name in ("zb1p", "dualpipe", "dualpipev"):
        m0 = min_micro(name, p)
        layers = f"model.n_layers={LAYERS[name] * p}"
        for m in (m0, 2 * m0):
            out.append((f"strategy=pp strategy.pp={p} strategy.pp_schedule={name}", m, layers))
        if p == 2:
            out.append((f"strategy=pp strategy.pp={p} strategy.pp_schedule={name}", m0, f"{layers} model.tie_embeddings=false"))
    if p == 4:  # compositions on 4 ranks: pp2 x dp2 with zero1, pp2 x tp2
        out.append(("strategy=zero1 strategy.pp=2 strategy.pp_schedule=dualpipev", min_micro("dualpipev", 2), "model.n_layers=4"))
        out.append(("strategy=pp strategy.pp=2 strategy.pp_schedule=zb1p strategy.tp=2", 2, "model.n_layers=2"))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_split_backward_schedules_match_single(world, tmp_path):
    todo = [(*case, comm) for case in cases(world) for comm in ("xtrain", "torch")]
    configs = [
        [*BASE, *layout.split(), *model.split(), f"train.micro_batches={m}", f"comm={comm}",
         "train.global_batch_size=16", f"train.out_dir={tmp_path / str(i)}"]
        for i, (layout, m, model, comm) in enumerate(todo)
    ]
    results = run_many(configs, world, timeout=900)
    for i, ((layout, m, model, comm), got) in enumerate(zip(todo, results)):
        ref = single_reference((*BASE, *model.split(), f"train.micro_batches={m}", "train.global_batch_size=16",
                                "comm=torch", f"train.out_dir={tmp_path / 'ref'}"))
        assert_parity(ref, got, label=f"{layout} m={m} {model} comm={comm} world={world}")
        records = [json.loads(line) for line in (tmp_path / str(i) / "metrics.jsonl").read_text().splitlines()]
        assert "val_loss" in records[4] and [r["step"] for r in records] == list(range(1, 11))


def test_a_run_writes_a_chrome_trace_with_one_track_per_rank(tmp_path):
    out = tmp_path / "run"
    run_many([[*BASE, "strategy=pp", "strategy.pp_schedule=zb1p", "model.n_layers=2", "train.micro_batches=2",
               "train.steps=2", "train.trace=true", "comm=torch", f"train.out_dir={out}"]], 2)
    trace = json.loads((out / "trace.json").read_text())["traceEvents"]
    spans = [e for e in trace if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    names = {e["name"] for e in spans}
    assert {"F0 s0", "I1 s1", "W0 s0"} <= names, sorted(names)[:20]
    assert all(e["dur"] >= 0 and e["args"]["step"] in (1, 2) for e in spans)
    # each rank ran F, I and W of every micro-batch of its stage in both steps
    for rank in (0, 1):
        kinds = [e["args"]["kind"] for e in spans if e["pid"] == rank and e["args"]["step"] == 2]
        assert kinds.count("F") == kinds.count("I") == kinds.count("W") == 2
    # and the plot script draws its last step
    png = tmp_path / "measured.png"
    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_schedule.py"
    proc = subprocess.run([sys.executable, str(script), "--measured", str(out / "trace.json"), "--out", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png.stat().st_size > 10_000
