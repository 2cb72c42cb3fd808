"""scripts/bench_comm.py runs end to end and checks results: a smoke test, not a timing.

Every collective of the benchmark runs on 3 ranks at a few small sizes, with
an integer dtype (exact sums); the script must find xtrain's results equal to
torch's (nccl-tests' ``#wrong`` column all zero) and print one table per
collective and the median ratios.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_comm.py"
OPS = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "reduce"]


@pytest.mark.timeout(180)
def test_bench_comm_runs_every_collective_and_finds_no_wrong_element(tmp_path):
    md = tmp_path / "table.md"
    args = ["--nproc", "3", "--dtype", "int32", "--ops", *OPS, "--min-bytes", "1K", "--max-bytes", "4K",
            "--batch", "2", "--min-iters", "1", "--max-iters", "1", "--markdown", str(md)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for op in OPS:
        assert f"# {op}  nranks 3  dtype int32" in out, out
    assert "differs from torch's: 0 OK" in out, out
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ") and "collective" not in line]
    assert len(rows) == len(OPS) * 3  # 1K, 2K, 4K for each collective
    assert all(line.rstrip(" |").endswith("| 0") for line in rows), rows
