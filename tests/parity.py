"""The parity helper: run a config under a strategy and under ``single`` and
compare per-step losses and final parameters.

Starting ranks costs seconds, so ``run_many`` runs a list of configs one after
another inside one spawned process group; ``single`` references are computed
in this process and cached.
"""

from __future__ import annotations

import functools


from xtrain.config import compose

# The parity runs' shared settings: model=tiny, 10 fp32 steps, validation at 5 and 10.
TINY_10_STEPS = (
    "model=tiny",
    "train.steps=10",
    "train.seq_len=32",
    "train.global_batch_size=8",
    "train.warmup_steps=2",
    "train.eval_every=5",
    "train.progress=false",
)
from xtrain.spawn import run_on_ranks


def run_config(overrides: list[str], return_params: bool = True):
    """One run in this process (no torch.distributed unless a group exists)."""
    from xtrain.train import run

    result = run(compose(overrides), return_params=return_params)
    return result.losses, result.params


@functools.lru_cache(maxsize=64)
def single_reference(overrides: tuple[str, ...]):
    return run_config([*overrides, "strategy=single"])


def run_list(rank, world, configs):
    """Per rank: run each config in turn; (losses, params on rank 0) for each."""
    out = []
    for overrides in configs:
        losses, params = run_config(list(overrides))
        out.append((losses, params if rank == 0 else None))
    return out


def run_many(configs: list[list[str]], world: int, timeout: float = 300.0):
    """Rank 0's (losses, params) for each config, all run in one ``world``-rank job."""
    per_rank = run_on_ranks(run_list, world, [list(c) for c in configs], timeout=timeout, pg_timeout=60)
    return per_rank[0]


def assert_parity(reference, candidate, loss_rtol=1e-5, param_atol=1e-5, label=""):
    ref_losses, ref_params = reference
    losses, params = candidate
    assert len(losses) == len(ref_losses), f"{label}: {len(losses)} steps vs {len(ref_losses)}"
    for step, (a, b) in enumerate(zip(losses, ref_losses), start=1):
        assert abs(a - b) <= loss_rtol * abs(b), f"{label}: step {step} loss {a!r} vs single {b!r}"
    if params is not None:
        assert params.keys() == ref_params.keys(), f"{label}: parameter names differ"
        for name, ref in ref_params.items():
            diff = (params[name] - ref).abs().max().item()
            assert diff <= param_atol, f"{label}: parameter {name} differs by {diff:.3g}"


def assert_consolidates(step_dir, ref_params, out, atol=1e-5):
    """scripts/consolidate_ckpt.py writes one file from ``step_dir`` whose tensors are ``ref_params``."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = Path(__file__).resolve().parents[1] / "scripts" / "consolidate_ckpt.py"
    proc = subprocess.run([sys.executable, str(script), str(step_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    full = load_file(str(out))
    for name, t in ref_params.items():
        assert full[name].shape == t.shape and (full[name] - t).abs().max() <= atol, name
