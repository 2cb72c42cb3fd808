"""scripts/bench_context_parallel.py and scripts/measure_context_parallel.py
run end to end and build their tables: a smoke test, not a timing.

At the smallest setting (cp=2, T=64, 4 query / 2 kv heads of width 8) the
bench prints one row per xtrain variant with a ratio to ring zigzag, and
every variant's output and gradients equal full-sequence SDPA within 1e-5;
with ring-attention-pytorch installed (optional, not a test dependency) the
paired peer's output equals xtrain's within 1e-5 too. The measurement
script's pure tables (the ring plan) and its byte table (ledger = formula)
are checked on the same small shapes.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench_context_parallel.py"
sys.path.insert(0, str(ROOT / "scripts"))

import measure_context_parallel as mcp

HAS_PEER = importlib.util.find_spec("ring_attention_pytorch") is not None
VARIANTS = ["ring zigzag", "ring contiguous", "allgather zigzag", "ulysses zigzag"]


@pytest.mark.timeout(60)
def test_bench_prints_every_variant_with_ratios_and_exact_outputs(tmp_path):
    raw = tmp_path / "bench.json"
    args = ["--nproc", "2", "--seq-len", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
            "--iters", "2", "--warmup", "1", "--repeats", "1", "--json", str(raw)]
    proc = subprocess.run([sys.executable, str(BENCH), *args], check=False, capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 2 | ") and line.count("|") > 10]
    assert [row.split("|")[2].strip() for row in rows] == VARIANTS, proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2].replace(",", "")) > 0 and float(cells[3]) > 0, row  # tok/s, ratio to ring zigzag
        assert all(float(e) <= 1e-5 for e in cells[6].split(" / ")), row  # out, dq, dk, dv against SDPA
    assert float(rows[0].split("|")[4]) == 1.0
    res = json.loads(raw.read_text())["results"]["2"]
    for name in VARIANTS:
        assert len(res[name]["step_s"]) == 2 and res[name]["peak_mem_bytes"] >= 0
        assert max(res[name]["errors"].values()) <= 1e-5, (name, res[name]["errors"])
    if HAS_PEER:  # the paired peer computes the same output
        for name in ("ring zigzag", "ring contiguous", "allgather zigzag"):
            assert res[name]["out_vs_peer"] <= 1e-5, (name, res[name]["out_vs_peer"])
            assert res[name]["vs_peer"] > 0 and res[name]["paired"] > 0
        assert "ring zigzag / peer ring striped" in proc.stdout


def test_ring_plan_tables():
    zig = mcp.ring_markdown("zigzag", 4)
    con = mcp.ring_markdown("contiguous", 4)
    zrows = [r for r in zig.splitlines() if r.startswith("| ") and r[2].isdigit()]
    crows = [r for r in con.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert len(zrows) == len(crows) == 4
    assert [r.split("|")[-2].strip() for r in zrows] == ["8"] * 4  # zigzag: equal work, (T/8)^2 units
    assert [r.split("|")[-2].strip() for r in crows] == ["2", "6", "10", "14"]  # contiguous: the last rank 7x the first
    assert "kv3:skip" in crows[0] and "skip" not in zrows[0]


@pytest.mark.timeout(60)
def test_bytes_table_matches_the_formula():
    from xtrain.spawn import run_on_ranks

    shape, T = (1, 4, 2, 8), 32
    per_rank = run_on_ranks(mcp.bytes_worker, 2, shape, T, ["fp32", "bf16"], timeout=50)
    rows = mcp.bytes_rows(per_rank, 2, shape, T)
    assert len(rows) == 6  # ring, allgather, ulysses x fp32, bf16
    assert all(row.rstrip().endswith("| yes |") for row in rows), rows
