"""The collective interface. Signatures and semantics mirror torch.distributed:
function and argument names, defaults (``group=None`` is the world; global
``src``/``dst`` or group-relative ``group_src``/``group_dst``), in-place
results and return values, and ``async_op=True`` returning a handle with
``wait()``, ``is_completed()`` and ``get_future()``. Two implementations:
``xtrain`` (hand-written over point-to-point send/recv) and ``torch`` (the
built-ins). Both record every call in the ledger and turn a timeout into a
``CollectiveTimeout`` that names the collective and the group.

This class holds what the two share: torch's argument rules (a rank calling
a collective on a group it is not in returns at once, as torch does), the
async handle, point-to-point messages, the object collectives (pickled
payloads over the tensor collectives), ``batch_isend_irecv`` and the
ledger's bookkeeping. Each implementation supplies the tensor collectives
as ``_all_reduce``, ``_broadcast``, ... (ranks already global, membership
already checked).
"""

from __future__ import annotations

import io
import pickle
import queue
import threading
import time
from contextlib import contextmanager, suppress
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from xtrain.comm.groups import (
    SOLO,
    canonical_rank,
    group_label,
    group_rank,
    group_ranks,
    group_size,
    not_member,
    warn_not_member,
)
from xtrain.comm.ledger import Ledger, merge


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the process group's timeout (or ``wait(timeout)``'s)."""


class CommError(RuntimeError):
    """A collective failed (peer gone, bad arguments); names the op and the group."""


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def translate(op: str, group, e: BaseException) -> BaseException:
    """``e`` as xtrain reports it: backend failures name the op and the group."""
    if isinstance(e, (CollectiveTimeout, CommError)) or not isinstance(e, (RuntimeError, dist.DistBackendError)):
        return e
    where = f"{op} on group '{group_label(group)}'"
    cls = CollectiveTimeout if _is_timeout(e) else CommError
    out = cls(f"{where} {'timed out' if cls is CollectiveTimeout else 'failed'}: {e}")
    out.__cause__ = e
    return out


@contextmanager
def guarded(op: str, group):
    """Re-raise failures inside a collective with the op and group in the message."""
    try:
        yield
    except (CollectiveTimeout, CommError):
        raise
    except (RuntimeError, dist.DistBackendError) as e:
        raise translate(op, group, e) from e


def seconds(timeout) -> float | None:
    """A timeout as seconds: ``timedelta``, a number, or ``None`` / ``timedelta(0)`` for none."""
    if timeout is None:
        return None
    s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    return s if s > 0 else None


# ---- background waiters ---------------------------------------------------------------


class _Waiters:
    """A cached pool of threads that wait on backend work handles (point-to-point
    messages, which gloo completes only inside ``wait()``), so that an async
    handle completes, and is recorded, without its owner waiting on it.

    A thread is started whenever no idle one is free, so no wait ever queues
    behind another (a receive that completes late cannot hold back a send
    that is done); idle threads exit after ``IDLE_S``.
    """

    IDLE_S = 30.0

    def __init__(self):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._pending = 0

    def submit(self, fn) -> None:
        with self._lock:
            self._pending += 1
            spawn = self._pending > self._idle
            if spawn:
                self._idle += 1
        self._q.put(fn)
        if spawn:
            threading.Thread(target=self._run, name="xtrain-waiter", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                fn = self._q.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._pending < self._idle:
                        self._idle -= 1
                        return
                continue
            with self._lock:
                self._pending -= 1
                self._idle -= 1
            with suppress(BaseException):  # each fn reports its own errors
                fn()
            with self._lock:
                self._idle += 1


WAITERS = _Waiters()


# ---- the async handle -------------------------------------------------------------------


class Work:
    """The handle of an ``async_op=True`` call (torch.distributed.Work's interface).

    It completes from the comm's own progress (a background thread, or the
    backend's future), whether or not anyone waits: ``is_completed()`` turns
    true, the ledger records the call, and a future from ``get_future()`` is
    completed with the op's outputs (a list of tensors, as torch's are).
    ``wait(timeout)`` blocks at most ``timeout`` (a ``timedelta`` or seconds)
    and raises ``CollectiveTimeout`` if the op has not finished by then; the
    op itself goes on, so a later ``wait()`` can still succeed.
    """

    __slots__ = ("_error", "_event", "_future", "_group", "_lock", "_on_blocked", "_op", "_result", "_source")

    def __init__(self, op: str, group, result=None, on_blocked=None):
        self._op, self._group, self._result = op, group, [] if result is None else result
        self._event = threading.Event()
        self._error: BaseException | None = None
        self._future = None
        self._lock = threading.Lock()
        self._on_blocked = on_blocked
        self._source = -1

    def _done(self, error: BaseException | None = None) -> None:
        """Mark the op complete (called once, from whatever drove it)."""
        with self._lock:
            self._error = None if error is None else translate(self._op, self._group, error)
            self._event.set()
            fut = self._future
        if fut is not None:
            self._fulfil(fut)

    def _fulfil(self, fut) -> None:
        if self._error is not None:
            fut.set_exception(self._error)
        else:
            fut.set_result(self._result)

    def wait(self, timeout=None) -> bool:
        if not self._event.is_set():
            limit = seconds(timeout)
            t0 = time.perf_counter()
            if not self._event.wait(limit):
                raise CollectiveTimeout(
                    f"{self._op} on group '{group_label(self._group)}' timed out: not complete within "
                    f"wait(timeout={limit:g} s)"
                )
            if self._on_blocked is not None:
                self._on_blocked(time.perf_counter() - t0)
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        return self._event.is_set()

    def is_success(self) -> bool:
        return self._event.is_set() and self._error is None

    def exception(self):
        return self._error

    def result(self) -> list:
        """The op's output tensors (complete once ``wait()`` returned)."""
        return self._result

    def source_rank(self) -> int:
        """For a receive: the sender's global rank (known once complete)."""
        return self._source

    def synchronize(self) -> None:
        self.wait()

    def get_future(self) -> torch.futures.Future:
        """A ``torch.futures.Future`` completed with ``result()`` (or the op's error)
        when the op completes: what a DDP comm hook returns."""
        with self._lock:
            if self._future is not None:
                return self._future
            fut = self._future = torch.futures.Future()
            done = self._event.is_set()
        if done:
            self._fulfil(fut)
        return fut

    def __repr__(self) -> str:
        state = "completed" if self._event.is_set() else "in flight"
        return f"<xtrain Work {self._op} on '{group_label(self._group)}' {state}>"


class P2POp:
    """A point-to-point op for ``batch_isend_irecv`` (torch's signature).

    ``op`` is an ``isend`` or ``irecv``: xtrain's (``xtrain.comm.dist``'s, or
    a Comm's method) or torch.distributed's; ``peer`` is a global rank, or
    ``group_peer`` a rank in ``group``.
    """

    def __init__(self, op, tensor: torch.Tensor, peer: int | None = None, group=None, tag: int = 0, group_peer: int | None = None):
        kind = getattr(op, "__name__", None)
        if kind not in ("isend", "irecv"):
            raise ValueError(f"P2POp: op must be an isend or irecv function, got {op!r}")
        self.op, self.tensor, self.peer, self.group, self.tag, self.group_peer = op, tensor, peer, group, tag, group_peer
        self.kind = kind

    def __repr__(self) -> str:
        return f"P2POp({self.kind}, peer={self.peer}, group_peer={self.group_peer}, tag={self.tag}, {tuple(self.tensor.shape)})"


def _p2p_kind(p) -> str:
    kind = getattr(p, "kind", None) or getattr(getattr(p, "op", None), "__name__", None)
    if kind not in ("isend", "irecv"):
        raise ValueError(f"batch_isend_irecv: each entry must be a P2POp with op isend or irecv, got {p!r}")
    return kind


class _Scope:
    """Traffic of the calls made inside an object collective, recorded as one call."""

    __slots__ = ("messages", "recv", "sent")

    def __init__(self):
        self.sent = self.recv = self.messages = 0


def _pg(group):
    return None if group is SOLO else group


class Comm:
    """Base of both implementations: torch's argument rules, the handle, the ledger."""

    name = "base"

    def __init__(self, ledger: Ledger | None = None):
        self.ledger = ledger or Ledger()
        self._tls = threading.local()

    # ---- recording --------------------------------------------------------------------

    def _record(self, op: str, group, sent: int, recv: int, t0: float, end: float | None, blocked: float, messages: int = 0):
        if group is SOLO:  # a one-member group moves nothing: keep it out of the ledger
            return
        scope = getattr(self._tls, "scope", None)
        if scope is not None:
            scope.sent += sent
            scope.recv += recv
            scope.messages += messages
            return
        self.ledger.record(op, group_label(group), sent, recv, t0, end, blocked, messages)

    def _blocked_cb(self, op: str, group):
        if group is SOLO:
            return None
        label = group_label(group)
        return lambda s: self.ledger.add_blocked(op, label, s)

    @contextmanager
    def _as_one(self, op: str | None, group):
        """Record the calls inside as one call of ``op`` (``None``: record nothing)."""
        outer = getattr(self._tls, "scope", None)
        scope = self._tls.scope = _Scope()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._tls.scope = outer
        if op is not None:
            self._record(op, group, scope.sent, scope.recv, t0, None, time.perf_counter() - t0, scope.messages)

    def _run_sync(self, op: str, group, fn, sent: int = 0, recv: int = 0, traffic=None) -> None:
        """Run ``fn()`` on the caller's thread and record it."""
        t0 = time.perf_counter()
        with guarded(op, group):
            fn()
        end = time.perf_counter()
        if traffic is not None:
            sent, recv, messages = traffic.sent, traffic.recv, traffic.messages
        else:
            messages = 0
        self._record(op, group, sent, recv, t0, end, end - t0, messages)

    def _start_async(self, op: str, group, start, result=None, sent: int = 0, recv: int = 0, traffic=None) -> Work:
        """``start(done)`` launches the op and arranges ``done(error=None, result=None)``
        to be called once it completes, from any thread; returns its handle."""
        t0 = time.perf_counter()
        work = Work(op, group, result, self._blocked_cb(op, group))

        def done(error=None, value=None):
            if value is not None:
                work._result = value
            if error is None:
                s, r, m = (traffic.sent, traffic.recv, traffic.messages) if traffic is not None else (sent, recv, 0)
                with suppress(Exception):  # the op's outcome matters more than its bookkeeping
                    self._record(op, group, s, r, t0, None, 0.0, m)
            work._done(error)

        with guarded(op, group):
            start(done)
        return work

    # ---- the collectives (torch's signatures) ------------------------------------------

    def all_reduce(self, tensor, op=ReduceOp.SUM, group=None, async_op=False):
        if not_member(group):
            return warn_not_member("all_reduce")
        return self._all_reduce(tensor, op, group, async_op)

    def reduce_scatter_tensor(self, output, input, op=ReduceOp.SUM, group=None, async_op=False):
        if not_member(group):
            return warn_not_member("reduce_scatter_tensor")
        return self._reduce_scatter_tensor(output, input, op, group, async_op, "reduce_scatter_tensor")

    def reduce_scatter_single(self, output, input, op=ReduceOp.SUM, group=None, async_op=False):
        if not_member(group):
            return warn_not_member("reduce_scatter_single")
        return self._reduce_scatter_tensor(output, input, op, group, async_op, "reduce_scatter_single")

    def reduce_scatter(self, output, input_list, op=ReduceOp.SUM, group=None, async_op=False):
        if not_member(group):
            return warn_not_member("reduce_scatter")
        n = group_size(group)
        if len(input_list) != n or any(t.numel() != output.numel() for t in input_list):
            raise ValueError(
                f"reduce_scatter: input_list needs {n} tensors (the group size) of output's {output.numel()} "
                f"elements each, got {[t.numel() for t in input_list]}"
            )
        if any(t.dtype != output.dtype for t in input_list):
            raise ValueError("reduce_scatter: every tensor of input_list must have output's dtype")
        return self._reduce_scatter_list(output, input_list, op, group, async_op)

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        if not_member(group):
            return warn_not_member("all_gather_into_tensor")
        return self._all_gather_into_tensor(output_tensor, input_tensor, group, async_op, "all_gather_into_tensor")

    def all_gather_single(self, output_tensor, input_tensor, group=None, async_op=False):
        if not_member(group):
            return warn_not_member("all_gather_single")
        return self._all_gather_into_tensor(output_tensor, input_tensor, group, async_op, "all_gather_single")

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        if not_member(group):
            return warn_not_member("all_gather")
        return self._all_gather(tensor_list, tensor, group, async_op)

    def broadcast(self, tensor, src=None, group=None, async_op=False, group_src=None):
        if not_member(group):
            return warn_not_member("broadcast")
        return self._broadcast(tensor, canonical_rank(group, src, group_src, "src"), group, async_op)

    def reduce(self, tensor, dst=None, op=ReduceOp.SUM, group=None, async_op=False, group_dst=None):
        if not_member(group):
            return warn_not_member("reduce")
        return self._reduce(tensor, canonical_rank(group, dst, group_dst, "dst"), op, group, async_op)

    def gather(self, tensor, gather_list=None, dst=None, group=None, async_op=False, group_dst=None):
        if not_member(group):
            return warn_not_member("gather")
        return self._gather(tensor, gather_list, canonical_rank(group, dst, group_dst, "dst", default=0), group, async_op)

    def scatter(self, tensor, scatter_list=None, src=None, group=None, async_op=False, group_src=None):
        if not_member(group):
            return warn_not_member("scatter")
        return self._scatter(tensor, scatter_list, canonical_rank(group, src, group_src, "src", default=0), group, async_op)

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if not_member(group):
            return warn_not_member("all_to_all_single")
        return self._all_to_all_single(output, input, output_split_sizes, input_split_sizes, group, async_op)

    def all_to_all(self, output_tensor_list, input_tensor_list, group=None, async_op=False):
        if not_member(group):
            return warn_not_member("all_to_all")
        return self._all_to_all(output_tensor_list, input_tensor_list, group, async_op)

    def barrier(self, group=None, async_op=False, device_ids=None, timeout=None):
        if not_member(group):
            return warn_not_member("barrier")
        return self._barrier(group, async_op, seconds(timeout))

    def monitored_barrier(self, group=None, timeout=None, wait_all_ranks=False):
        """A barrier that names the ranks that did not arrive within ``timeout``
        (default: the process group's timeout): group rank 0 collects every
        rank's arrival and raises ``CollectiveTimeout`` naming the missing
        global ranks (the first one, or with ``wait_all_ranks`` all of them);
        the other ranks raise the same report."""
        if not_member(group):
            return warn_not_member("monitored_barrier")
        return self._monitored_barrier(group, seconds(timeout), wait_all_ranks)

    # ---- point-to-point ----------------------------------------------------------------

    def send(self, tensor, dst=None, group=None, tag=0, group_dst=None) -> None:
        if not_member(group):
            return warn_not_member("send")
        dst = canonical_rank(group, dst, group_dst, "dst")
        self._run_sync("send", group, lambda: dist.send(tensor, dst, group=_pg(group), tag=tag), sent=_nbytes(tensor))
        return None

    def recv(self, tensor, src=None, group=None, tag=0, group_src=None) -> int:
        """Blocking receive; returns the sender's global rank (any sender when ``src`` is None), -1 off the group."""
        if not_member(group):
            warn_not_member("recv")
            return -1
        src = None if src is None and group_src is None else canonical_rank(group, src, group_src, "src")
        sender = []
        self._run_sync("recv", group, lambda: sender.append(dist.recv(tensor, src, group=_pg(group), tag=tag)), recv=_nbytes(tensor))
        return sender[0]

    def isend(self, tensor, dst=None, group=None, tag=0, group_dst=None):
        if not_member(group):
            return warn_not_member("isend")
        return self._post_p2p(True, tensor, canonical_rank(group, dst, group_dst, "dst"), group, tag, "isend")

    def irecv(self, tensor, src=None, group=None, tag=0, group_src=None):
        if not_member(group):
            return warn_not_member("irecv")
        src = None if src is None and group_src is None else canonical_rank(group, src, group_src, "src")
        return self._post_p2p(False, tensor, src, group, tag, "irecv")

    def _post_p2p(self, is_send: bool, tensor, peer, group, tag, op: str, on_done=None, record=True) -> Work:
        """Post one message with torch's own isend/irecv; a waiter thread completes the handle."""
        pg = _pg(group)
        size = _nbytes(tensor)
        t0 = time.perf_counter()
        with guarded(op, group):
            tw = dist.isend(tensor, peer, group=pg, tag=tag) if is_send else dist.irecv(tensor, peer, group=pg, tag=tag)
        work = Work(op, group, [tensor], self._blocked_cb(op, group) if record else None)

        def body():
            try:
                tw.wait()
                if not is_send:
                    try:
                        src = tw._source_rank() if peer is None else peer
                        work._source = src if peer is not None or pg is None else dist.get_global_rank(pg, src)
                    except Exception:  # noqa: BLE001 - the sender is known only for any-source receives
                        work._source = -1 if peer is None else peer
            except BaseException as e:  # noqa: BLE001 - handed to wait()
                work._done(e)
                if on_done is not None:
                    on_done(e)
                return
            if record:
                self._record(op, group, size if is_send else 0, 0 if is_send else size, t0, None, 0.0)
            if on_done is not None:
                on_done(None)
            work._done()

        WAITERS.submit(body)
        return work

    def batch_isend_irecv(self, p2p_op_list) -> list:
        """Post every send and receive of the list at once; one handle each.

        All ops must use one group (as torch requires); the ledger records the
        batch as one ``batch_isend_irecv`` call once all of its messages are done.
        """
        if not isinstance(p2p_op_list, (list, tuple)) or not p2p_op_list:
            raise ValueError("batch_isend_irecv: p2p_op_list must be a non-empty list of P2POp")
        kinds = [_p2p_kind(p) for p in p2p_op_list]
        group = p2p_op_list[0].group
        if any(p.group is not group for p in p2p_op_list):
            raise ValueError("batch_isend_irecv: all ops need to use the same group")
        if not_member(group):
            warn_not_member("batch_isend_irecv")
            return []
        peers = [
            canonical_rank(group, p.peer, getattr(p, "group_peer", None), "dst" if k == "isend" else "src")
            for p, k in zip(p2p_op_list, kinds)
        ]
        sent = sum(_nbytes(p.tensor) for p, k in zip(p2p_op_list, kinds) if k == "isend")
        recv = sum(_nbytes(p.tensor) for p, k in zip(p2p_op_list, kinds) if k == "irecv")
        left = [len(p2p_op_list)]
        lock = threading.Lock()
        t0 = time.perf_counter()

        def one_done(error):
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last and error is None:
                self._record("batch_isend_irecv", group, sent, recv, t0, None, 0.0, sum(k == "isend" for k in kinds))

        return [
            self._post_p2p(k == "isend", p.tensor, peer, group, p.tag, "batch_isend_irecv", on_done=one_done, record=False)
            for p, k, peer in zip(p2p_op_list, kinds, peers)
        ]

    # ---- object collectives (pickled payloads over the tensor collectives) ------------

    def _object_device(self, group, device=None) -> torch.device:
        if device is not None:
            return torch.device(device)
        pg = dist.group.WORLD if group is None else group
        if group is not SOLO and dist.get_backend(pg) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather_object(self, object_list, obj, group=None):
        """``object_list[i]`` gets group rank i's ``obj`` (any picklable object)."""
        if not_member(group):
            return warn_not_member("all_gather_object")
        dev = self._object_device(group)
        n = group_size(group)
        with self._as_one("all_gather_object", group):
            payload = _to_tensor(obj, dev)
            sizes = torch.zeros(n, dtype=torch.int64, device=dev)
            self._all_gather_into_tensor(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=dev), group, False, "all_gather_into_tensor")
            sizes = sizes.tolist()
            big = max(sizes)
            out = torch.empty(n * big, dtype=torch.uint8, device=dev)
            self._all_gather_into_tensor(out, _padded(payload, big), group, False, "all_gather_into_tensor")
        for i, s in enumerate(sizes):
            object_list[i] = _from_tensor(out[i * big : i * big + s])
        return None

    def broadcast_object_list(self, object_list, src=None, group=None, device=None, group_src=None):
        """Every rank's ``object_list`` gets ``src``'s objects, in place."""
        if not_member(group):
            return warn_not_member("broadcast_object_list")
        src = canonical_rank(group, src, group_src, "src")
        dev = self._object_device(group, device)
        me = dist.get_rank() if dist.is_initialized() else 0
        with self._as_one("broadcast_object_list", group):
            if me == src or group is SOLO:
                parts = [_to_tensor(o, dev) for o in object_list]
                sizes = torch.tensor([p.numel() for p in parts], dtype=torch.int64, device=dev)
            else:
                sizes = torch.empty(len(object_list), dtype=torch.int64, device=dev)
            self._broadcast(sizes, src, group, False)
            total = int(sizes.sum())
            flat = torch.cat(parts) if (me == src or group is SOLO) and parts else torch.empty(total, dtype=torch.uint8, device=dev)
            self._broadcast(flat, src, group, False)
        if me != src and group is not SOLO:
            off = 0
            for i, s in enumerate(sizes.tolist()):
                object_list[i] = _from_tensor(flat[off : off + s])
                off += s
        return None

    def gather_object(self, obj, object_gather_list=None, dst=None, group=None, group_dst=None):
        """On ``dst``, ``object_gather_list[i]`` gets group rank i's ``obj``."""
        if not_member(group):
            return warn_not_member("gather_object")
        dst = canonical_rank(group, dst, group_dst, "dst", default=0)
        dev = self._object_device(group)
        n = group_size(group)
        me = dist.get_rank() if dist.is_initialized() else 0
        is_dst = me == dst or group is SOLO
        if is_dst and (object_gather_list is None or len(object_gather_list) != n):
            raise ValueError(f"gather_object: the destination needs an object_gather_list of {n} entries (the group size)")
        with self._as_one("gather_object", group):
            payload = _to_tensor(obj, dev)
            sizes = torch.zeros(n, dtype=torch.int64, device=dev)
            self._all_gather_into_tensor(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=dev), group, False, "all_gather_into_tensor")
            sizes = sizes.tolist()
            big = max(sizes)
            outs = [torch.empty(big, dtype=torch.uint8, device=dev) for _ in range(n)] if is_dst else None
            self._gather(_padded(payload, big), outs, dst, group, False)
        if is_dst:
            for i, s in enumerate(sizes):
                object_gather_list[i] = _from_tensor(outs[i][:s])
        return None

    def scatter_object_list(self, scatter_object_output_list, scatter_object_input_list=None, src=None, group=None, group_src=None):
        """``scatter_object_output_list[0]`` on group rank i gets ``src``'s ``scatter_object_input_list[i]``."""
        if not_member(group):
            return warn_not_member("scatter_object_list")
        src = canonical_rank(group, src, group_src, "src", default=0)
        if not isinstance(scatter_object_output_list, list) or len(scatter_object_output_list) < 1:
            raise ValueError("scatter_object_list: scatter_object_output_list must be a list of at least one element")
        dev = self._object_device(group)
        n = group_size(group)
        me = dist.get_rank() if dist.is_initialized() else 0
        is_src = me == src or group is SOLO
        with self._as_one("scatter_object_list", group):
            if is_src:
                if scatter_object_input_list is None or len(scatter_object_input_list) != n:
                    raise ValueError(f"scatter_object_list: the source needs a scatter_object_input_list of {n} objects")
                parts = [_to_tensor(o, dev) for o in scatter_object_input_list]
                sizes = torch.tensor([p.numel() for p in parts], dtype=torch.int64, device=dev)
            else:
                sizes = torch.empty(n, dtype=torch.int64, device=dev)
            self._broadcast(sizes, src, group, False)
            big = int(sizes.max())
            mine = torch.empty(big, dtype=torch.uint8, device=dev)
            self._scatter(mine, [_padded(p, big) for p in parts] if is_src else None, src, group, False)
        scatter_object_output_list[0] = _from_tensor(mine[: int(sizes[group_rank(group)])])
        return None

    def send_object_list(self, object_list, dst=None, group=None, device=None, group_dst=None, use_batch=False):
        if not_member(group):
            return warn_not_member("send_object_list")
        dst = canonical_rank(group, dst, group_dst, "dst")
        dev = self._object_device(group, device)
        with self._as_one("send_object_list", group):
            parts = [_to_tensor(o, dev) for o in object_list]
            sizes = torch.tensor([p.numel() for p in parts], dtype=torch.int64, device=dev)
            self.send(sizes, dst, group=group)
            self.send(torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=dev), dst, group=group)
        return None

    def recv_object_list(self, object_list, src=None, group=None, device=None, group_src=None, use_batch=False) -> int:
        """Fill ``object_list`` from ``src`` (required, as in torch); returns the sender's global rank."""
        if not_member(group):
            warn_not_member("recv_object_list")
            return -1
        src = canonical_rank(group, src, group_src, "src")
        dev = self._object_device(group, device)
        with self._as_one("recv_object_list", group):
            sizes = torch.empty(len(object_list), dtype=torch.int64, device=dev)
            sender = self.recv(sizes, src, group=group)
            flat = torch.empty(int(sizes.sum()), dtype=torch.uint8, device=dev)
            self.recv(flat, sender, group=group)
        off = 0
        for i, s in enumerate(sizes.tolist()):
            object_list[i] = _from_tensor(flat[off : off + s])
            off += s
        return sender

    # ---- the ledger of every rank -----------------------------------------------------

    def ledger_table(self, group=None) -> list[dict]:
        """Every rank's ledger in one table (a collective: every rank of ``group`` calls it).

        One row per (op, group label), each figure as ``{global rank: value}``
        (``ledger.merge``; ``ledger.format_table`` prints it). The gather itself
        is not recorded.
        """
        if not_member(group):
            warn_not_member("ledger_table")
            return []
        n = group_size(group)
        gathered = [None] * n
        with self._as_one(None, group):
            self.all_gather_object(gathered, self.ledger.summary_rows(), group=group)
        return merge(gathered, group_ranks(group))

    # ---- what each implementation supplies --------------------------------------------

    def _all_reduce(self, tensor, op, group, async_op): raise NotImplementedError
    def _reduce_scatter_tensor(self, output, input, op, group, async_op, name): raise NotImplementedError
    def _reduce_scatter_list(self, output, input_list, op, group, async_op): raise NotImplementedError
    def _all_gather_into_tensor(self, output_tensor, input_tensor, group, async_op, name): raise NotImplementedError
    def _all_gather(self, tensor_list, tensor, group, async_op): raise NotImplementedError
    def _broadcast(self, tensor, src, group, async_op): raise NotImplementedError
    def _reduce(self, tensor, dst, op, group, async_op): raise NotImplementedError
    def _gather(self, tensor, gather_list, dst, group, async_op): raise NotImplementedError
    def _scatter(self, tensor, scatter_list, src, group, async_op): raise NotImplementedError
    def _all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, group, async_op): raise NotImplementedError
    def _all_to_all(self, output_tensor_list, input_tensor_list, group, async_op): raise NotImplementedError
    def _barrier(self, group, async_op, timeout): raise NotImplementedError
    def _monitored_barrier(self, group, timeout, wait_all_ranks): raise NotImplementedError


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_nbytes = nbytes


def _to_tensor(obj, device) -> torch.Tensor:
    buf = io.BytesIO()
    pickle.Pickler(buf).dump(obj)
    data = bytearray(buf.getbuffer())
    return torch.frombuffer(data, dtype=torch.uint8).to(device) if data else torch.empty(0, dtype=torch.uint8, device=device)


def _from_tensor(t: torch.Tensor):
    return pickle.loads(t.cpu().numpy().tobytes())


def _padded(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.numel() == n:
        return t
    out = torch.zeros(n, dtype=t.dtype, device=t.device)
    out[: t.numel()] = t
    return out
