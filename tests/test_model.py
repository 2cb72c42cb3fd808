import torch

from xtrain.config import compose
from xtrain.model import ModelConfig, build_model


def tiny_cfg(**kw):
    base = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=176, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def test_causal_future_tokens_do_not_change_past_logits():
    model = build_model(tiny_cfg(), seed=0).eval()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[:, 20:] = (x2[:, 20:] + 7) % 256
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_init_depends_only_on_seed():
    a, b, c = (build_model(tiny_cfg(), seed=s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_gqa_and_untied_head_shapes():
    cfg = tiny_cfg(n_heads=8, n_kv_heads=2, tie_embeddings=False)
    model = build_model(cfg, seed=0)
    assert model.head.weight.data_ptr() != model.embed.weight.data_ptr()
    assert model.blocks[0].attn.wk.weight.shape == (2 * cfg.head_dim, cfg.dim)
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 256)


def test_tied_head_shares_the_embedding():
    model = build_model(tiny_cfg(), seed=0)
    assert model.head.weight is model.embed.weight


def test_model_presets_have_their_advertised_sizes():
    expected = {"tiny": (80e3, 150e3), "small": (8e6, 12e6), "gpt2_small": (70e6, 130e6), "llama_1b": (0.8e9, 1.3e9)}
    for name, (lo, hi) in expected.items():
        cfg = compose([f"model={name}"]).model
        mcfg = ModelConfig.from_dict(dict(cfg))
        with torch.device("meta"):
            from xtrain.model import Transformer

            n = Transformer(mcfg).num_params()
        assert lo <= n <= hi, f"{name}: {n:,} parameters"
        assert not mcfg.check()


def test_shape_errors_are_reported():
    assert any("n_kv_heads" in p for p in tiny_cfg(n_heads=4, n_kv_heads=3).check())
    assert any("divisible" in p for p in tiny_cfg(dim=66).check())


def test_parts_keep_names_and_chain_to_the_whole_model():
    """A part keeps its blocks' names (checkpoint names never change with a cut);
    its ends may be absent; parts run one after another equal the whole model;
    the last part of a tied model keeps the shared weight under its one name."""
    from xtrain.model import ModelConfig, build_model

    cfg = ModelConfig(n_layers=4)
    model = build_model(cfg, seed=0)
    first = model.part([0, 1], first=True, last=False)
    middle = model.part([2], first=False, last=False)
    last = model.part([3], first=False, last=True)
    assert [n for n, _ in middle.named_parameters()][0].startswith("blocks.2.")
    assert middle.embed is None and middle.head is None and middle.norm is None
    assert {n for n, _ in last.named_parameters()} >= {"blocks.3.attn.wq.weight", "embed.weight", "norm.weight"}
    assert "head.weight" not in dict(last.named_parameters())  # tied: one name for the shared weight
    names = {n for part in (first, middle, last) for n, _ in part.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()}
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(last(middle(first(tokens))), model(tokens))
        positions = torch.arange(16)
        assert torch.equal(model(tokens, positions=positions), model(tokens))
