"""The plain mixture-of-experts model (xtrain/model/moe.py), single process, CPU."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from xtrain.config import check_config, compose
from xtrain.model import ModelConfig, Transformer, build_model
from xtrain.model.moe import (
    MoE,
    Router,
    aux_loss,
    capacity_keep,
    merge_stats,
    router_losses,
    update_router_bias,
    z_loss,
)


def moe_cfg(**kw):
    base = {"dim": 16, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 24, "n_experts": 4, "top_k": 2,
            "moe_ffn_hidden": 8, "max_seq_len": 64}
    return ModelConfig(**{**base, **kw})


def make_moe(cfg, seed=0):
    torch.manual_seed(seed)
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3, generator=g)
    return moe


def swiglu(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def naive_moe(moe, x_ND, keep=None):
    """For each token, sum over its k chosen experts of gate * expert(x), one token at a time."""
    cfg, W = moe.cfg, moe.router.weight
    logits = x_ND @ W.T
    if cfg.router == "softmax":
        probs, sel = logits.softmax(-1), logits
    else:
        probs = torch.sigmoid(logits)
        sel = probs + moe.router.expert_bias
    ex = moe.experts
    rows = []
    for n in range(x_ND.shape[0]):
        chosen = sorted(range(cfg.n_experts), key=lambda e: (-sel[n, e].item(), e))[: cfg.top_k]
        p = probs[n, chosen]
        g = p / p.sum() if cfg.top_k > 1 else p
        y = torch.zeros(cfg.dim)
        for j, e in enumerate(chosen):
            if keep is None or keep[n, j]:
                y = y + g[j] * swiglu(x_ND[n], ex.gate[e], ex.up[e], ex.down[e])
        if moe.shared is not None:
            y = y + moe.shared(x_ND[n])
        rows.append(y)
    return torch.stack(rows)


def starved_input(cfg, B=2, T=8, seed=1):
    """Inputs whose feature 0 is large and positive: with router row 3 = -10 e_0, expert 3 gets no token."""
    x = torch.randn(B, T, cfg.dim, generator=torch.Generator().manual_seed(seed))
    x[..., 0] = 3.0 + x[..., 0].abs()
    return x


@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias"])
@pytest.mark.parametrize("n_shared", [0, 1])
@pytest.mark.parametrize("top_k", [1, 2])
def test_local_dispatch_equals_naive_per_token_loop(top_k, n_shared, router):
    cfg = moe_cfg(top_k=top_k, n_shared_experts=n_shared, router=router)
    moe = make_moe(cfg)
    with torch.no_grad():
        moe.router.weight[3] = 0.0
        moe.router.weight[3, 0] = -10.0
        if router == "sigmoid_bias":
            moe.router.expert_bias.copy_(torch.tensor([0.05, -0.02, 0.01, 0.0]))
    x = starved_input(cfg).requires_grad_()
    w = torch.randn(2, 8, cfg.dim, generator=torch.Generator().manual_seed(2))

    y = moe(x)
    assert moe.last_stats.counts[3] == 0 and moe.last_stats.counts.sum() == 16 * top_k
    grads = torch.autograd.grad((y * w).sum(), [x, *moe.parameters()])
    y_ref = naive_moe(moe, x.view(-1, cfg.dim)).view_as(y)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x, *moe.parameters()])

    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for (name, _), g, g_ref in zip([("x", x), *moe.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5, msg=name)
    # The starved expert: a zero gradient, present (stacked parameters).
    for p in (moe.experts.gate, moe.experts.up, moe.experts.down):
        p.grad = None
    moe(x).mul(w).sum().backward()
    for p in (moe.experts.gate, moe.experts.up, moe.experts.down):
        assert p.grad is not None and torch.count_nonzero(p.grad[3]) == 0
        assert torch.count_nonzero(p.grad[:3]) > 0


def test_router_is_deterministic_and_ties_go_to_the_lower_index():
    for kind in ("softmax", "sigmoid_bias"):
        router = Router(moe_cfg(n_experts=6, top_k=3, router=kind))
        with torch.no_grad():
            router.weight.zero_()  # every logit equal
        x = torch.randn(5, 16)
        r = router(x)
        assert r.expert_idx.tolist() == [[0, 1, 2]] * 5
        with torch.no_grad():  # experts 4 and 1 tie for first, 5 and 2 for second
            router.weight[[4, 1], 0] = 1.0
            router.weight[[5, 2], 0] = 0.5
        x = torch.zeros(5, 16)
        x[:, 0] = 1.0
        r = router(x)
        assert r.expert_idx.tolist() == [[1, 4, 2]] * 5
    router = Router(moe_cfg(n_experts=8, top_k=2))
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 16)
    a, b = router(x), router(x)
    assert torch.equal(a.expert_idx, b.expert_idx) and torch.equal(a.gates, b.gates)
    assert torch.equal(a.expert_idx, a.logits.topk(2).indices)  # no ties here: the same as topk


def test_router_runs_in_fp32_under_bf16_autocast():
    router = Router(moe_cfg())
    torch.nn.init.normal_(router.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(torch.randn(4, 16))
    assert r.logits.dtype == r.gates.dtype == r.probs.dtype == torch.float32


def test_softmax_gates_are_renormalised_over_the_chosen_k():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    for k in (1, 2, 3):
        router = Router(moe_cfg(top_k=k))
        torch.nn.init.normal_(router.weight)
        r = router(x)
        probs = r.logits.softmax(-1)
        chosen = probs.gather(-1, r.expert_idx)
        assert torch.all(chosen[:, :-1] >= chosen[:, 1:])  # best first
        if k == 1:  # Switch: the raw probability, so the router still learns from the LM loss
            torch.testing.assert_close(r.gates, chosen)
        else:  # Mixtral: renormalised to sum 1 over the k
            torch.testing.assert_close(r.gates, chosen / chosen.sum(-1, keepdim=True))
            torch.testing.assert_close(r.gates.sum(-1), torch.ones(32))
        torch.testing.assert_close(r.probs, probs)


def test_sigmoid_bias_changes_selection_not_the_gate_formula():
    torch.manual_seed(0)
    router = Router(moe_cfg(router="sigmoid_bias", top_k=2))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(32, 16)
    before = router(x)
    with torch.no_grad():
        router.expert_bias[2] = 10.0  # expert 2 now always selected first
    after = router(x)
    assert (after.expert_idx[:, 0] == 2).all()
    assert not torch.equal(before.expert_idx, after.expert_idx)
    for r in (before, after):
        s = torch.sigmoid(r.logits).gather(-1, r.expert_idx)
        torch.testing.assert_close(r.gates, s / s.sum(-1, keepdim=True))  # no bias inside
    torch.testing.assert_close(after.logits, before.logits)
    torch.testing.assert_close(after.probs, torch.sigmoid(after.logits) / torch.sigmoid(after.logits).sum(-1, keepdim=True))


def test_capacity_drops_the_expected_assignments():
    # Two groups of 4 tokens, E=2, k=2, capacity ceil(0.5 * 4 * 2 / 2) = 2 per expert per group.
    one = [[0, 1], [0, 1], [0, 1], [1, 0]]
    idx = torch.tensor(one + one)
    keep = capacity_keep(idx, seq_len=8, group=4, capacity=2, n_experts=2)
    # Slot 0 first: e0 takes tokens 0, 1 (token 2 dropped), e1 takes token 3;
    # then slot 1: e1 takes token 0 (its second), the rest are over capacity.
    expected = [[True, True], [True, False], [False, False], [True, False]]
    assert keep.tolist() == expected + expected
    with pytest.raises(ValueError, match="capacity_group"):
        capacity_keep(idx, seq_len=8, group=3, capacity=2, n_experts=2)


def test_capacity_mode_is_the_same_on_any_split_of_the_batch():
    cfg = moe_cfg(n_experts=4, top_k=2, capacity_factor=0.5, capacity_group=4, n_shared_experts=0)
    moe = make_moe(cfg)
    x = torch.randn(4, 8, cfg.dim, generator=torch.Generator().manual_seed(3))
    y = moe(x)
    whole = moe.last_stats
    assert whole.dropped > 0
    halves = []
    for part in (x[:2], x[2:], x[1:2]):
        halves.append(moe(part))
        halves.append(moe.last_stats)
    torch.testing.assert_close(torch.cat([halves[0], halves[2]]), y, atol=1e-6, rtol=0)
    torch.testing.assert_close(halves[4], y[1:2], atol=1e-6, rtol=0)
    assert halves[1].dropped + halves[3].dropped == whole.dropped
    # And the kept assignments are exactly those of the rule, against the naive loop.
    r = moe.router(x.view(-1, cfg.dim))
    keep = capacity_keep(r.expert_idx, 8, 4, math.ceil(0.5 * 4 * 2 / 4), 4)
    assert (~keep).sum() == whole.dropped
    with torch.no_grad():
        torch.testing.assert_close(y.view(-1, cfg.dim), naive_moe(moe, x.view(-1, cfg.dim), keep), atol=1e-5, rtol=1e-5)
    # The whole sequence as the group (capacity_group=0) refuses nothing, drops per sequence.
    moe.cfg = moe_cfg(capacity_factor=0.5)
    moe(x)
    assert moe.last_stats.dropped > 0


def test_aux_and_z_loss_are_linear_in_each_parts_statistics():
    cfg = moe_cfg(n_experts=4, top_k=2, n_shared_experts=1)
    moe = make_moe(cfg)
    x = torch.randn(4, 8, cfg.dim, generator=torch.Generator().manual_seed(4))
    params = list(moe.router.parameters())

    moe(x)
    s = moe.last_stats
    whole = aux_loss(s.counts, s.prob_sum, s.n_tokens, 4, 2) + z_loss(s.z_sum, s.n_tokens)
    g_whole = torch.autograd.grad(whole, params)

    parts = []
    for half in (x[:2], x[2:]):
        moe(half)
        parts.append(moe.last_stats)
    g = merge_stats(parts)
    assert torch.equal(g.counts, s.counts) and g.n_tokens == s.n_tokens
    total = sum(aux_loss(g.counts, p.prob_sum, g.n_tokens, 4, 2) + z_loss(p.z_sum, g.n_tokens) for p in parts)
    g_parts = torch.autograd.grad(total, params)
    torch.testing.assert_close(total, whole)
    for a, b in zip(g_parts, g_whole):
        torch.testing.assert_close(a, b)
    # Perfectly uniform routing gives 1.
    assert aux_loss(torch.full((4,), 6), torch.full((4,), 3.0), 12, 4, 2).item() == pytest.approx(1.0)


def test_model_aux_losses_from_halves_with_global_counts_equal_the_whole_batch():
    cfg = ModelConfig.from_dict(dict(compose(["model=tiny_moe"]).model))
    model = build_model(cfg, seed=0)
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))
    _, aux = model(x, return_aux=True)
    whole = aux["aux_loss"] + aux["z_loss"]
    g_whole = torch.autograd.grad(whole, list(model.parameters()), allow_unused=True)
    halves = [model(h, return_aux=True)[1]["stats"] for h in (x[:2], x[2:])]
    counts = [a.counts + b.counts for a, b in zip(*halves)]
    total = sum(sum(router_losses(cfg, st, counts, 4 * 16)) for st in halves)
    g_parts = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(total, whole)
    for a, b in zip(g_parts, g_whole):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)


def test_update_router_bias_pushes_load_towards_the_mean():
    bias = torch.zeros(4)
    update_router_bias(bias, torch.tensor([10, 0, 5, 5]), 1e-3)
    assert bias.tolist() == pytest.approx([-1e-3, 1e-3, 0.0, 0.0])
    moe = MoE(moe_cfg(router="sigmoid_bias", router_bias_rate=0.5))
    moe.update_bias(torch.tensor([1, 2, 4, 5]))  # mean 3
    assert moe.router.expert_bias.tolist() == [0.5, 0.5, -0.5, -0.5]
    assert "router.expert_bias" in moe.state_dict()  # persistent: checkpointed
    assert "router.expert_bias" not in dict(moe.named_parameters())  # not the optimizer's
    MoE(moe_cfg()).update_bias(torch.tensor([1, 2, 3, 6]))  # softmax: nothing to move


def _hash(model):
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# sha256 of build_model(ModelConfig(), 0) and build_model(ModelConfig(n_layers=3), 7) state dicts,
# recorded before the mixture of experts was added (torch 2.13 CPU).
DENSE_HASHES = {
    (2, 0): "d10c1e8c991691d8c2ba57161d55b97c5551621befb0c4481d181e66c92befaf",
    (3, 7): "e0afc6aad50d1f1ba1be314b52d53ba65bdb63f7a0296a3dcd67b9d05693be59",
}


def test_dense_config_is_bit_identical_to_before():
    for (n_layers, seed), expected in DENSE_HASHES.items():
        assert _hash(build_model(ModelConfig(n_layers=n_layers), seed)) == expected
    # MoE keys other than n_experts do nothing while it is 0.
    other = ModelConfig(top_k=3, n_shared_experts=2, moe_ffn_hidden=32, router="sigmoid_bias", capacity_factor=1.0)
    assert _hash(build_model(other, 0)) == DENSE_HASHES[(2, 0)]


def test_moe_init_depends_only_on_the_seed():
    cfg = moe_cfg(n_layers=2, n_shared_experts=1, router="sigmoid_bias")
    a, b, c = (build_model(cfg, seed=s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.mlp.experts.gate"], c["blocks.0.mlp.experts.gate"])
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(4)
    assert a["blocks.0.mlp.experts.gate"].shape == (4, 8, 16)
    assert a["blocks.0.mlp.experts.down"].shape == (4, 16, 8)
    assert a["blocks.1.mlp.shared.down.weight"].shape == (16, 8)
    assert a["blocks.0.mlp.experts.up"].std().item() == pytest.approx(std, rel=0.2)
    assert a["blocks.0.mlp.experts.down"].std().item() == pytest.approx(out_std, rel=0.2)
    assert a["blocks.0.mlp.shared.down.weight"].std().item() == pytest.approx(out_std, rel=0.3)
    assert a["blocks.0.mlp.router.weight"].std().item() == pytest.approx(std, rel=0.3)
    assert torch.count_nonzero(a["blocks.0.mlp.router.expert_bias"]) == 0


def test_forward_return_aux_and_moe_layers():
    cfg = moe_cfg(n_layers=4, moe_every=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    model = build_model(cfg, seed=0)
    assert [type(b.mlp).__name__ for b in model.blocks] == ["SwiGLU", "MoE", "SwiGLU", "MoE"]
    assert model.moe_layers() == [model.blocks[1].mlp, model.blocks[3].mlp]
    x = torch.randint(0, 256, (2, 12))
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 12, 256)
    out, aux = model(x, return_aux=True)
    assert torch.equal(out, logits)
    assert len(aux["stats"]) == 2 and all(s.n_tokens == 24 for s in aux["stats"])
    raw = sum(aux_loss(s.counts, s.prob_sum, 24, 4, 2) for s in aux["stats"])
    torch.testing.assert_close(aux["aux_loss"], 0.01 * raw)
    assert aux["aux_loss"].item() > 0 and aux["z_loss"].item() > 0
    _, dense_aux = build_model(ModelConfig(), 0)(x, return_aux=True)
    assert dense_aux["stats"] == [] and dense_aux["aux_loss"].item() == 0 == dense_aux["z_loss"].item()
    # A pipeline part of MoE blocks: the parts in sequence give the whole model's logits.
    first = model.part([0, 1], first=True, last=False)
    last = model.part([2, 3], first=False, last=True)
    torch.testing.assert_close(last(first(x)), logits)
    assert last.moe_layers() == [model.blocks[3].mlp]


@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias"])
def test_tiny_moe_trains(router):
    cfg = ModelConfig.from_dict(dict(compose(["model=tiny_moe", f"model.router={router}"]).model))
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 33), generator=g)
    losses = []
    for _ in range(6):
        logits, aux = model(x[:, :-1], return_aux=True)
        ce = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        (ce + aux["aux_loss"] + aux["z_loss"]).backward()
        opt.step()
        opt.zero_grad()
        for m, s in zip(model.moe_layers(), aux["stats"]):
            m.update_bias(s.counts)
        losses.append(ce.item())
    assert losses[-1] < losses[0] - 0.3, losses
    if router == "sigmoid_bias":
        assert torch.count_nonzero(model.moe_layers()[0].router.expert_bias) > 0


def test_presets_compose_and_check():
    for name in ("tiny_moe", "small_moe"):
        cfg = compose([f"model={name}"])
        mcfg = ModelConfig.from_dict(dict(cfg.model))
        assert mcfg.n_experts > 0 and not mcfg.check()
        with torch.device("meta"):
            assert Transformer(mcfg).num_params() > 0
    cfg = compose(["model=tiny_moe", "model.capacity_factor=1.25", "model.capacity_group=16", "model.router=sigmoid_bias"])
    assert cfg.model.capacity_factor == 1.25 and not check_config(cfg, 1)
    assert any("model.router='bogus'" in p for p in check_config(compose(["model=tiny_moe", "model.router=bogus"]), 1))


def test_check_reports_bad_moe_keys():
    def problems(**kw):
        return " | ".join(moe_cfg(**kw).check())

    assert moe_cfg().check() == []
    assert "model.top_k=5 is more than model.n_experts=4" in problems(top_k=5)
    assert "model.top_k must be >= 1" in problems(top_k=0)
    assert "model.router='topk' is not one of softmax, sigmoid_bias" in problems(router="topk")
    assert "model.router='topk'" in " ".join(ModelConfig(router="topk").check())  # refused when dense too
    assert "model.capacity_factor must be > 0" in problems(capacity_factor=0.0)
    assert "model.capacity_factor must be > 0" in problems(capacity_factor=-1.0)
    assert "model.capacity_group=24 does not divide model.max_seq_len=64" in problems(capacity_factor=1.0, capacity_group=24)
    assert "model.n_experts must be >= 0" in problems(n_experts=-1)
    assert "model.moe_every must be >= 1" in problems(moe_every=0)
    assert "no block would be MoE" in problems(moe_every=3)
    assert "model.n_shared_experts must be >= 0" in problems(n_shared_experts=-1)
    assert "model.aux_loss_coef must be >= 0" in problems(aux_loss_coef=-0.1)
    with pytest.raises(ValueError, match="not one of softmax, sigmoid_bias"):
        Router(moe_cfg(router="topk"))
