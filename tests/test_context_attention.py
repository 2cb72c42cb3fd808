"""Context-parallel attention against full-sequence attention on one process.

On cp = 2, 3 and 4 gloo ranks, every rank builds the same full q, k, v (GQA:
n_kv_heads = n_heads / 2, batch 2), runs torch's SDPA over the whole
sequence as the reference, and compares its own columns of the output, the
log-sum-exp, dQ, dK and dV (1e-5, fp32) for every variant, layout and kernel.
Also: bytes per layer against ``xtrain.formulas.cp_attention_bytes``; a model
whose inner attention is swapped reproduces the full model's logits and
gradients (RoPE at the rank's positions); bf16 stays within a tested
tolerance of fp32; and the layouts' block plans (zigzag balances the causal
work, contiguous does not).
"""

import pytest
import torch
import torch.nn.functional as F

from xtrain.comm import get_comm
from xtrain.formulas import cp_attention_bytes, ring_bytes
from xtrain.mesh import Mesh
from xtrain.model import ModelConfig, build_model
from xtrain.parallel.context import (
    ContextParallelAttention,
    CPGroup,
    SequenceLayout,
    context_attention,
    ring_table,
)
from xtrain.spawn import run_on_ranks

CASES = [(v, layout, kernel) for v in ("ring", "allgather", "ulysses") for layout in ("zigzag", "contiguous") for kernel in ("auto", "math")]


def _reference(q, k, v):
    """Full causal attention, its lse, and the gradients of sum(out * w)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    T = q.shape[2]
    s = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), -1)
    return out, lse.detach(), q, k, v


def _ledger_bytes(comm) -> int:
    return sum(e["bytes_sent"] for key, e in comm.ledger.take_step().items() if key.endswith("@cp"))


def _op_cases(rank, world):
    mesh = Mesh.build(world, rank, cp=world)
    comm = get_comm("xtrain")
    prev, nxt = mesh.neighbours("cp")
    B, H, K, E = 2, 2 * world, world, 8  # H and K divisible by cp: Ulysses runs too
    T = 2 * world * 3
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, H, T, E, generator=g), torch.randn(B, K, T, E, generator=g), torch.randn(B, K, T, E, generator=g)
    w = torch.randn(B, H, T, E, generator=g)
    out_ref, lse_ref, qr, kr, vr = _reference(q, k, v)
    (out_ref * w).sum().backward()
    worst = {}
    for variant, kind, kernel in CASES:
        layout = SequenceLayout(kind, world)
        cp = CPGroup(comm, mesh.group("cp"), mesh.coord("cp"), world, prev, nxt, layout, kernel)
        cols = layout.columns(cp.rank, T)
        ql, kl, vl = (t[:, :, cols].clone().requires_grad_() for t in (q, k, v))
        comm.ledger.take_step()
        out, lse = context_attention(ql, kl, vl, cp, variant, return_lse=True)
        fwd_bytes = _ledger_bytes(comm)
        (out * w[:, :, cols]).sum().backward()
        bwd_bytes = _ledger_bytes(comm)
        expect = cp_attention_bytes(variant, world, B, H, K, T // world, E, 4)
        if variant == "ulysses":  # return_lse: the test's lse travels back too (fp32, one value per row)
            expect["forward"] += ring_bytes("all_to_all", B * H * (T // world) * 4, world)
        errors = {
            "out": (out - out_ref[:, :, cols]).abs().max().item(),
            "lse": (lse - lse_ref[:, :, cols]).abs().max().item(),
            "dq": (ql.grad - qr.grad[:, :, cols]).abs().max().item(),
            "dk": (kl.grad - kr.grad[:, :, cols]).abs().max().item(),
            "dv": (vl.grad - vr.grad[:, :, cols]).abs().max().item(),
        }
        worst[(variant, kind, kernel)] = (errors, (fwd_bytes, bwd_bytes), (expect["forward"], expect["backward"]))
    return worst


def _model_case(rank, world, variant, kind):
    """A tiny model with its inner attention swapped: this rank's logits and the
    cp-summed gradients equal the full model's (RoPE at the rank's positions)."""
    mesh = Mesh.build(world, rank, cp=world)
    comm = get_comm("xtrain")
    prev, nxt = mesh.neighbours("cp")
    cfg = ModelConfig(n_heads=2 * world, n_kv_heads=world, dim=16 * world)
    T = 4 * world
    x = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    full = build_model(cfg, 0)
    logits = full(x)
    logits.square().mean().backward()
    model = build_model(cfg, 0)
    layout = SequenceLayout(kind, world)
    cp = CPGroup(comm, mesh.group("cp"), mesh.coord("cp"), world, prev, nxt, layout)
    for block in model.blocks:
        block.attn.inner_attention = ContextParallelAttention(cp, variant)
    cols = layout.columns(cp.rank, T)
    local = model(x[:, cols], positions=cols)
    # each rank's share of the full loss: the mean over all columns is the sum of the shares
    (local.square().sum() / logits.numel()).backward()
    worst_grad = 0.0
    for (n, p), (_, p_ref) in zip(model.named_parameters(), full.named_parameters()):
        gsum = p.grad.clone()
        comm.all_reduce(gsum, group=mesh.group("cp"))
        worst_grad = max(worst_grad, (gsum - p_ref.grad).abs().max().item())
    return (local - logits[:, cols]).abs().max().item(), worst_grad


def _bf16_case(rank, world):
    """Ring attention in bf16 against the fp32 reference, beside torch's own bf16 SDPA."""
    mesh = Mesh.build(world, rank, cp=world)
    comm = get_comm("xtrain")
    prev, nxt = mesh.neighbours("cp")
    B, H, K, T, E = 2, 4, 2, 64, 16
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(B, H, T, E, generator=g), torch.randn(B, K, T, E, generator=g), torch.randn(B, K, T, E, generator=g)
    ref, _, _, _, _ = _reference(q, k, v)
    plain_bf16 = _reference(q.bfloat16(), k.bfloat16(), v.bfloat16())[0].float()
    layout = SequenceLayout("zigzag", world)
    cp = CPGroup(comm, mesh.group("cp"), mesh.coord("cp"), world, prev, nxt, layout)
    cols = layout.columns(cp.rank, T)
    ql, kl, vl = (t[:, :, cols].bfloat16().requires_grad_() for t in (q, k, v))
    out = context_attention(ql, kl, vl, cp, "ring")
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and ql.grad.dtype == torch.bfloat16
    return (out.float() - ref[:, :, cols]).abs().max().item(), (plain_bf16 - ref).abs().max().item()


def _all_cases(rank, world):
    res = {"op": _op_cases(rank, world)}
    res["model"] = {(v, kind): _model_case(rank, world, v, kind) for v in ("ring", "allgather", "ulysses") for kind in ("zigzag", "contiguous")}
    if world == 2:
        res["bf16"] = _bf16_case(rank, world)
    return res


@pytest.mark.parametrize("world", [2, 3, 4])
def test_context_attention_matches_full_attention(world):
    per_rank = run_on_ranks(_all_cases, world, timeout=240, pg_timeout=60)
    for rank, res in enumerate(per_rank):
        for case, (errors, measured, formula) in res["op"].items():
            for name, err in errors.items():
                assert err <= 1e-5, f"cp={world} rank {rank} {case}: {name} differs by {err:.3g}"
            assert measured == formula, f"cp={world} rank {rank} {case}: ledger bytes {measured} vs formula {formula}"
        for case, (logit_err, grad_err) in res["model"].items():
            assert logit_err <= 1e-5 and grad_err <= 1e-5, f"cp={world} rank {rank} model {case}: {logit_err:.3g} {grad_err:.3g}"
        if "bf16" in res:
            cp_err, plain_err = res["bf16"]
            # the fp32 merge keeps bf16 ring attention as close to fp32 as bf16 SDPA itself is
            assert cp_err <= 2 * plain_err + 1e-3, (cp_err, plain_err)
            assert cp_err <= 3e-2, cp_err


def test_zigzag_balances_causal_work_and_skips_masked_blocks():
    for cp in (2, 3, 4, 8):
        zig, contiguous = SequenceLayout("zigzag", cp), SequenceLayout("contiguous", cp)
        total = (2 * cp) ** 2 / 2  # causal pairs of the whole sequence, in zigzag chunk² units
        assert sum(zig.work(r) for r in range(cp)) == total
        assert {zig.work(r) for r in range(cp)} == {total / cp}  # every rank the same
        work = [contiguous.work(r) for r in range(cp)]
        assert work == [r + 0.5 for r in range(cp)]  # rank r: r full blocks and its diagonal
        # columns tile the sequence exactly once
        cols = torch.cat([zig.columns(r, 8 * cp) for r in range(cp)])
        assert sorted(cols.tolist()) == list(range(8 * cp))
    table = ring_table(SequenceLayout("zigzag", 4))
    assert table[0] == ["kv0:causal", "kv3:0.5", "kv2:0.5", "kv1:0.5"]
    assert ring_table(SequenceLayout("contiguous", 2)) == [["kv0:causal", "kv1:skip"], ["kv1:causal", "kv0:full"]]


def test_math_kernel_never_holds_a_whole_sequence_score_matrix(monkeypatch):
    """Ulysses' local attention on the math path runs in tiles: no T x T scores."""
    from xtrain.parallel.context import kernels

    shapes = []
    scores = kernels._scores
    monkeypatch.setattr(kernels, "_scores", lambda q, k, causal, scale: shapes.append(q.shape[2] * k.shape[2]) or scores(q, k, causal, scale))
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 32, 8, generator=g), torch.randn(2, 2, 32, 8, generator=g), torch.randn(2, 2, 32, 8, generator=g)
    out, lse = kernels.attend_causal_tiled(q, k, v, 4, 8**-0.5, kernel="math")
    ref, ref_lse, *_ = _reference(q, k, v)
    dout = torch.randn_like(out)
    dq, dk, dv = kernels.attend_causal_tiled_backward(dout, q, k, v, out, lse, 4, 8**-0.5, kernel="math")
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    rep = F.scaled_dot_product_attention(qr, kr.repeat_interleave(2, 1), vr.repeat_interleave(2, 1), is_causal=True)
    rep.backward(dout)
    assert max(shapes) == 8 * 8  # (T/4)^2, never 32 x 32
    for a, b in ((out, ref), (lse, ref_lse), (dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert (a - b).abs().max() <= 1e-5
