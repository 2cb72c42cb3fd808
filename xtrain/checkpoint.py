"""Checkpoints: model, optimizer, RNG states, data position and step.

Layout: ``RUN/checkpoints/step_000100/`` holding the strategy's files
(``model.safetensors``, ``optim.pt``, or per-rank shards), ``rng_rank{r}.pt``
for every rank, and ``meta.json``. Every file is written to a temporary name
and renamed into place; ``meta.json`` is written last, by rank 0, after every
rank has finished, so a checkpoint without it is incomplete and ignored.
The data position is the step itself: the batch at step s is a function of
(seed, step), so resuming at s replays exactly the batches a straight run sees.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

META = "meta.json"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_file(path: Path, obj) -> None:
    """Write one checkpoint file atomically: a model goes to safetensors, anything else to torch.save."""
    if isinstance(obj, torch.nn.Module):
        _atomic(path, lambda p: save_model(obj, str(p)))
    elif path.suffix == ".json":
        _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2)))
    else:
        _atomic(path, lambda p: torch.save(obj, p))


def read_file(path: Path, into=None):
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    if into is not None:
        load_model(into, str(path))
        return into
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step_*") if (d / META).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def save(run_dir: Path, step: int, strategy, model, optimizer, meta: dict, barrier, keep: int = 0) -> Path:
    """Every rank writes its files; after a barrier rank 0 seals the checkpoint with meta.json."""
    d = step_dir(run_dir, step)
    d.mkdir(parents=True, exist_ok=True)
    rank = strategy.mesh.rank
    for name, obj in strategy.checkpoint_files(model, optimizer).items():
        write_file(d / name, obj)
    write_file(d / f"rng_rank{rank}.pt", rng_state())
    barrier()
    if rank == 0:
        write_file(d / META, {**meta, "step": step, "data": {"next_step": step}})
        if keep > 0:
            for old in complete_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return d


def load(path: Path, strategy, model, optimizer) -> dict:
    """Restore a checkpoint written by ``save``; returns its meta (``meta['step']`` = next step)."""
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META})")
    meta = json.loads((path / META).read_text())
    strategy.load_checkpoint_files(model, optimizer, lambda name, into=None: read_file(path / name, into))
    rng = path / f"rng_rank{strategy.mesh.rank}.pt"
    if rng.is_file():
        set_rng_state(read_file(rng))
    return meta
