"""Unit tests of the formulas in ``xtrain.formulas`` that no measurement checks.

Most formulas are checked against a measurement elsewhere, and are not
repeated here:

- collectives' bytes and messages (ring, two-shot, pairwise, tree, star,
  scatter + ring, chain, linear gather/scatter, dissemination barrier), at
  n = 3 and 4: tests/test_comm_ledger.py, against the hand-written
  algorithms' own counts;
- ZeRO model-state memory and communication per step:
  tests/test_data_parallel.py, against live tensor bytes and the ledger;
- zero3's gathered peak: tests/test_sharded_checkpoint.py;
- tensor-parallel bytes by region: tests/test_tp_formulas.py, against the
  ledger of real runs.

What is left: nccl-tests' bus-bandwidth factors (a convention), the FSDP2
figures scripts/bench_strategies.py states for torch (which reports no
traffic), the integer rounding of the figures comm=torch records for sizes
that n does not divide, and the rooted collectives' figures at group sizes
the ledger test does not run.
"""

from __future__ import annotations

import math

import pytest

from xtrain import formulas as F


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
def test_busbw_factors_are_nccl_tests(n):
    """nccl-tests' PERFORMANCE.md: all-reduce 2(n-1)/n; all-gather,
    reduce-scatter and all-to-all (n-1)/n; broadcast and reduce 1."""
    assert F.busbw_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert F.busbw_factor(op, n) == pytest.approx((n - 1) / n)
    for op in ("broadcast", "reduce"):
        assert F.busbw_factor(op, n) == 1.0
    assert F.busbw_factor("all_reduce", 4) == 1.5 and F.busbw_factor("all_gather", 4) == 0.75


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_ring_bytes_round_down_what_ring_factor_states(n):
    """comm=torch records ``ring_bytes``: S·factor rounded down, also where n
    does not divide S; exact where it does."""
    for op in ("all_reduce", "reduce_scatter", "all_gather", "all_to_all"):
        for nbytes in range(0, 50):
            got = F.ring_bytes(op, nbytes, n)
            assert isinstance(got, int)
            assert got == math.floor(F.ring_factor(op, n) * nbytes + 1e-9), (op, nbytes, n)
        assert F.ring_bytes(op, 4 * n * 1000, n) == F.ring_factor(op, n) * 4 * n * 1000
    assert F.ring_bytes("all_reduce", 1, 1) == 0  # a group of one moves nothing


def test_fsdp2_pads_dim0_to_a_multiple_of_n():
    # 10 rows of 3 pad to 12 on 4 ranks; 8 rows stay; a 5-vector pads to 8
    assert F.fsdp2_padded_numel([(10, 3), (8, 2), (5,)], 4) == 12 * 3 + 8 * 2 + 8
    assert F.fsdp2_padded_numel([(10, 3)], 1) == 30
    assert F.fsdp2_padded_numel([], 4) == 0


def test_fsdp2_comm_is_zero3_comm_less_the_roots_backward_gather():
    """All-gather forward and reduce-scatter (n-1)/n·4·(padded Ψ) each; the
    backward all-gather skips the root's own parameters. With nothing at the
    root and nothing padded it is ZeRO-3's 3(n-1)/n·4Ψ."""
    blocks, root = [(16, 8), (16,)] * 3, [(32, 8)]
    for n in (2, 4):
        got = F.fsdp2_comm_bytes(blocks + root, root, n)
        psi, psi_root = 3 * (16 * 8 + 16), 32 * 8
        f = (n - 1) / n
        assert got == {
            "all_gather (forward)": int(f * 4 * (psi + psi_root)),
            "all_gather (backward)": int(f * 4 * psi),
            "reduce_scatter": int(f * 4 * (psi + psi_root)),
        }
        no_root = F.fsdp2_comm_bytes(blocks, [], n)
        assert sum(no_root.values()) == pytest.approx(F.zero_comm_bytes("zero3", psi, n), abs=3)
    padded = F.fsdp2_comm_bytes([(5, 4)], [], 4)  # 5 rows pad to 8
    assert padded["reduce_scatter"] == int(0.75 * 4 * 8 * 4)


@pytest.mark.parametrize("n", range(2, 18))
def test_binomial_tree_every_rank_has_one_parent_and_the_root_log2_n_children(n):
    kids = [F.binomial_tree_children(v, n) for v in range(n)]
    assert sum(kids) == n - 1
    assert kids[0] == F.tree_rounds(n) == math.ceil(math.log2(n))
    assert F.dissemination_barrier_traffic(n) == (F.tree_rounds(n),) * 3


@pytest.mark.parametrize("n", range(2, 10))
def test_rooted_and_linear_collectives_conserve_bytes_and_move_n_minus_1_copies(n):
    """At every n (the ledger test runs 3 and 4): every byte sent is received,
    and the broadcasts and reduces put (n-1)·S on the wire in all, as
    docs/collectives.md says; gather/scatter (n-1) pieces; the chains in
    either direction agree (comm=torch's reduce chain runs root+1 -> ... ->
    root, the hand-written one root+n-1 -> ... -> root)."""
    S, m = 12 * n, 3

    def totals(traffic):
        return sum(t.sent for t in traffic), sum(t.recv for t in traffic)

    shapes = {
        "tree broadcast": [F.tree_broadcast_traffic(S, n, v) for v in range(n)],
        "tree reduce": [F.tree_reduce_traffic(S, n, v) for v in range(n)],
        "star broadcast": [F.star_broadcast_traffic(S, n, v) for v in range(n)],
        "chain broadcast": [F.chain_broadcast_traffic(S, n, v, m) for v in range(n)],
        "chain reduce": [F.chain_reduce_traffic(S, n, v, m) for v in range(n)],
    }
    if n > 2:  # n <= 2 always takes the tree
        shapes["scatter+ring broadcast"] = [F.scatter_ring_broadcast_traffic(S, n, v, m) for v in range(n)]
    for name, traffic in shapes.items():
        assert totals(traffic) == ((n - 1) * S, (n - 1) * S), name
    for root in range(n):
        assert totals([F.gather_traffic(S // n, n, v == root) for v in range(n)]) == ((n - 1) * (S // n),) * 2
        assert totals([F.scatter_traffic(S // n, n, v == root) for v in range(n)]) == ((n - 1) * (S // n),) * 2
    # the chain's messages: m per link, n-1 links
    assert sum(t.messages for t in shapes["chain broadcast"]) == sum(t.messages for t in shapes["chain reduce"]) == (n - 1) * m
    # the rank that starts a chain receives nothing; the root sends nothing into a reduce
    assert F.chain_reduce_traffic(S, n, n - 1).recv == 0 and F.chain_reduce_traffic(S, n, 0).sent == 0
    assert F.chain_broadcast_traffic(S, n, n - 1).sent == 0 and F.chain_broadcast_traffic(S, n, 0).recv == 0


def test_all_to_all_bytes_are_the_other_ranks_pieces():
    assert F.all_to_all_bytes([3, 5, 7], 1) == 10
    assert F.all_to_all_bytes([4, 4, 4, 4], 2) == F.ring_bytes("all_to_all", 16, 4) == 12

