"""The real entry point under torchrun: ranks agree on one run directory."""

import json
import os
import subprocess
import sys

from xtrain.config import compose
from test_launcher import DIE_ON_RANK_1  # one crash script for torchrun and the launcher
from xtrain.train import run


def test_torchrun_dp_writes_one_run_dir_matching_single(tmp_path):
    args = ["model=tiny", "train.steps=6", "train.seq_len=32", "train.global_batch_size=8", "train.eval_every=3", "comm=torch"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "xtrain.train", "strategy=dp", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_dirs = [p.parent for p in (tmp_path / "outputs").glob("*/*/metrics.jsonl")]
    assert len(run_dirs) == 1, list((tmp_path / "outputs").rglob("*"))
    run_dir = run_dirs[0]
    assert sorted(p.name for p in run_dir.glob("rank*.log")) == ["rank0.log", "rank1.log"]
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "config.yaml").is_file()
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 1  # no stray folder from a rank
    assert "parameters" in proc.stdout and "step      6" in proc.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    single = run(compose([*args, "strategy=single", "train.progress=false", f"train.out_dir={tmp_path / 'single'}"]))
    assert len(records) == 6 and "val_loss" in records[2]
    for rec, ref in zip(records, single.losses):
        assert abs(rec["loss"] - ref) <= 1e-5 * ref


def test_a_dying_rank_takes_the_job_down_with_its_name(tmp_path):
    script = tmp_path / "die.py"
    script.write_text(DIE_ON_RANK_1)
    args = ["strategy=dp", "model=tiny", "train.steps=50", "train.seq_len=32", "train.global_batch_size=8", "comm=torch", "dist_timeout_s=30"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    # torchrun's failure summary names the rank that died first and its exit code
    assert "Root Cause" in proc.stderr
    assert "rank      : 1" in proc.stderr or "rank: 1" in proc.stderr, proc.stderr[-3000:]
    assert "exitcode  : 3" in proc.stderr or "exitcode: 3" in proc.stderr, proc.stderr[-3000:]
