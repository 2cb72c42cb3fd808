"""Token data and the deterministic global batch.

The contract that makes parity testing possible: the global batch at step s is
a pure function of (seed, step). It never depends on the world size or the
strategy; each data-parallel rank takes a contiguous slice of its rows, and
each rank splits its slice into micro-batches. Concatenating the slices of all
dp ranks gives back the global batch, whatever dp is.

Two sources, both byte-level (vocabulary 256):
- ``stdlib``: the Python standard library's own top-level source files, which
  every machine with Python has. No download, no network.
- ``memmap``: token files written by ``scripts/prepare_data.py``.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BYTE_VOCAB = 256
# 1 file in VAL_EVERY goes to validation, by sorted position: deterministic on a machine.
VAL_EVERY = 20


@dataclass
class TokenData:
    train: np.ndarray  # 1-D token ids (uint8 or uint16), may be a memmap
    val: np.ndarray
    vocab_size: int
    description: str


def stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def load_stdlib(max_bytes: int | None = None) -> TokenData:
    files = stdlib_files()
    if not files:
        raise FileNotFoundError(f"no Python source files under {sysconfig.get_paths()['stdlib']}")
    train, val = bytearray(), bytearray()
    for i, f in enumerate(files):
        (val if i % VAL_EVERY == VAL_EVERY - 1 else train).extend(f.read_bytes())
        if max_bytes and len(train) >= max_bytes:
            break
    return TokenData(
        train=np.frombuffer(bytes(train), dtype=np.uint8),
        val=np.frombuffer(bytes(val), dtype=np.uint8),
        vocab_size=BYTE_VOCAB,
        description=f"stdlib: {len(files)} files, {len(train):,} train / {len(val):,} val bytes",
    )


def load_memmap(path: str | Path) -> TokenData:
    root = Path(path).expanduser()
    meta_path = root / "meta.json"
    for p in (meta_path, root / "train.bin", root / "val.bin"):
        if not p.is_file():
            raise FileNotFoundError(
                f"data file not found: {p} (make it with `python scripts/prepare_data.py --out {root} FILES...`)"
            )
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    return TokenData(
        train=np.memmap(root / "train.bin", dtype=dtype, mode="r"),
        val=np.memmap(root / "val.bin", dtype=dtype, mode="r"),
        vocab_size=int(meta["vocab_size"]),
        description=f"memmap {root}: {meta.get('train_tokens')} train / {meta.get('val_tokens')} val tokens",
    )


def load_data(data_cfg) -> TokenData:
    name = data_cfg["name"]
    if name == "stdlib":
        return load_stdlib(data_cfg.get("max_bytes"))
    if name == "memmap":
        return load_memmap(data_cfg["path"])
    raise ValueError(f"unknown data source {name!r}; choose stdlib or memmap")


def _generator(seed: int, step: int, split: str) -> torch.Generator:
    # One independent stream per (seed, step, split); no global RNG is touched.
    salt = {"train": 0, "val": 1}[split]
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 4 + salt) & 0x7FFF_FFFF_FFFF_FFFF)


def batch_offsets(n_tokens: int, seed: int, step: int, batch_size: int, seq_len: int, split: str = "train"):
    """Start offsets of the global batch's sequences: a function of (seed, step) only."""
    high = n_tokens - seq_len - 1
    if high <= 0:
        raise ValueError(f"{split} split has {n_tokens} tokens, too few for seq_len={seq_len}")
    return torch.randint(0, high, (batch_size,), generator=_generator(seed, step, split))


def rows(tokens: np.ndarray, offsets, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, int64 (B, T), for the given start offsets."""
    block = np.stack([np.asarray(tokens[int(o) : int(o) + seq_len + 1]) for o in offsets])
    block = torch.from_numpy(block.astype(np.int64))
    return block[:, :-1], block[:, 1:]


def dp_slice(batch_size: int, dp_rank: int, dp: int) -> slice:
    """Rows of the global batch owned by one data-parallel rank (contiguous)."""
    if batch_size % dp:
        raise ValueError(f"global batch {batch_size} is not divisible by dp={dp}")
    per = batch_size // dp
    return slice(dp_rank * per, (dp_rank + 1) * per)


def local_batch(tokens, *, seed, step, global_batch_size, seq_len, dp_rank=0, dp=1, split="train"):
    """This dp rank's rows of the global batch at `step`: (x, y), each (B/dp, T)."""
    offsets = batch_offsets(len(tokens), seed, step, global_batch_size, seq_len, split)
    return rows(tokens, offsets[dp_slice(global_batch_size, dp_rank, dp)], seq_len)


def split_micro(x: torch.Tensor, micro_batches: int) -> list[torch.Tensor]:
    if x.shape[0] % micro_batches:
        raise ValueError(f"local batch {x.shape[0]} is not divisible by micro_batches={micro_batches}")
    return list(x.chunk(micro_batches)) if micro_batches > 1 else [x]
