"""Shared test set-up. The multi-process harness is ``xtrain.spawn.run_on_ranks``;
the parity helper is ``tests/parity.py``."""

import os

import pytest

# No test touches the network: wandb stays offline, Ray skips token auth.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture
def tiny_overrides(tmp_path):
    """A fast fp32 config on model=tiny, writing under tmp_path."""
    return [
        "model=tiny",
        "train.steps=10",
        "train.seq_len=32",
        "train.global_batch_size=12",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.log_every=5",
        "train.progress=false",
        f"train.out_dir={tmp_path / 'run'}",
    ]
