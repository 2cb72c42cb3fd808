"""scripts/bench_pipeline.py runs end to end: a smoke test, not a timing.

At its smallest setting (2 ranks, 2 steps, model=tiny with 4 layers so the
interleaved schedule has 2 stages per rank and DualPipeV its 4 stages of one
block; m = 4 = 2p, DualPipeV's least) the script must print one row per
schedule (gpipe, 1f1b, interleaved_1f1b, zb1p, dualpipev), xtrain's beside torch.distributed.pipelining's, and the two
sides' losses must agree (same weights, same batches, same loss).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_pipeline.py"
ROWS = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B",
        "zb1p": "ScheduleInterleavedZeroBubble", "dualpipev": "ScheduleDualPipeV"}


@pytest.mark.timeout(120)
def test_bench_pipeline_prints_every_schedule_and_losses_agree(tmp_path):
    raw = tmp_path / "bench.json"
    args = ["--nproc", "2", "--model", "tiny", "--layers", "4", "--seq-len", "32", "--batch", "8", "--micro", "4",
            "--steps", "2", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path / "runs"), "--json", str(raw)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| schedule")]
    assert len(rows) == len(ROWS), proc.stdout
    for (name, torch_name), row in zip(ROWS.items(), rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == [name, torch_name, "2"], row
        assert float(cells[5]) > 0 and float(cells[9]) == 2, row  # a ratio; two timed steps
        assert float(cells[8]) < 1e-5, row  # max |loss diff|
    results = json.loads(raw.read_text())["results"]["2"]
    for name in ROWS:
        r = results[name]
        assert len(r["xtrain_losses"]) == len(r["torch_losses"]) == 2
        assert r["max_loss_diff"] < 1e-5
        assert all(abs(a - b) < 1e-5 for a, b in zip(r["xtrain_losses"], r["torch_losses"]))
