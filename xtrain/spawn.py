"""Run a function on N local ranks: the one multi-process harness.

``run_on_ranks(fn, nprocs, *args)`` spawns N processes on a free port, forms
one process group (gloo by default), calls ``fn(rank, world_size, *args)`` on
each and returns the per-rank results in rank order. Used by the tests and by
the benchmark scripts.

Failure is loud and bounded:
- a rank that raises takes the job down at once; the error names that rank and
  carries its traceback;
- a job still running after ``timeout`` seconds is killed, and the error names
  the ranks that had not finished (a hung collective never hangs the caller);
- a port taken between choosing and binding is retried on another port;
- on Linux a rank dies with the process that spawned it, so a test or
  benchmark killed from outside leaves no ranks running.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from queue import Empty


class RankFailed(RuntimeError):
    """A rank raised; the message holds its rank and traceback."""


class RanksTimedOut(TimeoutError):
    """The job outlived its hard timeout; the message names the ranks still running."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this rank when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Daemon processes are ended by a parent that exits normally, not by one that
    is killed; without this its ranks would run on, holding the CPU.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent was gone before the call took effect
        os._exit(1)


def _worker(rank, world_size, port, backend, pg_timeout_s, fn, args, env, queue, parent_pid):
    _die_with_parent(parent_pid)
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share few cores; one BLAS thread each
    try:
        if backend == "nccl":
            gpus = torch.cuda.device_count()
            if world_size > gpus:  # NCCL refuses two ranks on one GPU ("duplicate GPU")
                raise RuntimeError(f"backend nccl needs one GPU per rank: {world_size} ranks, {gpus} GPUs")
            torch.cuda.set_device(rank)
        if backend is not None:
            dist.init_process_group(
                backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
            )
        # Plain pickle copies tensors by value; the queue's own pickler would
        # share them through handles that die with this process.
        result = pickle.dumps(fn(rank, world_size, *args))
        queue.put((rank, "ok", result))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        kind = "addr" if _address_in_use(e) else "error"
        queue.put((rank, kind, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    try:
        if backend is not None and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - results are in; teardown noise is not a failure
        pass


def _address_in_use(e: BaseException) -> bool:
    text = str(e).lower()
    return "address already in use" in text or "eaddrinuse" in text


def run_on_ranks(
    fn,
    nprocs: int,
    *args,
    backend: str | None = "gloo",
    timeout: float = 120.0,
    pg_timeout: float | None = None,
    env: dict | None = None,
    retries: int = 3,
):
    """Call ``fn(rank, nprocs, *args)`` on ``nprocs`` spawned ranks; return results by rank.

    ``fn`` and its arguments must be picklable (a module-level function).
    ``pg_timeout`` bounds each collective (default: ``timeout``), so a rank left
    waiting on a dead peer raises inside the job before the hard kill.
    ``backend=None`` spawns the ranks without a process group.
    """
    pg_timeout = pg_timeout or timeout
    for attempt in range(retries):
        try:
            return _run_once(fn, nprocs, args, backend, timeout, pg_timeout, env or {})
        except _PortTaken:
            if attempt == retries - 1:
                raise
    raise AssertionError("unreachable")


class _PortTaken(Exception):
    pass


def _run_once(fn, nprocs, args, backend, timeout, pg_timeout, env):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, nprocs, port, backend, pg_timeout, fn, args, env, queue, os.getpid()),
            name=f"xtrain-rank{r}",
            daemon=True,
        )
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < nprocs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(nprocs)) - set(results))
                raise RanksTimedOut(
                    f"{nprocs}-rank job timed out after {timeout:.0f}s; ranks {missing} had not finished "
                    f"(a hung collective or a rank waiting on a dead peer)"
                )
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 0.5))
            except Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    r = dead[0]
                    raise RankFailed(f"rank {r} of {nprocs} died with exit code {procs[r].exitcode} and no traceback")
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            elif status == "addr":
                raise _PortTaken(payload)
            else:
                raise RankFailed(f"rank {rank} of {nprocs} failed:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == nprocs else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        queue.close()
    return [results[r] for r in range(nprocs)]
