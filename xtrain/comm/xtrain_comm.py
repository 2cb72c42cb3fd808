"""``comm=xtrain``: torch.distributed's collectives, written by hand over point-to-point messages.

Signatures and semantics follow torch.distributed (argument names, in-place
results, ``group`` with ``None`` for the world, global ``src``/``dst``
ranks, ``async_op=True`` returning a handle with ``wait()``). The algorithms
live in ``ring`` (all-reduce, reduce-scatter, all-gather), ``tree``
(broadcast, reduce), and ``direct`` (gather, scatter, all-to-all, barrier);
they only ever post point-to-point sends and receives (see ``p2p``) on tensors
on the input's device, so the same code runs on gloo and NCCL.

Inputs that are not contiguous are copied to contiguous buffers and the
results copied back, so any strided tensor works (torch's backends refuse
most of them).

Async: an ``async_op=True`` collective runs its algorithm on a background
thread started at issue; when it finishes, that thread records the call in
the ledger and completes the handle (``is_completed()``, ``get_future()``),
so nothing has to wait on it for either; ``wait()`` blocks on that
completion. Its messages carry a tag
drawn at issue (see ``p2p``), so two collectives in flight at once, on
different groups or the same one, progress independently and never match
each other's messages. Synchronous collectives run on the caller's thread.
"""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from datetime import timedelta

import torch
import torch.distributed as dist

from xtrain.comm import direct, reduce_ops, ring, tree
from xtrain.comm.base import WAITERS, CollectiveTimeout, Comm, Work, guarded
from xtrain.comm.groups import group_label, group_size
from xtrain.comm.p2p import Channel, default_timeout


def _contiguous_buffer(t: torch.Tensor, keep_values: bool = True) -> torch.Tensor:
    """``t`` itself when contiguous, else a contiguous copy (or empty twin) to work in."""
    if t.is_contiguous():
        return t
    return t.contiguous() if keep_values else torch.empty_like(t, memory_format=torch.contiguous_format)


def _write_back(dst: torch.Tensor, buf: torch.Tensor) -> None:
    if buf is not dst:
        dst.copy_(buf)


def _in_background(body, device: torch.device, done) -> None:
    """Run ``body()`` on a new thread; then ``done(error)`` there (``None`` on success)."""
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def target():
        try:
            with torch.no_grad():
                if stream is None:
                    body()
                else:  # keep the caller's stream order: its writes before, its reads after
                    torch.cuda.set_device(device)
                    with torch.cuda.stream(stream):
                        body()
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            done(e)
            return
        done()

    threading.Thread(target=target, name="xtrain-comm", daemon=True).start()


class XtrainComm(Comm):
    """The hand-written collectives.

    ``timeout`` (seconds) bounds every wait inside a collective; by default
    it is the world process group's timeout, so a collective whose peer never
    arrives raises ``CollectiveTimeout`` naming the op and the group within
    that time, even on subgroups that torch gave a 30-minute default.
    """

    name = "xtrain"

    def __init__(self, ledger=None, timeout: float | None = None):
        super().__init__(ledger)
        self.timeout = timeout

    def _wait_limit(self, timeout: float | None = None) -> timedelta | None:
        if timeout is not None:
            return timedelta(seconds=timeout)
        if self.timeout is not None:
            return timedelta(seconds=self.timeout)
        return default_timeout() if dist.is_initialized() else None

    def _launch(self, op: str, group, body, async_op: bool, device: torch.device | None = None, result=None, timeout=None):
        """Run ``body(channel)`` now or on a background thread; record measured bytes and time."""
        with guarded(op, group):
            ch = Channel(group, self._wait_limit(timeout))  # draws the tag on the caller's thread, in issue order
        if not async_op:

            def run():
                with torch.no_grad():
                    body(ch)

            return self._run_sync(op, group, run, traffic=ch)
        return self._start_async(
            op, group, lambda done: _in_background(lambda: body(ch), device or torch.device("cpu"), done), result, traffic=ch
        )

    # ---- reductions ---------------------------------------------------------------

    def _all_reduce(self, tensor, op, group, async_op):
        reduce_ops.check(op, tensor.dtype)

        def body(ch):
            buf = _contiguous_buffer(tensor)
            flat = buf.view(-1)
            if direct.use_two_shot(flat.numel() * flat.element_size(), ch.size, ch.post_ahead):
                direct.all_reduce_two_shot(ch, flat, op)
            else:
                ring.all_reduce(ch, flat, op)
            _write_back(tensor, buf)

        return self._launch("all_reduce", group, body, async_op, tensor.device, [tensor])

    def _reduce_scatter_tensor(self, output, input, op, group, async_op, name):
        reduce_ops.check(op, input.dtype)
        _check_n_times(name, "input", input, "output", output, group)

        def body(ch):
            out = _contiguous_buffer(output, keep_values=False)
            ring.reduce_scatter(ch, out.view(-1), input.contiguous().view(-1), op)
            _write_back(output, out)

        return self._launch(name, group, body, async_op, input.device, [output])

    def _reduce_scatter_list(self, output, input_list, op, group, async_op):
        reduce_ops.check(op, output.dtype)

        def body(ch):
            out = _contiguous_buffer(output, keep_values=False)
            chunks = [t.contiguous().view(-1) for t in input_list]
            ring.reduce_scatter(ch, out.view(-1), None, op, chunks=chunks)
            _write_back(output, out)

        return self._launch("reduce_scatter", group, body, async_op, output.device, [output])

    def _reduce(self, tensor, dst, op, group, async_op):
        reduce_ops.check(op, tensor.dtype)

        def body(ch):
            root = ch.group_rank_of(dst)
            buf = _contiguous_buffer(tensor)
            tree.reduce(ch, buf.view(-1), root, op)
            if ch.rank == root:
                _write_back(tensor, buf)

        return self._launch("reduce", group, body, async_op, tensor.device, [tensor])

    # ---- gathers and broadcast ---------------------------------------------------

    def _all_gather_into_tensor(self, output_tensor, input_tensor, group, async_op, name):
        _check_n_times(name or "all_gather_into_tensor", "output", output_tensor, "input", input_tensor, group)

        def body(ch):
            out = _contiguous_buffer(output_tensor, keep_values=False)
            chunks = list(out.view(-1).tensor_split(ch.size))
            _place(chunks[ch.rank], input_tensor)
            ring.all_gather(ch, chunks)
            _write_back(output_tensor, out)

        return self._launch(name, group, body, async_op, input_tensor.device, [output_tensor])

    def _all_gather(self, tensor_list, tensor, group, async_op):
        n = group_size(group)
        if len(tensor_list) != n or any(t.numel() != tensor.numel() for t in tensor_list):
            raise ValueError(f"all_gather: need {n} output tensors of {tensor.numel()} elements each")

        def body(ch):
            bufs = [_contiguous_buffer(t, keep_values=False) for t in tensor_list]
            _place(bufs[ch.rank].view(-1), tensor)
            ring.all_gather(ch, [b.view(-1) for b in bufs])
            for t, b in zip(tensor_list, bufs):
                _write_back(t, b)

        return self._launch("all_gather", group, body, async_op, tensor.device, list(tensor_list))

    def _broadcast(self, tensor, src, group, async_op):
        def body(ch):
            root = ch.group_rank_of(src)
            buf = _contiguous_buffer(tensor, keep_values=ch.rank == root)
            tree.broadcast(ch, buf.view(-1), root)
            _write_back(tensor, buf)

        return self._launch("broadcast", group, body, async_op, tensor.device, [tensor])

    def _gather(self, tensor, gather_list, dst, group, async_op):
        def body(ch):
            root = ch.group_rank_of(dst)
            piece = tensor.contiguous().view(-1)
            if ch.rank != root:
                direct.gather(ch, piece, None, root)
                return
            _check_list("gather", gather_list, ch.size, tensor.numel())
            bufs = [_contiguous_buffer(t, keep_values=False) for t in gather_list]
            direct.gather(ch, piece, [b.view(-1) for b in bufs], root)
            for t, b in zip(gather_list, bufs):
                _write_back(t, b)

        return self._launch("gather", group, body, async_op, tensor.device, list(gather_list or []))

    def _scatter(self, tensor, scatter_list, src, group, async_op):
        def body(ch):
            root = ch.group_rank_of(src)
            buf = _contiguous_buffer(tensor, keep_values=False)
            pieces = None
            if ch.rank == root:
                _check_list("scatter", scatter_list, ch.size, tensor.numel())
                pieces = [t.contiguous().view(-1) for t in scatter_list]
            direct.scatter(ch, buf.view(-1), pieces, root)
            _write_back(tensor, buf)

        return self._launch("scatter", group, body, async_op, tensor.device, [tensor])

    # ---- all-to-all --------------------------------------------------------------

    def _all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, group, async_op):
        n = group_size(group)
        in_splits = _splits("input", input, input_split_sizes, n)
        out_splits = _splits("output", output, output_split_sizes, n)

        def body(ch):
            src = input.contiguous()
            out = _contiguous_buffer(output, keep_values=False)
            ins = [p.reshape(-1) for p in src.split(in_splits, dim=0)] if src.dim() else [src.view(-1)]
            outs = [p.view(-1) for p in out.split(out_splits, dim=0)] if out.dim() else [out.view(-1)]
            direct.all_to_all(ch, outs, ins)
            _write_back(output, out)

        return self._launch("all_to_all_single", group, body, async_op, input.device, [output])

    def _all_to_all(self, output_tensor_list, input_tensor_list, group, async_op):
        n = group_size(group)
        if len(output_tensor_list) != n or len(input_tensor_list) != n:
            raise ValueError(f"all_to_all: need {n} input and {n} output tensors")

        def body(ch):
            bufs = [_contiguous_buffer(t, keep_values=False) for t in output_tensor_list]
            ins = [t.contiguous().view(-1) for t in input_tensor_list]
            direct.all_to_all(ch, [b.view(-1) for b in bufs], ins)
            for t, b in zip(output_tensor_list, bufs):
                _write_back(t, b)

        return self._launch(
            "all_to_all", group, body, async_op, input_tensor_list[0].device, list(output_tensor_list)
        )

    # ---- synchronisation -----------------------------------------------------------

    def _barrier(self, group, async_op, timeout):
        return self._launch("barrier", group, direct.barrier, async_op, timeout=timeout)

    def _monitored_barrier(self, group, timeout, wait_all_ranks):
        limit = timeout
        if limit is None:
            default = self._wait_limit()
            limit = default.total_seconds() if default is not None else 1800.0
        with guarded("monitored_barrier", group):
            ch = Channel(group, None)
        if ch.size == 1:
            return
        t0 = time.perf_counter()
        failed = _monitored(ch, limit, wait_all_ranks)
        if failed is not None:
            raise CollectiveTimeout(f"monitored_barrier on group '{group_label(group)}' failed: {failed}")
        self._record("monitored_barrier", group, ch.sent, ch.recv, t0, None, time.perf_counter() - t0, ch.messages)
        return


def _watch(ch: Channel, work, keep) -> threading.Event:
    """An event set once ``work`` (a backend send/receive) completes; a waiter thread waits on it.

    ``keep`` (the message's tensors) stays referenced until then: the message
    may still land after the caller has given up on it.
    """
    ev = threading.Event()

    def body():
        with suppress(BaseException):  # a failed message never arrived: the event stays clear
            if work is not None:
                work.wait()
            ev.set()
        keep.clear()

    WAITERS.submit(body)
    return ev


def _monitored(ch: Channel, limit: float, wait_all_ranks: bool) -> str | None:
    """The monitored barrier on ``ch``: ``None`` if every rank arrived, else the report.

    Group rank 0 collects one token from every rank, waiting until ``limit``
    seconds after its own arrival, then sends every rank a status: the
    group ranks that did not arrive (the first one, or all with
    ``wait_all_ranks``). The others send their token and wait for the status
    (up to twice ``limit``, since rank 0 may itself arrive late).
    """
    n = ch.size
    if ch.rank == 0:
        deadline = time.monotonic() + limit
        tokens = {p: torch.zeros(1, dtype=torch.uint8) for p in range(1, n)}
        arrived = {p: _watch(ch, ch.recv_from(tokens[p], p, 0), [tokens[p]]) for p in range(1, n)}
        missing = []
        for p in range(1, n):
            if not arrived[p].wait(max(0.0, deadline - time.monotonic())):
                missing.append(p)
                if not wait_all_ranks:
                    break
        status = torch.zeros(n, dtype=torch.int32)
        for p in missing:
            status[p] = 1
        sends = {p: _watch(ch, ch.send_to(status, p, 1), [status]) for p in range(1, n)}
        for p in range(1, n):
            if p not in missing:
                sends[p].wait(limit)
    else:
        status = torch.zeros(n, dtype=torch.int32)
        got = _watch(ch, ch.recv_from(status, 0, 1), [status])
        token = torch.zeros(1, dtype=torch.uint8)
        _watch(ch, ch.send_to(token, 0, 0), [token])
        if not got.wait(2 * limit):
            return f"group rank 0 (global rank {ch.global_rank(0)}) did not release it within {2 * limit:g} s"
        missing = [p for p in range(n) if status[p]]
    if not missing:
        return None
    ranks = [ch.global_rank(p) for p in missing]
    which = "ranks" if len(ranks) > 1 else "rank"
    return f"global {which} {', '.join(map(str, ranks))} did not arrive within {limit:g} s"


def _place(dst_flat: torch.Tensor, src: torch.Tensor) -> None:
    """Copy this rank's piece into its slot of the output, unless it already lives there."""
    if dst_flat.numel() and dst_flat.data_ptr() == src.data_ptr() and src.is_contiguous():
        return
    dst_flat.copy_(src.reshape(-1))


def _check_n_times(op: str, big_name: str, big, small_name: str, small, group) -> None:
    """``big`` must hold group-size times ``small``'s elements (checked before any message moves)."""
    n = group_size(group)
    if big.numel() != n * small.numel():
        raise ValueError(
            f"{op}: {big_name} has {big.numel()} elements, expected group size {n} x {small_name}'s {small.numel()}"
        )


def _check_list(op: str, tensors, n: int, numel: int) -> None:
    if tensors is None or len(tensors) != n or any(t.numel() != numel for t in tensors):
        raise ValueError(f"{op}: the root needs a list of {n} tensors of {numel} elements each")


def _splits(name: str, t: torch.Tensor, sizes, n: int) -> list[int]:
    rows = t.shape[0] if t.dim() else 1
    if sizes is None or len(sizes) == 0:
        if rows % n:
            raise ValueError(f"all_to_all_single: {name} has {rows} rows, not divisible by group size {n}")
        return [rows // n] * n
    sizes = [int(s) for s in sizes]
    if len(sizes) != n or sum(sizes) != rows:
        raise ValueError(f"all_to_all_single: {name}_split_sizes {sizes} must have {n} entries summing to {rows}")
    return sizes


__all__ = ["Work", "XtrainComm"]
