"""strategy=dp reproduces strategy=single: per-step losses within 1e-5 relative
and final parameters within 1e-5, fp32, model=tiny, 10 steps."""

import pytest

from parity import assert_parity, run_many, single_reference

BASE = [
    "model=tiny",
    "train.steps=10",
    "train.seq_len=32",
    "train.global_batch_size=24",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "train.progress=false",
]
CASES = [(comm, mb) for comm in ("xtrain", "torch") for mb in (1, 2)]


@pytest.mark.parametrize("world", [2, 3])
def test_dp_matches_single(world, tmp_path):
    configs = [
        [*BASE, "strategy=dp", f"comm={comm}", f"train.micro_batches={mb}", f"train.out_dir={tmp_path / f'{comm}{mb}'}"]
        for comm, mb in CASES
    ]
    results = run_many(configs, world)
    for (comm, mb), got in zip(CASES, results):
        ref = single_reference((*BASE, "comm=torch", f"train.micro_batches={mb}", f"train.out_dir={tmp_path / 'ref'}"))
        assert_parity(ref, got, label=f"dp world={world} comm={comm} micro_batches={mb}")
