"""The multi-process harness fails loudly and never hangs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xtrain.spawn import RankFailed, RanksTimedOut, run_on_ranks


def _ranks(rank, world):
    return rank, world, int(os.environ["RANK"])


def _raise_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("boom from rank one")
    time.sleep(30)  # the others would wait; the harness must not
    return rank


def _hang(rank, world):
    time.sleep(60)


def test_results_come_back_in_rank_order():
    assert run_on_ranks(_ranks, 3, timeout=60) == [(0, 3, 0), (1, 3, 1), (2, 3, 2)]


def test_failing_rank_surfaces_its_traceback_at_once():
    t0 = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 of 2 failed:(.|\n)*boom from rank one(.|\n)*_raise_on_rank_one"):
        run_on_ranks(_raise_on_rank_one, 2, timeout=60)
    assert time.monotonic() - t0 < 25


def test_nccl_with_fewer_gpus_than_ranks_fails_with_one_clear_message():
    import torch

    gpus = torch.cuda.device_count()
    n = gpus + 1  # always one rank too many
    with pytest.raises(RankFailed, match=rf"backend nccl needs one GPU per rank: {n} ranks, {gpus} GPUs"):
        run_on_ranks(_ranks, n, backend="nccl", timeout=60)


def test_hung_job_ends_in_a_timeout_error():
    t0 = time.monotonic()
    with pytest.raises(RanksTimedOut, match=r"timed out after 8s; ranks \[0, 1\] had not finished"):
        run_on_ranks(_hang, 2, backend=None, timeout=8)
    assert time.monotonic() - t0 < 20


def _note_pid_and_sleep(rank, world, folder):
    Path(folder, f"rank{rank}.pid").write_text(str(os.getpid()))
    time.sleep(120)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_ranks_die_with_a_killed_parent(tmp_path):
    """A harness parent killed from outside (SIGKILL: no cleanup runs) leaves no ranks running."""
    launcher = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_harness; "
        f"from xtrain.spawn import run_on_ranks; "
        f"run_on_ranks(test_harness._note_pid_and_sleep, 2, {str(tmp_path)!r}, backend=None, timeout=120)"
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("rank*.pid"))) < 2:
            assert time.monotonic() < deadline and parent.poll() is None, "ranks did not start"
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
        assert all(_alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), f"ranks {pids} outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
