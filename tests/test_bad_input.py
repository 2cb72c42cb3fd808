"""Bad input ends in one clear message on every rank, before any collective,
with a non-zero exit; nothing hangs."""

import os
import subprocess
import sys
import time

import pytest

from xtrain.config import ConfigError, check_config, compose
from xtrain.spawn import run_on_ranks
from xtrain.train import run

TINY = ["model=tiny", "train.steps=2", "train.seq_len=32", "train.global_batch_size=8", "train.progress=false"]


def problems(overrides, world=1):
    return "\n".join(check_config(compose([*TINY, *overrides]), world))


def test_each_impossible_config_is_named():
    assert "not divisible by dp*micro_batches = 3*1" in problems(["strategy=dp"], world=3)
    assert "dp*micro_batches = 2*3" in problems(["strategy=dp", "train.micro_batches=3"], world=2)
    assert "above the model's limit model.max_seq_len=256" in problems(["train.seq_len=300"])
    assert "do not match world size 4" in problems(["strategy=dp", "strategy.dp=3"], world=4)
    assert "cannot be inferred" in problems(["strategy=dp", "strategy.tp=3"], world=4)
    assert "strategy=zero3 does not support tp=2" in problems(["strategy=zero3", "strategy.tp=2"], world=4)
    assert "strategy=single runs one process, but the world size is 2" in problems([], world=2)
    assert "comm='nccl' is not one of" in problems(["comm=nccl"])
    assert "precision='fp8'" in problems(["precision=fp8"])
    assert "train.micro_batches must be a positive integer" in problems(["train.micro_batches=0"])
    assert "n_heads" in problems(["model.n_kv_heads=3"])
    assert "train.resume=/nowhere/ckpt: no such checkpoint" in problems(["train.resume=/nowhere/ckpt"])
    assert problems(["strategy=dp"], world=2) == ""


def test_missing_data_file_names_the_path(tmp_path):
    missing = tmp_path / "no-such-data"
    with pytest.raises(ConfigError, match=f"data file not found: {missing}/meta.json"):
        run(compose([*TINY, "data=memmap", f"data.path={missing}", f"train.out_dir={tmp_path / 'run'}"]))


def _run_bad_config(rank, world, out):
    try:
        run(compose([*TINY, "strategy=dp", "train.global_batch_size=10", "comm=torch", f"train.out_dir={out}"]))
    except ConfigError as e:
        return str(e)
    return None


def test_every_rank_rejects_before_any_collective(tmp_path):
    # If any rank entered a collective, the others' errors would still come back, but
    # the job would stall on it; a short timeout proves nobody waits on anybody.
    messages = run_on_ranks(_run_bad_config, 3, tmp_path, timeout=60, pg_timeout=10)
    assert all(m and "global_batch_size=10 is not divisible by dp*micro_batches = 3*1" in m for m in messages)


def _torchrun(args, cwd, timeout=120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "xtrain.train", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_bad_config_fails_on_every_rank_with_one_message(tmp_path):
    t0 = time.monotonic()
    proc = _torchrun([*TINY, "strategy=dp", "train.global_batch_size=7", "comm=torch"], cwd=tmp_path)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] xtrain: invalid configuration:" in proc.stderr
    assert proc.stderr.count("global_batch_size=7 is not divisible by dp*micro_batches = 2*1") == 2
    assert time.monotonic() - t0 < 90


def test_unknown_strategy_lists_the_choices(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xtrain.train", "strategy=nope"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Could not find 'strategy/nope'" in proc.stderr
    assert "Available options in 'strategy'" in proc.stderr and "\tdp\n" in proc.stderr


def test_unknown_model_lists_the_choices(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xtrain.train", "model=huge"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Available options in 'model'" in proc.stderr and "\ttiny\n" in proc.stderr
