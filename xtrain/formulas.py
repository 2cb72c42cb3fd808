"""Every formula the docs state, in one place: the ledger, the tests, the docs'
tables and the benchmark scripts import them from here.

Sections: collectives (bytes and messages per rank, nccl-tests' bus-bandwidth
factors), ZeRO memory and communication, tensor-parallel bytes, pipeline
bubbles. Each function names the test that checks it against a measurement
(the comm ledger, live tensor bytes, or the pipeline simulator); the few that
no measurement can reach (torch reports no traffic) have unit tests in
tests/test_formulas.py.

Notation: S bytes is the largest buffer of a collective (the all-reduced or
broadcast tensor, the reduce-scatter's input, the all-gather's output, the
all-to-all's whole send buffer), n the group size, m the pipeline segments
per chunk or message, Ψ the parameter count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

# -- collectives: bytes and messages per rank -----------------------------------------------
#
# What one rank puts on the wire (docs/collectives.md, "Algorithms and their
# costs"). The hand-written collectives count their real traffic while they
# run; tests/test_comm_ledger.py checks those counts against these functions
# at n = 3 and 4. comm=torch cannot count (the backend reports nothing), so
# its ledger records the same figures from here, nccl-tests' convention.


class Traffic(NamedTuple):
    """One rank's share of one collective."""

    sent: int  # bytes sent
    recv: int  # bytes received
    messages: int  # point-to-point messages sent


# Passes of (n-1)/n·S that a ring makes: all-reduce is a reduce-scatter then
# an all-gather. All-to-all moves the same (n-1)/n·S in one pass.
_RING_PASSES = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1, "all_to_all": 1}


def ring_factor(op: str, n: int) -> float:
    """Bytes one rank sends, and receives, per byte of S: all_reduce 2(n-1)/n;
    reduce_scatter, all_gather, all_to_all (n-1)/n.

    Ring reduce-scatter and all-gather take n-1 steps of one chunk S/n each;
    the ring all-reduce is the two back to back (Patarasuk & Yuan, "Bandwidth
    optimal all-reduce algorithms for clusters of workstations", JPDC 2009;
    Thakur, Rabenseifner & Gropp, "Optimization of collective communication
    operations in MPICH", IJHPCA 2005). The two-shot all-reduce moves the same
    bytes in two direct exchanges, and the pairwise all-to-all sends every
    block but its own, (n-1)/n·S for equal splits (Thakur et al. 2005).
    Checked by tests/test_comm_ledger.py (through ``ring_bytes``).
    """
    return _RING_PASSES[op] * (n - 1) / n


def ring_bytes(op: str, nbytes: int, n: int) -> int:
    """``ring_factor(op, n)`` times S = ``nbytes``, rounded down in integers:
    the bytes one rank sends (and receives) in ``op``. What comm=torch's
    ledger records per call; tests/test_comm_ledger.py checks the hand-written
    ring, two-shot and pairwise algorithms against it (S divisible by n)."""
    return nbytes * _RING_PASSES[op] * (n - 1) // n


def ring_traffic(op: str, nbytes: int, n: int, segments: int = 1) -> Traffic:
    """xtrain's ring reduce_scatter, all_gather or all_reduce (comm/ring.py):
    ``ring_bytes`` each way, in (n-1)·m messages per pass (2(n-1)·m for
    all-reduce). Checked by tests/test_comm_ledger.py."""
    b = ring_bytes(op, nbytes, n)
    return Traffic(b, b, _RING_PASSES[op] * (n - 1) * segments)


def two_shot_all_reduce_traffic(nbytes: int, n: int) -> Traffic:
    """Two-shot all-reduce (comm/direct.py): the ring's 2(n-1)/n·S each way in
    2(n-1) messages, one per peer per exchange, unsegmented. Checked by
    tests/test_comm_ledger.py."""
    b = ring_bytes("all_reduce", nbytes, n)
    return Traffic(b, b, 2 * (n - 1))


def all_to_all_bytes(piece_bytes: Sequence[int], me: int) -> int:
    """Bytes rank ``me`` sends (receives) in an all-to-all with these pieces per
    destination (source): every piece but its own, so (n-1)/n·S for equal
    splits. Checked by tests/test_comm_ledger.py (equal splits)."""
    return sum(piece_bytes) - piece_bytes[me]


def pairwise_all_to_all_traffic(nbytes: int, n: int) -> Traffic:
    """Pairwise-exchange all-to-all with equal splits (comm/direct.py; Thakur
    et al. 2005): (n-1)/n·S each way in n-1 messages. Checked by
    tests/test_comm_ledger.py."""
    b = ring_bytes("all_to_all", nbytes, n)
    return Traffic(b, b, n - 1)


def tree_rounds(n: int) -> int:
    """⌈log2 n⌉: the rounds of a binomial tree or a dissemination barrier.
    Unit-tested in tests/test_formulas.py."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def binomial_tree_children(v: int, n: int) -> int:
    """Children of relative rank v = (rank - root) mod n in a binomial tree:
    one per round i with 2^i below v's lowest set bit (every round for the
    root) and v + 2^i < n. The root has ⌈log2 n⌉ (Thakur et al. 2005).
    Checked by tests/test_comm_ledger.py (through the tree's traffic) and
    unit-tested in tests/test_formulas.py (one parent per rank)."""
    low = v & -v if v else 1 << tree_rounds(n)
    return sum(1 for i in range(tree_rounds(n)) if (1 << i) < low and v + (1 << i) < n)


def tree_broadcast_traffic(nbytes: int, n: int, v: int) -> Traffic:
    """Binomial-tree broadcast (comm/tree.py): relative rank v sends S to each
    of its children, one message each, and receives S unless it is the root.
    Checked by tests/test_comm_ledger.py."""
    kids = binomial_tree_children(v, n)
    return Traffic(kids * nbytes, 0 if v == 0 else nbytes, kids)


def tree_reduce_traffic(nbytes: int, n: int, v: int) -> Traffic:
    """Binomial-tree reduce, the broadcast backwards: S from each child, S (one
    message) to the parent unless the root. Checked by
    tests/test_comm_ledger.py."""
    kids = binomial_tree_children(v, n)
    return Traffic(0 if v == 0 else nbytes, kids * nbytes, 0 if v == 0 else 1)


def star_broadcast_traffic(nbytes: int, n: int, v: int) -> Traffic:
    """Star broadcast (comm/tree.py): the root sends S to each of the n-1
    others, (n-1)·S in n-1 messages. Checked by tests/test_comm_ledger.py."""
    return Traffic((n - 1) * nbytes, 0, n - 1) if v == 0 else Traffic(0, nbytes, 0)


def scatter_ring_broadcast_traffic(nbytes: int, n: int, v: int, segments: int = 1) -> Traffic:
    """Scatter + ring all-gather broadcast (comm/tree.py; van de Geijn; Barnett
    et al., InterCom, 1994), S divisible by n, m segments per chunk S/n: the
    root sends 2(n-1) chunks (n-1 scattered, n-1 to rank 1), the last rank
    none, the others n-1; everyone but the root receives S. Checked by
    tests/test_comm_ledger.py."""
    chunk = nbytes // n
    chunks = 2 * (n - 1) if v == 0 else 0 if v == n - 1 else n - 1
    return Traffic(chunks * chunk, 0 if v == 0 else nbytes, chunks * segments)


def chain_broadcast_traffic(nbytes: int, n: int, hops: int, segments: int = 1) -> Traffic:
    """Pipelined chain root -> root+1 -> ... -> root+n-1 (comm/tree.py; the
    figures comm=torch records for broadcast): the rank ``hops`` links down
    from the root sends S in m messages unless it is the last (hops = n-1)
    and receives S unless it is the root. Checked by
    tests/test_comm_ledger.py."""
    last = hops == n - 1
    return Traffic(0 if last else nbytes, 0 if hops == 0 else nbytes, 0 if last else segments)


def chain_reduce_traffic(nbytes: int, n: int, hops: int, segments: int = 1) -> Traffic:
    """A chain into the root (comm/tree.py; the figures comm=torch records for
    reduce): the rank ``hops`` links up the chain from the root sends S in m
    messages unless it is the root and receives S unless it starts the chain
    (hops = n-1). Checked by tests/test_comm_ledger.py."""
    return Traffic(0 if hops == 0 else nbytes, 0 if hops == n - 1 else nbytes, 0 if hops == 0 else segments)


def gather_traffic(piece_bytes: int, n: int, is_root: bool) -> Traffic:
    """Linear gather (comm/direct.py; comm=torch's figures): each non-root sends
    its piece S/n in one message; the root receives the n-1 others,
    (n-1)/n·S. Checked by tests/test_comm_ledger.py."""
    return Traffic(0, (n - 1) * piece_bytes, 0) if is_root else Traffic(piece_bytes, 0, 1)


def scatter_traffic(piece_bytes: int, n: int, is_root: bool) -> Traffic:
    """Linear scatter, the gather reversed: the root sends n-1 pieces in n-1
    messages. Checked by tests/test_comm_ledger.py."""
    return Traffic((n - 1) * piece_bytes, 0, n - 1) if is_root else Traffic(0, piece_bytes, 0)


def dissemination_barrier_traffic(n: int) -> Traffic:
    """Dissemination barrier (comm/direct.py; Hensgen, Finkel & Manber 1988):
    ⌈log2 n⌉ rounds of one 1-byte message each way. Checked by
    tests/test_comm_ledger.py."""
    r = tree_rounds(n)
    return Traffic(r, r, r)


def busbw_factor(op: str, n: int) -> float:
    """nccl-tests' bus-bandwidth factor, busbw = algbw · factor with algbw =
    S / time: all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all
    (n-1)/n; broadcast, reduce 1 (nccl-tests, doc/PERFORMANCE.md). It scales
    algbw to what each rank's link carries, so busbw compares with the link
    speed whatever n is: the ring's ``ring_factor``. A convention, not a
    measurement: unit-tested in tests/test_formulas.py."""
    return ring_factor(op, n) if op in _RING_PASSES else 1.0


# -- ZeRO: model-state memory and communication per rank --------------------------------------
#
# fp32 training with AdamW, the only copy of the weights fp32: 4 bytes per
# parameter, 4 per gradient, K = 8 of optimizer state (exp_avg, exp_avg_sq).
# docs/data-parallel.md, "Notation and the two contracts".

ZERO_STAGES = ("dp", "ddp", "zero1", "zero2", "zero3")
_SHARDED = {
    "dp": (),
    "ddp": (),
    "zero1": ("optim",),
    "zero2": ("grads", "optim"),
    "zero3": ("params", "grads", "optim"),
}
# Passes of (n-1)/n·Ψ per step: all-reduce (2), reduce-scatter + all-gather
# (2), or zero3's two all-gathers + reduce-scatter (3).
_ZERO_COMM_PASSES = {"dp": 2, "ddp": 2, "zero1": 2, "zero2": 2, "zero3": 3}


def zero_model_state_bytes(stage: str, psi: int, n: int) -> dict[str, float]:
    """Model-state bytes per rank by part for Ψ = ``psi`` parameters on n ranks:
    params 4Ψ, grads 4Ψ, optim 8Ψ, each divided by n from the stage that
    shards it (zero1 the optimizer state, zero2 also the gradients, zero3 also
    the parameters): the ZeRO paper's table (Rajbhandari et al., "ZeRO:
    Memory optimizations toward training trillion parameter models", SC 2020;
    its 2Ψ + 2Ψ + KΨ with K = 12 is mixed precision). Checked by
    tests/test_data_parallel.py against ``model_state_bytes`` from the live
    tensors."""
    full = {"params": 4 * psi, "grads": 4 * psi, "optim": 8 * psi}
    return {k: v / n if k in _SHARDED[stage] else v for k, v in full.items()}


def zero_comm_bytes(stage: str, psi: int, n: int, elem: int = 4) -> float:
    """Bytes one rank sends per step (one micro-batch) for Ψ parameters of
    ``elem`` bytes: dp, ddp all-reduce 2(n-1)/n·elemΨ; zero1, zero2
    reduce-scatter + all-gather, the same; zero3 all-gather in forward and in
    backward + reduce-scatter, 3(n-1)/n·elemΨ = 1.5x ddp (Rajbhandari et al.
    2020, section 7). Gradient clipping's one-number all-reduce is left out.
    Checked by tests/test_data_parallel.py against the ledger."""
    return _ZERO_COMM_PASSES[stage] * (n - 1) / n * elem * psi


def zero3_gathered_peak_bytes(resident_numel: int, unit_numel: int, prefetch: int, elem: int = 4) -> float:
    """zero3's gathered parameters alive at once on top of 16Ψ/n: the unit
    computing, ``prefetch`` units ahead, and what stays gathered throughout
    (the tied embedding/head through the forward). Checked by
    tests/test_sharded_checkpoint.py against ``gathered_peak``."""
    return elem * (resident_numel + (1 + prefetch) * unit_numel)


def fsdp2_padded_numel(shapes: Iterable[Sequence[int]], n: int) -> int:
    """Elements of these parameters once FSDP2 pads each one's dim 0 to a
    multiple of n (its even sharding over n ranks). Unit-tested in
    tests/test_formulas.py."""
    return sum(-(-s[0] // n) * n * (math.prod(s) // max(s[0], 1)) for s in shapes)


def fsdp2_comm_bytes(
    shapes: Sequence[Sequence[int]], root_shapes: Sequence[Sequence[int]], n: int, elem: int = 4
) -> dict[str, int]:
    """Bytes one rank sends per step under torch FSDP2 (``fully_shard`` on every
    block, then on the root), by collective, with the ring figures:
    all-gather of every (padded) parameter in forward, again in backward but
    for the root's own parameters (FSDP2 keeps the root unsharded from
    forward to backward), and reduce-scatter of every gradient, each
    (n-1)/n·elem·(padded Ψ) (ZeRO-3 of Rajbhandari et al. 2020). ``shapes``
    are every parameter's, ``root_shapes`` those of the parameters outside
    the blocks. torch reports no traffic, so nothing measures this:
    unit-tested in tests/test_formulas.py."""
    psi, psi_root = fsdp2_padded_numel(shapes, n), fsdp2_padded_numel(root_shapes, n)
    f = ring_factor("all_gather", n)
    return {
        "all_gather (forward)": int(f * elem * psi),
        "all_gather (backward)": int(f * elem * (psi - psi_root)),
        "reduce_scatter": int(f * elem * psi),
    }


# -- tensor parallel: bytes per step by region ---------------------------------------------------
#
# Megatron's tensor parallelism (Shoeybi et al., "Megatron-LM: Training
# multi-billion parameter language models using model parallelism", 2019,
# arXiv:1909.08053) with sequence parallelism (Korthikanti et al., "Reducing
# activation recomputation in large transformer models", 2022,
# arXiv:2205.05198). docs/tensor-parallel.md, "Measured: communication per step".

F32 = 4  # bytes per fp32 element


def tp_partial_numel(mcfg, tp: int, sp: bool) -> int:
    """Elements of the replicated parameters whose gradients are summed over tp
    once per step: the norms under sp ((2L+1)·D), the kv projections when kv
    heads are replicated (tp % n_kv_heads == 0 and n_kv_heads < tp:
    2·L·K·D_head·D). ``mcfg`` is a ModelConfig (n_layers, dim, n_heads,
    n_kv_heads). Checked by tests/test_tp_formulas.py, inside
    ``tp_comm_per_step``."""
    n = 0
    if sp:
        n += (2 * mcfg.n_layers + 1) * mcfg.dim
    if mcfg.n_kv_heads % tp:
        n += mcfg.n_layers * 2 * mcfg.n_kv_heads * (mcfg.dim // mcfg.n_heads) * mcfg.dim
    return n


def _tp_ring(op: str, numel: int, tp: int) -> float:
    return ring_factor(op, tp) * numel * F32


def tp_comm_per_step(mcfg, B: int, T: int, tp: int, sp: bool) -> dict:
    """Per-rank bytes sent on the tp group in one training step (forward and
    backward, one micro-batch of B local sequences of T tokens), by op and by
    region. E = B·T·D activation elements, fp32, ring figures.

    Without sp (all-reduces; Shoeybi et al. 2019's f and g): per layer,
    attention and MLP each all-reduce E in forward (row-parallel exit) and E
    in backward (column-parallel entry), 4·2(n-1)/n·4E bytes; the embedding
    all-reduces E in forward, the head's entry E in backward; the loss
    all-reduces B·T three times (max, target logit, sum of exp); the
    gradient norm is one scalar; the partial gradients one flat buffer
    (``tp_partial_numel``). With sp (Korthikanti et al. 2022) every
    activation all-reduce becomes an all-gather (T-gather) and a
    reduce-scatter of the same total volume: per layer 4 of each.

    Returns ``{"regions": {region: {op: (calls, bytes)}}, "total": {op:
    {"calls", "bytes_sent"}}}``, ``per_layer`` counted L times in the total.
    Checked by tests/test_tp_formulas.py against the ledger of real runs.
    """
    L, D = mcfg.n_layers, mcfg.dim
    E = B * T * D
    partial = tp_partial_numel(mcfg, tp, sp)
    regions = {}
    if not sp:
        regions["per_layer"] = {"all_reduce": (4, 4 * _tp_ring("all_reduce", E, tp))}
        regions["embedding"] = {"all_reduce": (1, _tp_ring("all_reduce", E, tp))}
        regions["head_entry"] = {"all_reduce": (1, _tp_ring("all_reduce", E, tp))}
    else:
        regions["per_layer"] = {op: (4, 4 * _tp_ring(op, E, tp)) for op in ("all_gather", "reduce_scatter")}
        # embedding: reduce-scatter forward, all-gather backward; head entry: the reverse
        regions["embedding"] = {op: (1, _tp_ring(op, E, tp)) for op in ("all_gather", "reduce_scatter")}
        regions["head_entry"] = {op: (1, _tp_ring(op, E, tp)) for op in ("all_gather", "reduce_scatter")}
    regions["loss"] = {"all_reduce": (3, 3 * _tp_ring("all_reduce", B * T, tp))}
    regions["grad_norm"] = {"all_reduce": (1, _tp_ring("all_reduce", 1, tp))}
    if partial:
        regions["partial_grads"] = {"all_reduce": (1, _tp_ring("all_reduce", partial, tp))}
    total: dict[str, list] = {}
    for name, ops in regions.items():
        mult = L if name == "per_layer" else 1
        for op, (calls, nbytes) in ops.items():
            t = total.setdefault(op, [0, 0.0])
            t[0] += calls * mult
            t[1] += nbytes * mult
    return {"regions": regions, "total": {op: {"calls": c, "bytes_sent": b} for op, (c, b) in total.items()}}


# -- pipeline bubbles ----------------------------------------------------------------------


def pipeline_bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Idle fraction of each rank's step time, with equal per-micro-batch costs
    and free communication.

    GPipe (Huang et al., 2019, arXiv:1811.06965) and 1F1B (PipeDream-Flush,
    Narayanan et al., 2021, arXiv:2006.09503): every rank waits (p-1)(F+B)
    while the pipeline fills and drains, out of (m+p-1)(F+B), so
    (p-1)/(m+p-1). Interleaved 1F1B with v chunks per rank (Narayanan et al.,
    2021, arXiv:2104.04473) shrinks the fill to (p-1)(F+B)/v against m(F+B)
    of work: (p-1)/(v·m+p-1).
    """
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    raise ValueError(f"no closed-form bubble for schedule {schedule!r}")


def pipeline_bubble_time(schedule: str, p: int, F: float, B: float, W: float = 0, FB: float | None = None) -> float:
    """Idle time per rank in one step (makespan minus the rank's compute), with
    free communication and the same costs on every stage, for ``m`` large
    enough (m >= p; m >= 2p for the DualPipes): the table of the DualPipe
    README (deepseek-ai/DualPipe; DeepSeek-V3 report, arXiv:2412.19437,
    Table 2).

    Notation, the README's: ``F`` a forward, ``B`` the *full* backward (input
    and weight gradients, xtrain's B), ``W`` its weight-gradient part (xtrain's
    W), so the input-gradient part (xtrain's I, the zero-bubble paper's
    "B") costs ``B - W``; ``FB`` an OVERLAP of a forward with a full backward
    (F&B; default F + B, no overlap gain). Costs are per action, i.e. per
    stage: for interleaved_1f1b and dualpipev those of one chunk.

    - gpipe, 1f1b, interleaved_1f1b (in chunk costs): (p-1)(F+B).
    - zb1p, ZB-H1 (Qi et al., arXiv:2401.10241): (p-1)(F+B-2W), the paper's
      (p-1)(T_F+T_B-T_W) with T_B = B - W. That needs W <= min(F, B-W) (a
      weight gradient fits the gap it fills); beyond it the value returned is
      the simulated (p-1)·max(F+B-2W, F, B-W).
    - dualpipe: (p/2-1)(FB+B-3W); dualpipev with p ranks (2p stages, the
      README's PP): (p-1)(FB+B-3W). Exact for F = B-W (forward as long as
      the input gradient, the README figure's and the paper's unit case) and
      W <= F: on every rank when FB = F + B; for max(F, B) <= FB < F + B
      the idle of the middle ranks, the outer ones idling less. Outside that
      domain it is the README's approximation (tests/test_pipeline_schedules_zb.py
      has the simulated values).
    """
    if schedule in ("gpipe", "1f1b", "interleaved_1f1b"):
        return (p - 1) * (F + B)
    if schedule == "zb1p":
        return (p - 1) * max(F + B - 2 * W, F, B - W)
    overlap = F + B if FB is None else FB
    if schedule == "dualpipe":
        return (p // 2 - 1) * (overlap + B - 3 * W)
    if schedule == "dualpipev":
        return (p - 1) * (overlap + B - 3 * W)
    raise ValueError(f"no closed-form bubble time for schedule {schedule!r}")


# -- context parallel: bytes per attention layer ------------------------------------------------


def cp_attention_bytes(variant: str, cp: int, B: int, H: int, K: int, Tl: int, E: int, elem: int) -> dict[str, int]:
    """Bytes one rank sends for one attention layer under context parallelism,
    ``forward`` and ``backward``, for a local sequence of Tl = T/cp columns with
    H query and K kv heads of width E, activations of ``elem`` bytes; kv =
    2·B·K·Tl·E elements (this rank's k and v; only the K kv heads travel):

    - ring: forward (cp-1)·kv·elem (k and v pass cp-1 neighbours); backward
      the same again plus cp·kv·4 (the fp32 dK/dV accumulators travel cp hops,
      home included);
    - allgather: an all-gather of kv, (cp-1)·kv·elem; backward a
      reduce-scatter of the fp32 gradients, (cp-1)·kv·4;
    - ulysses: all-to-alls of q, k, v and the output, (cp-1)/cp of each,
      (cp-1)/cp·B·Tl·E·(2H+2K)·elem; backward the same (their gradients).

    Checked against the ledger by tests/test_context_attention.py."""
    kv = 2 * B * K * Tl * E
    if variant == "ring":
        return {"forward": (cp - 1) * kv * elem, "backward": (cp - 1) * kv * elem + cp * kv * 4}
    if variant == "allgather":
        return {"forward": ring_bytes("all_gather", cp * kv * elem, cp), "backward": ring_bytes("reduce_scatter", cp * kv * 4, cp)}
    if variant == "ulysses":
        moved = sum(ring_bytes("all_to_all", B * h * Tl * E * elem, cp) for h in (H, K, K, H))
        return {"forward": moved, "backward": moved}
    raise ValueError(f"no byte formula for cp variant {variant!r}")


# -- expert parallel: bytes per MoE layer -------------------------------------------------------


def ep_dispatch_bytes(dispatcher: str, me: int, ep: int, D: int, elem: int, n_experts: int, *,
                      rows_to=None, rows_from=None, N: int = 0, top_k: int = 0) -> dict[str, int]:
    """Bytes rank ``me`` sends on the ep group in one MoE layer's ``forward`` and
    ``backward`` (xtrain/parallel/expert.py), activations of ``elem`` bytes:

    - ``alltoall`` (``rows_to[r]``: assignments this rank sends rank r's experts,
      ``rows_from[r]``: what rank r sends this rank's): forward the count
      exchange ((ep-1)·E/ep int64), the tokens out (Σ_{r≠me} rows_to[r]·D·elem)
      and the outputs back (Σ_{r≠me} rows_from[r]·D·elem); backward the same two
      token exchanges reversed (their gradients), no counts. Without
      ``rows_to``/``rows_from``: uniform routing, top_k·N/ep assignments to and
      from each rank, so each token exchange is top_k·N·D·elem·(ep-1)/ep;
    - ``allgather`` (N tokens per rank): forward all-gathers of x ((ep-1)·N·D·elem),
      the fp32 gates and the int64 expert indices ((ep-1)·N·top_k·(4 + 8)), and a
      reduce-scatter of the fp32 outputs ((ep-1)·N·D·4); backward an all-gather of
      the outputs' fp32 gradient ((ep-1)·N·D·4) and reduce-scatters of the
      gradients of x ((ep-1)·N·D·elem) and of the gates ((ep-1)·N·top_k·4).

    Ring figures (``ring_bytes``) for the all-gathers and reduce-scatters.
    Checked against the ledger by tests/test_ep_formulas.py."""
    if dispatcher == "alltoall":
        if rows_to is None:
            rows_to = rows_from = [top_k * N / ep] * ep
        out = all_to_all_bytes([r * D * elem for r in rows_to], me)
        back = all_to_all_bytes([r * D * elem for r in rows_from], me)
        counts = all_to_all_bytes([n_experts // ep * 8] * ep, me)
        return {"forward": counts + out + back, "backward": out + back}
    if dispatcher == "allgather":
        def ag(b):
            return ring_bytes("all_gather", ep * b, ep)

        def rs(b):
            return ring_bytes("reduce_scatter", ep * b, ep)

        fwd = ag(N * D * elem) + ag(N * top_k * 4) + ag(N * top_k * 8) + rs(N * D * 4)
        bwd = ag(N * D * 4) + rs(N * D * elem) + rs(N * top_k * 4)
        return {"forward": fwd, "backward": bwd}
    raise ValueError(f"no byte formula for ep dispatcher {dispatcher!r}")

