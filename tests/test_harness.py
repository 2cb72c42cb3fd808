"""The multi-process harness fails loudly and never hangs."""

import os
import time

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


def test_hung_job_ends_in_a_timeout_error():
    t0 = time.monotonic()
    with pytest.raises(RanksTimedOut, match=r"timed out after 8s; ranks \[0, 1\] had not finished"):
        run_on_ranks(_hang, 2, backend=None, timeout=8)
    assert time.monotonic() - t0 < 20
