"""Reusable receive buffers for the hand-written collectives.

Reduce-scatter and all-reduce receive partial results into scratch space
before combining them. A fresh multi-megabyte buffer costs a page fault per
4 KiB on first touch: on the 2-core benchmark machine a new 32 MB buffer took
about 35 ms to fill against 2.6 ms for one already mapped, more than the
whole transfer of a 16 MB all-reduce. So buffers are kept between calls.

``take`` hands out a buffer for the caller's exclusive use (a collective in
flight on another thread gets a different one) and ``give`` returns it. At
most ``KEEP`` buffers per device are kept, the largest first, and none over
``MAX_KEEP_BYTES``, so what stays allocated is bounded. Only CPU buffers are
kept: on CUDA the caching allocator already reuses memory, and it also keeps
track of which stream last used it.
"""

from __future__ import annotations

import math
import threading

import torch

KEEP = 2
MAX_KEEP_BYTES = 256 << 20

_lock = threading.Lock()
_free: dict[torch.device, list[torch.Tensor]] = {}


def take(numel: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat, raw)``: a 1-D ``dtype`` tensor of ``numel`` elements, and the raw buffer to ``give`` back."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = None
    if device.type != "cpu":
        raw = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        return raw[:nbytes].view(dtype), raw
    with _lock:
        pool = _free.get(device, [])
        fits = [i for i, b in enumerate(pool) if b.numel() >= nbytes]
        if fits:
            raw = pool.pop(min(fits, key=lambda i: pool[i].numel()))  # by index: tensors compare elementwise
    if raw is None:
        raw = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    return raw[:nbytes].view(dtype), raw


def give(raw: torch.Tensor) -> None:
    if raw.device.type != "cpu" or raw.numel() > MAX_KEEP_BYTES:
        return
    with _lock:
        pool = _free.setdefault(raw.device, [])
        pool.append(raw)
        pool.sort(key=lambda b: b.numel(), reverse=True)
        del pool[KEEP:]


class Slots:
    """``with Slots(like, *shape) as buf``: a ``like.dtype`` buffer of ``shape``, borrowed from the pool."""

    def __init__(self, like: torch.Tensor, *shape: int):
        flat, self._raw = take(math.prod(shape), like.dtype, like.device)
        self.buf = flat.view(*shape)

    def __enter__(self) -> torch.Tensor:
        return self.buf

    def __exit__(self, *exc):
        give(self._raw)
        return False


def clear() -> None:
    with _lock:
        _free.clear()
