"""The collective interface. Signatures and semantics mirror torch.distributed:
argument names, in-place results, ``group``, and ``async_op=True`` returning a
handle with ``wait()``. Two implementations: ``xtrain`` (hand-written over
point-to-point send/recv) and ``torch`` (the built-ins). Both record every call
in the ledger and turn a timeout into a ``CollectiveTimeout`` that names the
collective and the group.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from xtrain.comm.groups import SOLO, group_label
from xtrain.comm.ledger import Ledger


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the process group's timeout."""


class CommError(RuntimeError):
    """A collective failed (peer gone, bad arguments); names the op and the group."""


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


@contextmanager
def guarded(op: str, group):
    """Re-raise failures inside a collective with the op and group in the message."""
    try:
        yield
    except (CollectiveTimeout, CommError):
        raise
    except (RuntimeError, dist.DistBackendError) as e:
        where = f"{op} on group '{group_label(group)}'"
        if _is_timeout(e):
            raise CollectiveTimeout(f"{where} timed out: {e}") from e
        raise CommError(f"{where} failed: {e}") from e


class Work:
    """A handle for ``async_op=True``: ``wait()`` completes it and records it."""

    def __init__(self, finish, op: str, group):
        self._finish, self._op, self._group, self._done = finish, op, group, False

    def wait(self, timeout=None) -> bool:
        if not self._done:
            with guarded(self._op, self._group):
                self._finish(time.perf_counter())
            self._done = True
        return True

    def is_completed(self) -> bool:
        return self._done


class Comm:
    """Base of both implementations: the ledger and the timing/guard plumbing."""

    name = "base"

    def __init__(self, ledger: Ledger | None = None):
        self.ledger = ledger or Ledger()

    def _timed(self, op: str, group, sent: int, recv: int, run, async_op: bool, traffic=None):
        """Run ``run()`` (which returns a callable that completes the op) and record it.

        The ledger gets the interval from issue to completion (``wait()`` for
        async ops) and the time the caller was blocked: the whole call when
        synchronous, the time inside ``wait()`` when async. When ``traffic`` is
        given (an object with ``sent``/``recv`` byte and ``messages`` counts
        filled in while the op runs), the ledger takes the bytes from it at
        completion instead of ``sent``/``recv``.
        """
        t0 = time.perf_counter()
        with guarded(op, group):
            finish = run()

        def complete(blocked_since: float):
            finish()
            if group is SOLO:  # a one-member group moves nothing: keep it out of the ledger
                return
            s, r, m = (traffic.sent, traffic.recv, traffic.messages) if traffic is not None else (sent, recv, 0)
            end = time.perf_counter()
            self.ledger.record(op, group_label(group), s, r, t0, end, end - blocked_since, m)

        if async_op:
            return Work(complete, op, group)
        with guarded(op, group):
            complete(t0)
        return None

    # The collectives; each implementation defines them all.
    def all_reduce(self, tensor, op=ReduceOp.SUM, group=None, async_op=False): ...
    def reduce_scatter_tensor(self, output, input, op=ReduceOp.SUM, group=None, async_op=False): ...
    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False): ...
    def all_gather(self, tensor_list, tensor, group=None, async_op=False): ...
    def broadcast(self, tensor, src, group=None, async_op=False): ...
    def reduce(self, tensor, dst, op=ReduceOp.SUM, group=None, async_op=False): ...
    def gather(self, tensor, gather_list=None, dst=0, group=None, async_op=False): ...
    def scatter(self, tensor, scatter_list=None, src=0, group=None, async_op=False): ...
    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False): ...
    def all_to_all(self, output_tensor_list, input_tensor_list, group=None, async_op=False): ...
    def barrier(self, group=None, async_op=False): ...
    def send(self, tensor, dst, group=None, tag=0): ...
    def recv(self, tensor, src=None, group=None, tag=0): ...
    def isend(self, tensor, dst, group=None, tag=0): ...
    def irecv(self, tensor, src=None, group=None, tag=0): ...

    # torch's newer names
    def reduce_scatter_single(self, output, input, op=ReduceOp.SUM, group=None, async_op=False):
        return self.reduce_scatter_tensor(output, input, op=op, group=group, async_op=async_op)

    def all_gather_single(self, output_tensor, input_tensor, group=None, async_op=False):
        return self.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
