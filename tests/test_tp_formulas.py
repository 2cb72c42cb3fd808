"""docs/tensor-parallel.md's formulas against measurements from real runs.

One 4-rank job (model=tiny, strategy=tp, tp=2 so dp=2, comm=xtrain, one
step each, sequence parallel off and on) returns rank 0's comm ledger for the
step and the bytes autograd saves in one forward at tp=2; the test compares
the tp group's bytes and call counts with ``xtrain.formulas.tp_comm_per_step``
(per layer: 4 all-reduces of B*T*D, or 4 all-gathers + 4 reduce-scatters
under sp; plus the embedding, head entry, the loss's three all-reduces of
B*T, the gradient-norm scalar and the partial-gradient buffer) and checks
that sequence parallel saves fewer activation bytes. The measurement helpers
(``comm_run``, ``memory_cases``, ``ledger_tp``) are the script's, so the
test and scripts/measure_tensor_parallel.py measure the same way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from xtrain.config import compose
from xtrain.formulas import tp_comm_per_step
from xtrain.model import ModelConfig
from xtrain.spawn import run_on_ranks

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_tensor_parallel.py"
_spec = importlib.util.spec_from_file_location("measure_tensor_parallel", _SCRIPT)
mtp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mtp)

MODEL = ["model=tiny"]  # dim 64, 2 layers, 4 heads, 2 kv heads: at tp=2 the kv heads are sharded
TP, B_GLOBAL, T = 2, 8, 32
WORLD = 4


def _worker(rank, world, root):
    import torch

    torch.set_num_threads(1)
    out = {}
    for sp in (False, True):
        out[f"comm_sp={sp}"] = mtp.comm_run(rank, MODEL, TP, sp, B_GLOBAL, T, 1, root, f"sp{sp}")["comm"]
    mem = mtp.memory_cases(rank, world, MODEL, 2, T, tps=(TP,))
    out["saved"] = {sp: mem[f"tp{TP}" + ("_sp" if sp else "")]["saved"] for sp in (False, True)}
    out["params"] = {k: mem[k]["params"]["total"] for k in ("single", f"tp{TP}")}
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-formulas")
    return run_on_ranks(_worker, WORLD, str(root), timeout=180, pg_timeout=60)[0]


def _mcfg():
    return ModelConfig.from_dict(dict(compose(MODEL).model.items()))


@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_tp_ledger_matches_per_layer_formula(measured, sp):
    ledger = mtp.ledger_tp(measured[f"comm_sp={sp}"])
    want = tp_comm_per_step(_mcfg(), B_GLOBAL // (WORLD // TP), T, TP, sp)["total"]
    assert set(ledger) == set(want), f"ops on tp: ledger {sorted(ledger)} vs formula {sorted(want)}"
    for op, w in want.items():
        got = ledger[op]
        assert got["calls"] == w["calls"], f"{op}: {got['calls']} calls, formula {w['calls']}"
        assert got["bytes_sent"] == pytest.approx(w["bytes_sent"], rel=0.05), f"{op}: ledger {got['bytes_sent']} vs formula {w['bytes_sent']}"


def test_sequence_parallel_saves_fewer_activation_bytes(measured):
    off, on = measured["saved"][False], measured["saved"][True]
    assert on < off, f"saved activation bytes with sp {on:,} not below without {off:,}"


def test_block_parameters_halve_at_tp2(measured):
    # tiny at tp=2: every matmul is split (kv heads 2 % 2 == 0); only the norms stay whole
    single, tp2 = measured["params"]["single"], measured["params"][f"tp{TP}"]
    norms = 2 * _mcfg().n_layers * _mcfg().dim * 4
    assert tp2 == (single - norms) // TP + norms
