"""A decoder-only Llama-style transformer (Touvron et al., 2023, arXiv:2302.13971).

Pre-norm blocks with RMSNorm (Zhang & Sennrich, 2019), rotary position
embeddings (Su et al., 2021, arXiv:2104.09864), grouped-query attention
(Ainslie et al., 2023, arXiv:2305.13245) through torch's
scaled_dot_product_attention, and a SwiGLU MLP (Shazeer, 2020,
arXiv:2002.05202). Shapes use suffixes: B batch, T sequence, D model width,
H heads, K kv heads, E head dim, V vocabulary, F ffn hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 176
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    @classmethod
    def from_dict(cls, d) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"name"}
        if unknown:
            raise ValueError(f"unknown model options: {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self) -> list[str]:
        """Return every reason this shape cannot be built (empty when it can)."""
        errors = []
        if self.dim % self.n_heads:
            errors.append(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        elif (self.dim // self.n_heads) % 2:
            errors.append(f"head dim {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            errors.append(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) < 1:
                errors.append(f"model.{name} must be >= 1, got {getattr(self, name)}")
        return errors

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g  (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 so bf16 autocast does not lose the small mean.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).type_as(x)


def rope_tables(head_dim: int, seq_len: int, theta: float, offset: int = 0):
    """cos/sin tables of shape (T, E/2): angle t * theta^(-2i/E)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    t = torch.arange(offset, offset + seq_len, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BTHE, cos_TE, sin_TE):
    """Rotate each (even, odd) pair of features by its position's angle."""
    x1, x2 = x_BTHE[..., 0::2].float(), x_BTHE[..., 1::2].float()
    cos, sin = cos_TE[None, :, None, :], sin_TE[None, :, None, :]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x_BTHE)


class CausalAttention(nn.Module):
    """softmax(q k^T / sqrt(E) + causal mask) v over (B, H, T, E) tensors, with
    k and v given once per kv head (B, K, T, E), repeated here for the H/K query
    heads of each. The inner kernel of ``Attention``: a transform may swap it
    (context parallelism attends over a sequence spread across ranks)."""

    def forward(self, q_BHTE, k_BKTE, v_BKTE):
        rep = q_BHTE.shape[1] // k_BKTE.shape[1]
        if rep > 1:
            k_BKTE = k_BKTE.repeat_interleave(rep, dim=1)
            v_BKTE = v_BKTE.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q_BHTE, k_BKTE, v_BKTE, is_causal=True)


class Attention(nn.Module):
    """Causal grouped-query attention: n_kv_heads key/value heads shared by n_heads queries."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.inner_attention = CausalAttention()
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_BTD, cos, sin):
        B, T, _ = x_BTD.shape
        # Head counts come from the weights, so a tensor-parallel transform that
        # shards wq/wk/wv by heads needs no change here.
        q = self.wq(x_BTD).view(B, T, -1, self.head_dim)
        k = self.wk(x_BTD).view(B, T, -1, self.head_dim)
        v = self.wv(x_BTD).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # B,H,T,E
        y = self.inner_attention(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))  (Shazeer, 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Blocks(nn.ModuleDict):
    """The transformer blocks keyed by their layer index in the whole model, so a
    model that holds only some of them (a part, below) keeps their parameter
    names (``blocks.3.attn.wq.weight`` stays that whatever else is absent).
    Iterates over the blocks in layer order, as a ModuleList would."""

    def __init__(self, blocks: dict[int, nn.Module]):
        super().__init__({str(i): b for i, b in sorted(blocks.items())})

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i):
        return self._modules[str(i)]

    def indices(self) -> list[int]:
        return [int(k) for k in self._modules]


class Transformer(nn.Module):
    """Embedding, blocks, final norm and head. ``forward`` takes token ids, or
    hidden states when the model is a part that does not start at the
    embedding; each end may be absent (None) on a part."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.input_is_tokens = True
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = Blocks({i: Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator):
        """N(0, std) everywhere; residual output projections scaled by 1/sqrt(2L) (GPT-2)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("attn.wo.weight", "mlp.down.weight")):
                p.normal_(0.0, out_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    def forward(self, x, positions: torch.Tensor | None = None):
        """Logits (B, T, V) from token ids (B, T); on a part, hidden states (B, T, D)
        in or out where an end is absent. ``positions`` (T,) are the rotary
        positions of the T columns (default 0..T-1)."""
        T = x.shape[1]
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if self.input_is_tokens:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x, cos, sin)
        if self.norm is not None:
            x = self.norm(x)
        return self.head(x) if self.head is not None else x

    def part(self, layers, *, first: bool, last: bool) -> "Transformer":
        """A model made of some of this one's modules (shared, not copied): the
        blocks ``layers``, the embedding if ``first``, the final norm and head if
        ``last``. A part that ends at the head keeps the embedding module when the
        weights are tied, so the shared weight keeps its one name
        (``embed.weight``); it does not embed its input unless ``first``."""
        part = Transformer.__new__(Transformer)
        nn.Module.__init__(part)
        part.cfg = self.cfg
        part.input_is_tokens = first and self.input_is_tokens
        tied = self.head is not None and self.embed is not None and self.head.weight is self.embed.weight
        part.embed = self.embed if first or (last and tied) else None
        part.blocks = Blocks({i: self.blocks[i] for i in layers})
        part.norm = self.norm if last else None
        part.head = self.head if last else None
        part.register_buffer("rope_cos", self.rope_cos, persistent=False)
        part.register_buffer("rope_sin", self.rope_sin, persistent=False)
        return part

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, seed: int) -> Transformer:
    """Build on CPU in fp32 and initialise from the seed alone, so every rank and
    every strategy starts from bit-identical weights."""
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model
