"""Tensor-parallel building blocks against their single-process originals.

Each parallel layer (column, row, vocab embedding), the vocab-parallel cross
entropy and the whole transformed model are compared with nn.Linear,
nn.Embedding, F.cross_entropy and the plain Transformer on the same weights:
forward outputs, input gradients and (gathered) parameter gradients, with and
without sequence parallel, over both comm implementations. One spawn per tp
size runs every case; the ranks return (label, max abs difference) pairs and
the test asserts on them here, so a failure names its case.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xtrain.model import ModelConfig, build_model
from xtrain.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPShard,
    VocabParallelEmbedding,
    apply_tensor_parallel,
    check_tensor_parallel,
    full_tp_parameters,
    gather_tp_tensor,
    is_tp_partial,
    load_full_tp_parameters,
    reduce_tp_partial_grads,
    shard_full_tensor,
    tp_grads_for_norm,
    tp_shard_spec,
    vocab_parallel_cross_entropy,
)
from xtrain.spawn import run_on_ranks

TOL = 1e-5
B, T = 2, 8


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _linear(n_in, n_out, bias, seed):
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_randn(n_out, n_in, seed=seed))
        if bias:
            lin.bias.copy_(_randn(n_out, seed=seed + 1))
    return lin


def _diff(a, b) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.detach().float() - b.detach().float()).abs().max().item()


def _chunk(t, dim, tp, rank):
    return t.narrow(dim, rank * (t.shape[dim] // tp), t.shape[dim] // tp)


# -- layer cases ------------------------------------------------------------------------


def _column_cases(comm, group, tp, rank, tag):
    out = []
    for bias in (False, True):
        for gather_output in (False, True):
            for sp in (False, True):
                label = f"{tag} column bias={bias} gather={gather_output} sp={sp}"
                lin = _linear(12, 16, bias, seed=1)
                x, gy = _randn(B, T, 12, seed=3), _randn(B, T, 16, seed=4)
                xr = x.clone().requires_grad_()
                y = lin(xr)
                (y * gy).sum().backward()

                par = ColumnParallelLinear(copy.deepcopy(lin), comm, group, gather_output=gather_output, sequence_parallel=sp)
                xin = (_chunk(x, 1, tp, rank) if sp else x).clone().requires_grad_()
                yp = par(xin)
                want_y = y if gather_output else _chunk(y, -1, tp, rank)
                (yp * (gy if gather_output else _chunk(gy, -1, tp, rank))).sum().backward()
                out.append((f"{label} y", _diff(yp, want_y)))
                out.append((f"{label} dx", _diff(xin.grad, _chunk(xr.grad, 1, tp, rank) if sp else xr.grad)))
                out.append((f"{label} dW", _diff(par.weight.grad, _chunk(lin.weight.grad, 0, tp, rank))))
                if bias:
                    out.append((f"{label} db", _diff(par.bias.grad, _chunk(lin.bias.grad, 0, tp, rank))))
    return out


def _row_cases(comm, group, tp, rank, tag):
    out = []
    for bias in (False, True):
        for input_is_parallel in (True, False):
            for sp in (False, True):
                label = f"{tag} row bias={bias} input_parallel={input_is_parallel} sp={sp}"
                lin = _linear(16, 12, bias, seed=5)
                x, gy = _randn(B, T, 16, seed=6), _randn(B, T, 12, seed=7)
                xr = x.clone().requires_grad_()
                y = lin(xr)
                (y * gy).sum().backward()

                par = RowParallelLinear(copy.deepcopy(lin), comm, group, input_is_parallel=input_is_parallel, sequence_parallel=sp)
                xin = (_chunk(x, -1, tp, rank) if input_is_parallel else x).clone().requires_grad_()
                yp = par(xin)
                seq = (lambda t: _chunk(t, 1, tp, rank)) if sp else (lambda t: t)
                (yp * seq(gy)).sum().backward()
                reduce_tp_partial_grads(par, comm, group)  # the bias under sp
                out.append((f"{label} y", _diff(yp, seq(y))))
                out.append((f"{label} dx", _diff(xin.grad, _chunk(xr.grad, -1, tp, rank) if input_is_parallel else xr.grad)))
                out.append((f"{label} dW", _diff(par.weight.grad, _chunk(lin.weight.grad, 1, tp, rank))))
                if bias:
                    assert is_tp_partial(par.bias) == sp
                    out.append((f"{label} db", _diff(par.bias.grad, lin.bias.grad)))
    return out


def _embedding_cases(comm, group, tp, rank, tag):
    out = []
    for vocab in (24, 10):  # 10 is padded to 12 at tp=4
        for sp in (False, True):
            label = f"{tag} embedding V={vocab} sp={sp}"
            emb = nn.Embedding(vocab, 6)
            with torch.no_grad():
                emb.weight.copy_(_randn(vocab, 6, seed=8))
            ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(9))
            gy = _randn(B, T, 6, seed=10)
            y = emb(ids)
            (y * gy).sum().backward()

            par = VocabParallelEmbedding(copy.deepcopy(emb), comm, group, sequence_parallel=sp)
            yp = par(ids)
            seq = (lambda t: _chunk(t, 1, tp, rank)) if sp else (lambda t: t)
            (yp * seq(gy)).sum().backward()
            out.append((f"{label} y", _diff(yp, seq(y))))
            out.append((f"{label} dW", _diff(par.weight.grad, shard_full_tensor(emb.weight.grad, par.weight))))
            out.append((f"{label} W gathered", _diff(gather_tp_tensor(par.weight, tp_shard_spec(par.weight), comm, group), emb.weight)))
    return out


def _cross_entropy_cases(comm, group, tp, rank, tag):
    out = []
    for vocab in (24, 10, 7):  # 10 and 7 are padded at tp=4 (7 at tp=2 too)
        label = f"{tag} cross entropy V={vocab}"
        logits = _randn(B, T, vocab, seed=11) * 3
        targets = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(12))
        targets[0, :2] = -100  # ignored, as in F.cross_entropy
        lr = logits.clone().requires_grad_()
        ref = F.cross_entropy(lr.flatten(0, 1), targets.flatten())
        ref.backward()

        spec = TPShard(2, tp, rank, vocab)
        local = shard_full_tensor(logits, spec).requires_grad_()
        loss = vocab_parallel_cross_entropy(local, targets, comm, group, vocab_size=vocab)
        (loss * 0.5).backward()
        out.append((f"{label} loss", _diff(loss, ref)))
        out.append((f"{label} grad", _diff(local.grad, shard_full_tensor(lr.grad * 0.5, spec))))
    return out


# -- whole-model cases ---------------------------------------------------------------------


MODEL_CFGS = {
    # 2 kv heads: sharded at tp=2, replicated at tp=4; vocab 250 padded at tp=4
    "gqa2-tied-v250": ModelConfig(vocab_size=250, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=176, max_seq_len=32),
    # one kv head: replicated on every rank; untied head
    "mqa-untied": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden=176,
                              max_seq_len=32, tie_embeddings=False),
}


def _model_cases(mesh, comm, tag):
    out = []
    group, tp, rank = mesh.group("tp"), mesh.degrees["tp"], mesh.coord("tp")
    for name, cfg in MODEL_CFGS.items():
        for sp in (False, True):
            label = f"{tag} model {name} sp={sp}"
            tokens = torch.randint(0, cfg.vocab_size, (B, 16), generator=torch.Generator().manual_seed(13))
            targets = torch.randint(0, cfg.vocab_size, (B, 16), generator=torch.Generator().manual_seed(14))
            ref = build_model(cfg, seed=0)
            ref_logits = ref(tokens)
            ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten())
            ref_loss.backward()
            ref_grads = {n: p.grad for n, p in ref.named_parameters()}

            model = apply_tensor_parallel(build_model(cfg, seed=0), mesh, comm, sequence_parallel=sp)
            assert [n for n, _ in model.named_parameters()] == list(ref_grads), "parameter names changed"
            if cfg.tie_embeddings:
                assert model.head.weight is model.embed.weight
            logits = model(tokens)
            loss = model.tp_context.loss(logits, targets)
            loss.backward()
            reduce_tp_partial_grads(model, comm, group)

            full_logits = gather_tp_tensor(logits, TPShard(2, tp, rank, cfg.vocab_size), comm, group)
            out.append((f"{label} logits", _diff(full_logits, ref_logits)))
            out.append((f"{label} loss", _diff(loss, ref_loss)))
            for n, p in model.named_parameters():
                full_grad = gather_tp_tensor(p.grad, tp_shard_spec(p), comm, group)
                out.append((f"{label} grad {n}", _diff(full_grad, ref_grads[n])))
                spec = tp_shard_spec(p)
                n_pad = 0 if spec is None else min(spec.chunk, max(0, spec.start + spec.chunk - spec.full_size))
                if n_pad:  # padded vocabulary rows take no gradient, so they stay zero
                    out.append((f"{label} {n} padding grad", p.grad.narrow(spec.dim, spec.chunk - n_pad, n_pad).abs().max().item()))

            # the grad norm counts every element once across tp
            norm_sq = torch.stack([g.pow(2).sum() for g in tp_grads_for_norm(model, rank)]).sum()
            comm.all_reduce(norm_sq, group=group)
            ref_norm_sq = torch.stack([g.pow(2).sum() for g in ref_grads.values()]).sum()
            out.append((f"{label} grad norm^2", abs(norm_sq.item() - ref_norm_sq.item()) / ref_norm_sq.item()))

            # checkpoints: gather to full tensors by name, load them back into shards
            full = full_tp_parameters(model, comm, group)
            ref_params = dict(ref.named_parameters())
            out.append((f"{label} full params", max(_diff(full[n], ref_params[n]) for n in full)))
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            load_full_tp_parameters(model, full)
            out.append((f"{label} reload", max(_diff(p, before[n]) for n, p in model.named_parameters())))
    return out


def _all_cases(rank, world, extra_tp2_mesh):
    from xtrain.comm import get_comm
    from xtrain.mesh import Mesh

    torch.manual_seed(0)
    mesh = Mesh.build(world, rank, tp=world)
    group, tp = mesh.group("tp"), world
    out = []
    for comm_name in ("xtrain", "torch"):
        comm = get_comm(comm_name)
        tag = f"tp={tp} comm={comm_name}"
        out += _column_cases(comm, group, tp, rank, tag)
        out += _row_cases(comm, group, tp, rank, tag)
        out += _embedding_cases(comm, group, tp, rank, tag)
        out += _cross_entropy_cases(comm, group, tp, rank, tag)
        out += _model_cases(mesh, comm, tag)

    # a config tensor parallelism cannot split raises before any collective
    bad = ModelConfig(vocab_size=64, dim=48, n_heads=6, n_kv_heads=3, ffn_hidden=96 + tp - 1)
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        apply_tensor_parallel(build_model(bad, seed=0), mesh, get_comm("torch"))

    if extra_tp2_mesh:  # tp on a subgroup (dp=2 x tp=2), not the world
        sub = Mesh.build(world, rank, tp=2)
        out += _model_cases(sub, get_comm("xtrain"), "dp=2 tp=2 comm=xtrain")
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_single_process(tp):
    per_rank = run_on_ranks(_all_cases, tp, tp == 4, timeout=240, pg_timeout=60)
    failures = [f"rank {r}: {label}: {d:.3g}" for r, cases in enumerate(per_rank) for label, d in cases if not d <= TOL]
    assert not failures, "\n".join(failures[:40])
    assert len(per_rank[0]) > 100


def test_check_tensor_parallel_names_every_problem():
    good = ModelConfig(vocab_size=250, dim=64, n_heads=4, n_kv_heads=2, ffn_hidden=176)
    assert check_tensor_parallel(good, 2, True, seq_len=32) == []
    assert check_tensor_parallel(good, 4, True, seq_len=32) == []  # kv heads replicated, vocab padded
    problems = check_tensor_parallel(good, 8, True, seq_len=36)
    text = "\n".join(problems)
    assert "n_heads=4" in text and "seq_len=36" in text
    assert "ffn_hidden" not in text  # 176 = 8 * 22
    problems = check_tensor_parallel(ModelConfig(dim=48, n_heads=6, n_kv_heads=3, ffn_hidden=99), 2)
    text = "\n".join(problems)
    assert "n_kv_heads=3" in text and "ffn_hidden=99" in text
    assert check_tensor_parallel(good, 3, False) and check_tensor_parallel(good, 0)


def test_shard_and_gather_layout_round_trips_without_collectives():
    full = torch.arange(10 * 3.0).view(10, 3)
    shards = [shard_full_tensor(full, TPShard(0, 4, r, 10)) for r in range(4)]
    assert all(s.shape == (3, 3) for s in shards)
    assert torch.equal(torch.cat(shards)[:10], full) and torch.count_nonzero(shards[-1][1:]) == 0
    cols = [shard_full_tensor(full.T, TPShard(1, 2, r, 10)) for r in range(2)]
    assert torch.equal(torch.cat(cols, dim=1), full.T)


def test_tp1_transform_is_the_plain_model():
    """At tp=1 (the SOLO group, no process group) every collective is the identity."""
    from xtrain.comm import get_comm
    from xtrain.mesh import single_process_mesh

    cfg = MODEL_CFGS["gqa2-tied-v250"]
    tokens = torch.randint(0, cfg.vocab_size, (B, 16), generator=torch.Generator().manual_seed(13))
    ref = build_model(cfg, seed=0)
    ref_loss = F.cross_entropy(ref(tokens).flatten(0, 1), tokens.flatten())
    ref_loss.backward()
    for sp in (False, True):
        model = apply_tensor_parallel(build_model(cfg, seed=0), single_process_mesh(), get_comm("xtrain"), sp)
        loss = model.tp_context.loss(model(tokens), tokens)
        loss.backward()
        assert _diff(loss, ref_loss) <= TOL
        for (n, p), r in zip(model.named_parameters(), ref.parameters()):
            assert _diff(p.grad, r.grad) <= TOL, n
        with pytest.raises(ValueError, match="already"):
            apply_tensor_parallel(model, single_process_mesh(), get_comm("xtrain"))
