"""Checkpoints: model, optimizer, RNG states, data position and step.

Layout: ``RUN/checkpoints/step_000100/`` holding

- replicated strategies (single, dp, ddp): ``model.safetensors`` (parameters by
  name) and ``optim.safetensors`` (AdamW state by parameter name:
  ``NAME/exp_avg``, ``NAME/exp_avg_sq``, ``NAME/step``), written by rank 0;
- replicated strategies split over pipeline stages: also ``model_rank{R}``
  and ``optim_rank{R}.safetensors`` from each stage's first rank (its stage's
  parameters, under their canonical names);
- sharded strategies (zero1/2/3): ``shard_rank{R}.safetensors`` from every
  rank (its slice of each flat group: ``GROUP/param``, ``GROUP/exp_avg``, ...)
  and ``shards.json`` (plus ``shards_rank{R}.json`` per pipeline stage or tp
  rank), the layout that turns the slices back into named tensors;
- ``rng_rank{R}.pt`` for every rank, and ``meta.json``.

Every file is written to a temporary name and renamed into place; ``meta.json``
is written last, by rank 0, after every rank has finished, so a checkpoint
without it is incomplete and ignored.

Any checkpoint reads back into one canonical form, full tensors by parameter
name (``read_full_state``), and every strategy loads from that form, so a
checkpoint saved under one strategy and world size resumes under another.
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
from safetensors.torch import load_file, save_file

META = "meta.json"
SHARDS = "shards.json"
OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_file(path: Path, obj) -> None:
    """Write one checkpoint file atomically, by suffix: .safetensors (a dict of
    tensors), .json, or anything else with torch.save."""
    if path.suffix == ".safetensors":
        tensors = {k: v.detach().contiguous().cpu() for k, v in obj.items()}
        _atomic(path, lambda p: save_file(tensors, str(p)))
    elif path.suffix == ".json":
        _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2)))
    else:
        _atomic(path, lambda p: torch.save(obj, p))


def read_file(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return torch.load(path, map_location="cpu", weights_only=False)


# -- canonical form --------------------------------------------------------------


def optim_to_flat_dict(optim: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{name}/{k}": v for name, state in optim.items() for k, v in state.items()}


def optim_from_flat_dict(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        name, k = key.rsplit("/", 1)
        out.setdefault(name, {})[k] = v
    return out


def unflatten_groups(manifest: dict, shard_files: dict[str, dict[str, torch.Tensor]]):
    """Rebuild full named tensors from every rank's slices of every flat group.

    Groups named ``tp{t}/...`` hold tensor-parallel rank t's local tensors;
    those listed in ``tp_shards`` are then joined along their tp dimension
    (and trimmed of padding), the rest are replicas and taken from tp rank 0.
    """
    per_tp: dict[int, tuple[dict, dict]] = {}
    for gname, g in manifest["groups"].items():
        if "tp_rank" in g:
            t = int(g["tp_rank"])
        else:  # checkpoints written before groups recorded their tp rank
            t = int(gname[2 : gname.index("/")]) if gname.startswith("tp") and "/" in gname else 0
        params, optim = per_tp.setdefault(t, ({}, {}))
        pieces = [shard_files[f] for f in g["files"]]
        for key in ("param", "exp_avg", "exp_avg_sq"):
            if f"{gname}/{key}" not in pieces[0]:
                continue
            flat = torch.cat([p[f"{gname}/{key}"] for p in pieces])
            for name, shape, offset in zip(g["names"], g["shapes"], g["offsets"]):
                numel = int(np.prod(shape)) if shape else 1
                tensor = flat[offset : offset + numel].view(shape).clone()
                if key == "param":
                    params[name] = tensor
                else:
                    optim.setdefault(name, {})[key] = tensor
        step = pieces[0].get(f"{gname}/step")
        if step is not None:
            for name in g["names"]:
                optim.setdefault(name, {})["step"] = step.reshape(()).clone()
    params, optim = per_tp[0]
    for name, spec in manifest.get("tp_shards", {}).items():
        def join(get):
            full = torch.cat([get(per_tp[t]) for t in sorted(per_tp)], dim=spec["dim"])
            return full.narrow(spec["dim"], 0, spec["full_size"]).clone()

        params[name] = join(lambda pt: pt[0][name])
        for key in ("exp_avg", "exp_avg_sq"):
            if key in optim.get(name, {}):
                optim[name][key] = join(lambda pt: pt[1][name][key])
    return params, optim


def read_full_state(path: Path):
    """(parameters by name, AdamW state by name) from any strategy's checkpoint.
    Several files (one per pipeline stage or tp rank) are merged by name."""
    path = Path(path)
    models = sorted(path.glob("model*.safetensors"))
    if models:
        params, optim = {}, {}
        for f in models:
            params.update(read_file(f))
            optim_file = f.with_name(f.name.replace("model", "optim", 1))
            if optim_file.is_file():
                for name, state in optim_from_flat_dict(read_file(optim_file)).items():
                    optim.setdefault(name, {}).update(state)
        return params, optim
    manifests = sorted(path.glob(SHARDS.replace(".json", "*.json")))
    if manifests:
        manifest = {"groups": {}, "tp_shards": {}}
        for f in manifests:
            m = read_file(f)
            manifest["groups"].update(m["groups"])
            manifest["tp_shards"].update(m.get("tp_shards", {}))
        files = {f for g in manifest["groups"].values() for f in g["files"]}
        return unflatten_groups(manifest, {f: read_file(path / f) for f in files})
    raise FileNotFoundError(f"{path} holds neither model.safetensors nor {SHARDS}")


# -- RNG ---------------------------------------------------------------------------


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


# -- save / load ----------------------------------------------------------------------


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
    for name, obj in {**strategy.checkpoint_files(model, optimizer), **strategy.buffer_files(model)}.items():
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
    """Restore any complete checkpoint into this strategy; returns its meta
    (``meta['step']`` is the next step to run). RNG states are restored when
    the checkpoint has one for this rank."""
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META})")
    meta = read_file(path / META)
    params, optim = read_full_state(path)
    strategy.load_full_state(model, optimizer, params, optim)
    buffers = {}
    for f in sorted(path.glob("buffers*.safetensors")):  # state outside the optimizer (a router's bias)
        buffers.update(read_file(f))
    strategy.load_buffers(model, buffers)
    rng = path / f"rng_rank{strategy.mesh.rank}.pt"
    if rng.is_file():
        set_rng_state(read_file(rng))
    return meta
