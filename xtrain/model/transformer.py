"""A decoder-only Llama-style transformer (Touvron et al., 2023, arXiv:2302.13971).

Pre-norm blocks with RMSNorm (Zhang & Sennrich, 2019), rotary position
embeddings (Su et al., 2021, arXiv:2104.09864), grouped-query attention
(Ainslie et al., 2023, arXiv:2305.13245) through torch's
scaled_dot_product_attention, and a SwiGLU MLP (Shazeer, 2020,
arXiv:2002.05202), or a mixture of experts (xtrain/model/moe.py) in the
blocks ``ModelConfig.is_moe_layer`` names. Shapes use suffixes: B batch, T
sequence, D model width, H heads, K kv heads, E head dim, V vocabulary, F ffn
hidden.
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
    # Mixture of experts (xtrain/model/moe.py). n_experts=0 is the dense model,
    # bit-identical to a config without these keys.
    n_experts: int = 0  # routed experts per MoE block; 0: every MLP is dense
    top_k: int = 2  # routed experts per token
    n_shared_experts: int = 0  # always-on experts (DeepSeekMoE), one SwiGLU of n_shared_experts * moe_ffn_hidden
    moe_every: int = 1  # block i is MoE when i % moe_every == moe_every - 1 (1: every block)
    moe_ffn_hidden: int = 0  # each expert's SwiGLU hidden size; 0: ffn_hidden
    capacity_factor: float | None = None  # null: dropless; else capacity = ceil(cf * group * top_k / n_experts)
    capacity_group: int = 0  # tokens per capacity group, consecutive within one sequence; 0: the whole sequence
    router: str = "softmax"  # softmax | sigmoid_bias (DeepSeek-V3 aux-loss-free balancing)
    router_bias_rate: float = 1e-3  # sigmoid_bias: the bias update speed (DeepSeek-V3's gamma)
    aux_loss_coef: float = 0.0  # Switch/GShard load-balancing loss E * sum_i f_i * P_i, per MoE block
    z_loss_coef: float = 0.0  # router z-loss mean(logsumexp(logits)^2) (ST-MoE), per MoE block

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
        errors += self.check_moe()
        return errors

    def check_moe(self) -> list[str]:
        """The mixture-of-experts keys' problems (the router's name is checked even when dense)."""
        from xtrain.model.moe import ROUTERS

        errors = []
        if self.router not in ROUTERS:
            errors.append(f"model.router={self.router!r} is not one of {', '.join(ROUTERS)}")
        if self.n_experts < 0:
            errors.append(f"model.n_experts must be >= 0 (0: dense), got {self.n_experts}")
        if self.n_experts <= 0:
            return errors
        if self.top_k < 1:
            errors.append(f"model.top_k must be >= 1, got {self.top_k}")
        elif self.top_k > self.n_experts:
            errors.append(f"model.top_k={self.top_k} is more than model.n_experts={self.n_experts}")
        for name in ("n_shared_experts", "moe_ffn_hidden", "capacity_group"):
            if getattr(self, name) < 0:
                errors.append(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.moe_every < 1:
            errors.append(f"model.moe_every must be >= 1, got {self.moe_every}")
        elif self.moe_every > self.n_layers:
            errors.append(f"model.moe_every={self.moe_every} is more than model.n_layers={self.n_layers}: no block would be MoE")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            errors.append(f"model.capacity_factor must be > 0 or null (dropless), got {self.capacity_factor}")
        if self.capacity_factor is not None and self.capacity_group > 0 and self.max_seq_len % self.capacity_group:
            errors.append(f"model.capacity_group={self.capacity_group} does not divide model.max_seq_len={self.max_seq_len}")
        for name in ("router_bias_rate", "aux_loss_coef", "z_loss_coef"):
            if not getattr(self, name) >= 0:
                errors.append(f"model.{name} must be >= 0, got {getattr(self, name)}")
        return errors

    def is_moe_layer(self, i: int) -> bool:
        """Whether block ``i`` has a mixture of experts as its MLP: the last of every
        ``moe_every`` blocks (blocks 1, 3, 5 for moe_every=2; all for 1)."""
        return self.n_experts > 0 and i % self.moe_every == self.moe_every - 1

    @property
    def expert_hidden(self) -> int:
        return self.moe_ffn_hidden or self.ffn_hidden

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
    """down(silu(gate(x)) * up(x))  (Shazeer, 2020); ``hidden`` defaults to cfg.ffn_hidden."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = cfg.ffn_hidden if hidden is None else hidden
        self.gate = nn.Linear(cfg.dim, hidden, bias=False)
        self.up = nn.Linear(cfg.dim, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """``moe``: the MLP is a mixture of experts (xtrain.model.moe.MoE), else a SwiGLU."""

    def __init__(self, cfg: ModelConfig, moe: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if moe:
            from xtrain.model.moe import MoE

            self.mlp = MoE(cfg)
        else:
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
        self.blocks = Blocks({i: Block(cfg, moe=cfg.is_moe_layer(i)) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator):
        """N(0, std) everywhere; residual output projections scaled by 1/sqrt(2L) (GPT-2).
        In parameter order, so the draws depend on the seed and the shape alone; the
        experts' stacked ``down`` (E, D, F) and the shared experts' ``down`` are output
        projections too. Buffers (a router's bias) keep their construction value."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("attn.wo.weight", "mlp.down.weight", "mlp.experts.down", "mlp.shared.down.weight")):
                p.normal_(0.0, out_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    def forward(self, x, positions: torch.Tensor | None = None, return_aux: bool = False):
        """Logits (B, T, V) from token ids (B, T); on a part, hidden states (B, T, D)
        in or out where an end is absent. ``positions`` (T,) are the rotary
        positions of the T columns (default 0..T-1).

        ``return_aux``: return ``(logits, aux)`` with aux = {"aux_loss", "z_loss":
        scalar tensors, already scaled by model.aux_loss_coef / z_loss_coef and
        summed over the MoE blocks (zero without any), "stats": [RouterStats per
        MoE block in layer order]}, formed from this forward's statistics alone
        (xtrain.model.moe.router_losses; the global statistics of a parallel step
        go through the same function)."""
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
        out = self.head(x) if self.head is not None else x
        if not return_aux:
            return out
        from xtrain.model.moe import router_losses

        stats = [m.last_stats for m in self.moe_layers()]
        aux_loss, z_loss = router_losses(self.cfg, stats, device=out.device)
        return out, {"aux_loss": aux_loss, "z_loss": z_loss, "stats": stats}

    def moe_layers(self) -> list[nn.Module]:
        """The MoE modules (each block's ``mlp`` where it is one), in layer order."""
        from xtrain.model.moe import MoE

        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

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
