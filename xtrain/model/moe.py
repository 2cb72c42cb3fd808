"""A mixture-of-experts MLP (Shazeer et al., 2017; GShard, Lepikhin et al., 2020,
arXiv:2006.16668; Switch, Fedus et al., 2021, arXiv:2101.03961), plain and
single-process: it replaces ``Block.mlp`` in the blocks ``ModelConfig.is_moe_layer``
names. No parallel code lives here; an expert-parallel transform swaps the
module's ``dispatcher`` and shards ``experts`` by expert (dim 0).

Parameters (E experts, F = ModelConfig.expert_hidden, D model width):

- ``router.weight`` (E, D); the router runs in fp32 (autocast off, x cast up).
- ``experts.gate``, ``experts.up`` (E, F, D) and ``experts.down`` (E, D, F):
  E SwiGLU experts stacked, each slice laid out as an nn.Linear weight.
- ``shared``: the always-on experts (DeepSeekMoE, Dai et al., 2024,
  arXiv:2401.06066) as one SwiGLU of hidden n_shared_experts * F, added to every
  token's output.
- ``router.expert_bias`` (E,), sigmoid_bias only: a *persistent buffer* (it is in
  ``state_dict`` and so belongs in checkpoints) that the optimizer never sees; it
  moves by ``update_router_bias`` from the step's global load.

Routing (N = B*T tokens, row-major over the batch; k = top_k):

- ``softmax``: p = softmax(logits); the k experts of largest logit; gates = the
  chosen p renormalised to sum 1 over the k (Mixtral). With k = 1 the gate is the
  raw p instead (Switch): renormalised it would be 1 and the router would learn
  from the auxiliary losses only. P_i (the aux loss's probability) is p.
- ``sigmoid_bias`` (DeepSeek-V3, arXiv:2412.19437, aux-loss-free balancing):
  s = sigmoid(logits); the k experts of largest s + bias (the bias only selects);
  gates = the chosen s normalised to sum 1 (k = 1: the raw s, as above). P_i is the
  normalised score s_i / sum_j s_j.
- Ties go to the lower expert index: selection is a stable descending sort of
  the scores, so equal scores keep index order.

Capacity (``capacity_factor`` set; null is dropless): tokens are cut into groups
of ``capacity_group`` consecutive tokens of one sequence (0: the whole
sequence), so a rank or micro-batch holding any subset of whole sequences makes
exactly the drops the single process makes. Each expert takes at most
capacity = ceil(capacity_factor * group * k / E) assignments per group, by
priority (k-slot, token order) as GShard/Switch: every token's first choice
before any second choice, earlier tokens first within a slot. A dropped
assignment contributes zero (the residual carries the token); its gate is not
redistributed.

Balancing statistics: each forward leaves a ``RouterStats`` in ``last_stats``.
The losses are formed by the pure functions below from statistics that a
parallel step may first sum over data-parallel ranks and micro-batches (global-
batch balancing, Qiu et al., 2025, arXiv:2501.11873).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from xtrain.model.transformer import ModelConfig, SwiGLU

ROUTERS = ("softmax", "sigmoid_bias")


@dataclass
class RouterStats:
    """One MoE block's statistics from one forward (sum them with ``merge_stats``)."""

    counts: torch.Tensor  # (E,) int64: assignments per expert after top-k, before capacity drops
    prob_sum: torch.Tensor  # (E,) fp32, differentiable: sum over tokens of P (the aux loss's numerator)
    z_sum: torch.Tensor  # () fp32, differentiable: sum over tokens of logsumexp(logits)^2
    n_tokens: int  # tokens routed
    dropped: torch.Tensor  # () int64: assignments dropped by capacity (0 when dropless)


def merge_stats(stats: Sequence[RouterStats]) -> RouterStats:
    """The sum of several forwards' statistics (micro-batches, halves of a batch); keeps the graphs."""
    return RouterStats(
        counts=sum(s.counts for s in stats),
        prob_sum=sum(s.prob_sum for s in stats),
        z_sum=sum(s.z_sum for s in stats),
        n_tokens=sum(s.n_tokens for s in stats),
        dropped=sum(s.dropped for s in stats),
    )


def aux_loss(counts_global, prob_sum_local, n_tokens_global, n_experts: int, top_k: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss E * sum_i f_i * P_i, with f_i =
    counts_i / (N k) (the fraction of assignments, a constant) and P_i =
    prob_sum_i / N (the mean router probability), N the global token count.

    Linearity: once f is fixed by the global counts, the loss is linear in
    prob_sum. So each rank and micro-batch passes the *global* counts and N with
    its *local* prob_sum, and the sum of those parts over ranks and micro-batches
    is exactly the global batch's loss, value and gradient: no part is divided
    by the world size or the micro-batch count. (Uniform routing gives 1.)"""
    f = counts_global.detach().to(torch.float32) / (n_tokens_global * top_k)
    return n_experts * (f * prob_sum_local.float()).sum() / n_tokens_global


def z_loss(z_sum_local, n_tokens_global) -> torch.Tensor:
    """ST-MoE router z-loss mean over tokens of logsumexp(logits)^2 (Zoph et al., 2022,
    arXiv:2202.08906): this part's sum over the global token count, linear like ``aux_loss``."""
    return z_sum_local.float() / n_tokens_global


def router_losses(cfg: ModelConfig, stats: Sequence[RouterStats], counts_global=None, n_tokens_global=None,
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux, z): ``aux_loss_coef`` * sum over MoE blocks of ``aux_loss`` and
    ``z_loss_coef`` * sum of ``z_loss``, ready to add to the language-model loss.
    ``stats`` are this part's, one per block; ``counts_global`` (one (E,) tensor
    per block) and ``n_tokens_global`` are the step's sums over every rank and
    micro-batch (default: this part's own, i.e. one process, one micro-batch)."""
    if not stats:
        zero = torch.zeros((), device=device)
        return zero, zero.clone()
    aux = z = 0
    for layer, s in enumerate(stats):
        counts = s.counts if counts_global is None else counts_global[layer]
        n = s.n_tokens if n_tokens_global is None else n_tokens_global
        aux = aux + aux_loss(counts, s.prob_sum, n, cfg.n_experts, cfg.top_k)
        z = z + z_loss(s.z_sum, n)
    return cfg.aux_loss_coef * aux, cfg.z_loss_coef * z


@torch.no_grad()
def update_router_bias(bias: torch.Tensor, counts_global: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's aux-loss-free update, in place: bias_i += rate * sign(mean load - load_i),
    so an overloaded expert is selected less often at the next step. Returns ``bias``."""
    load = counts_global.detach().to(torch.float64)
    bias.add_((rate * torch.sign(load.mean() - load)).to(bias.dtype))
    return bias


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) indices of the k largest scores per row, largest first, ties to the lower index
    (a stable descending sort keeps equal scores in index order; torch.topk promises no order)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


@dataclass
class Routing:
    expert_idx: torch.Tensor  # (N, k) int64, chosen experts, best first
    gates: torch.Tensor  # (N, k) fp32 combine weights
    probs: torch.Tensor  # (N, E) fp32, the P of the aux loss
    logits: torch.Tensor  # (N, E) fp32


class Router(nn.Module):
    """logits = x W^T in fp32, then top-k selection and gates (module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.router not in ROUTERS:
            raise ValueError(f"model.router={cfg.router!r} is not one of {', '.join(ROUTERS)}")
        self.kind, self.top_k = cfg.router, cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim))
        if self.kind == "sigmoid_bias":
            # Persistent: saved with the model; a buffer: the optimizer never touches it.
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts), persistent=True)
        else:
            self.expert_bias = None

    def forward(self, x_ND: torch.Tensor) -> Routing:
        with torch.autocast(x_ND.device.type, enabled=False):
            logits = F.linear(x_ND.float(), self.weight.float())
            if self.kind == "softmax":
                probs = logits.softmax(-1)
                idx = select_topk(logits, self.top_k)
                chosen = probs.gather(-1, idx)
            else:
                scores = torch.sigmoid(logits)
                probs = scores / scores.sum(-1, keepdim=True)
                idx = select_topk(scores + self.expert_bias.float(), self.top_k)
                chosen = scores.gather(-1, idx)
            gates = chosen / chosen.sum(-1, keepdim=True) if self.top_k > 1 else chosen
        return Routing(idx, gates, probs, logits)


class Experts(nn.Module):
    """SwiGLU experts as stacked tensors, shardable by expert along dim 0:
    ``gate``, ``up`` (E, F, D) and ``down`` (E, D, F). ``run`` applies expert e of
    those held here to the e-th contiguous block of tokens."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.up = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.down = nn.Parameter(torch.empty(n_experts, dim, hidden))

    @property
    def n_local(self) -> int:
        """Experts held by this module (all of them until a transform shards dim 0)."""
        return self.gate.shape[0]

    def run(self, x_sorted: torch.Tensor, counts) -> torch.Tensor:
        """(M, D) -> (M, D): ``x_sorted`` holds counts[0] rows for this module's expert 0,
        then counts[1] rows for expert 1, ... (``counts``: one int per local expert,
        summing to M). Every expert runs, an empty block too, so an expert that got
        no token gets a zero gradient (not None)."""
        counts = counts.tolist() if torch.is_tensor(counts) else list(counts)
        if len(counts) != self.n_local:
            raise ValueError(f"{len(counts)} token counts for {self.n_local} local experts")
        outs = []
        for e, xe in enumerate(x_sorted.split(counts)):
            h = F.silu(F.linear(xe, self.gate[e])) * F.linear(xe, self.up[e])
            outs.append(F.linear(h, self.down[e]))
        return torch.cat(outs)

    forward = run


class Dispatcher(Protocol):
    """The seam an expert-parallel transform replaces: ``(x_ND, expert_idx (N, k)
    int64 global expert indices, -1 marking a dropped assignment, gates (N, k)
    fp32, experts: Experts) -> (N, D)``, the sum over each token's kept
    assignments of gate * expert(x)."""

    def __call__(self, x_ND: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor,
                 experts: Experts) -> torch.Tensor: ...


def sort_by_expert(expert_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts): ``order`` indexes the flattened (N*k) assignments, kept ones
    only, sorted by expert (stable, so token order within an expert; dropped, -1,
    removed); ``counts`` (E,) the kept assignments per expert. The token of
    assignment a is a // k."""
    flat = expert_idx.reshape(-1)
    kept = flat >= 0
    order = torch.argsort(torch.where(kept, flat, n_experts), stable=True)
    counts = torch.bincount(flat[kept], minlength=n_experts)
    return order[: int(counts.sum())], counts


def combine(y_sorted: torch.Tensor, order: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(N, D) fp32: un-permute the experts' outputs (in ``order``) back to their
    (token, slot) places, weight by the gates and sum each token's k slots (a
    dropped slot adds zero). Scatters into distinct rows, then sums over k in slot
    order: no atomics, deterministic."""
    N, k = gates.shape
    w = gates.reshape(-1)[order].unsqueeze(-1)
    per_slot = y_sorted.new_zeros(N * k, y_sorted.shape[-1], dtype=torch.float32)
    per_slot = per_slot.index_copy(0, order, y_sorted.float() * w)
    return per_slot.view(N, k, -1).sum(1)


class LocalDispatcher:
    """Every expert on this process: permute tokens so each expert's are contiguous,
    run them grouped (``Experts.run``), un-permute and combine with the gates."""

    def __call__(self, x_ND, expert_idx, gates, experts: Experts):
        order, counts = sort_by_expert(expert_idx, experts.n_local)
        y_sorted = experts.run(x_ND[order // expert_idx.shape[1]], counts)
        return combine(y_sorted, order, gates)


def capacity_of(cfg: ModelConfig, group: int) -> int:
    """Assignments one expert takes per group: ceil(capacity_factor * group * top_k / n_experts)."""
    return math.ceil(cfg.capacity_factor * group * cfg.top_k / cfg.n_experts)


def capacity_keep(expert_idx: torch.Tensor, seq_len: int, group: int, capacity: int, n_experts: int) -> torch.Tensor:
    """(N, k) bool: which assignments fit. Tokens (row-major over (B, T)) are cut
    into groups of ``group`` consecutive tokens of a sequence (``seq_len % group ==
    0``); within a group, each expert keeps its first ``capacity`` assignments in
    (k-slot, token) order."""
    N, k = expert_idx.shape
    if seq_len % group or N % group:
        raise ValueError(f"capacity_group={group} does not divide the sequence length {seq_len}")
    n_groups = N // group
    # Priority order within each group: slot-major, then token.
    prio = expert_idx.view(n_groups, group, k).transpose(1, 2).reshape(-1)
    gid = torch.arange(n_groups, device=expert_idx.device).repeat_interleave(k * group)
    keys = gid * n_experts + prio
    order = torch.argsort(keys, stable=True)
    starts = torch.cumsum(torch.bincount(keys, minlength=n_groups * n_experts), 0)
    starts = torch.cat([starts.new_zeros(1), starts[:-1]])
    pos = torch.empty_like(keys)
    pos[order] = torch.arange(keys.numel(), device=keys.device) - starts[keys[order]]
    keep = pos < capacity
    return keep.view(n_groups, k, group).transpose(1, 2).reshape(N, k)


class AttachLoss(torch.autograd.Function):
    """Returns ``y`` unchanged; its backward also sends ``grad_scale`` into ``loss``,
    so an auxiliary loss formed inside a layer trains with whatever backward
    passes through the layer's output (Megatron's MoEAuxLossAutoScaler). The
    loss never has to travel to the end of the model (a pipeline stage, a
    micro-batch loop): each layer adds its own term where it is."""

    @staticmethod
    def forward(ctx, y, loss, grad_scale: float):
        ctx.grad_scale = grad_scale
        ctx.save_for_backward(loss)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        (loss,) = ctx.saved_tensors
        return grad_y, torch.full_like(loss, ctx.grad_scale), None


class MoE(nn.Module):
    """The mixture-of-experts MLP: (B, T, D) -> (B, T, D). Routes in fp32, dispatches
    through ``self.dispatcher`` (default ``LocalDispatcher``), adds the shared
    experts, and leaves this forward's ``RouterStats`` in ``self.last_stats``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.router = Router(cfg)
        self.experts = Experts(cfg.n_experts, cfg.dim, cfg.expert_hidden)
        self.shared = SwiGLU(cfg, hidden=cfg.n_shared_experts * cfg.expert_hidden) if cfg.n_shared_experts else None
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.last_stats: RouterStats | None = None
        # A training step's balancing (set from outside): called with this layer and
        # its stats, returns (loss, grad_scale) to attach to the output, or None.
        self.loss_hook = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        r = self.router(x_ND)
        counts = torch.bincount(r.expert_idx.reshape(-1), minlength=self.n_experts)
        expert_idx, dropped = r.expert_idx, counts.new_zeros(())
        if self.cfg.capacity_factor is not None:
            group = self.cfg.capacity_group or T
            keep = capacity_keep(r.expert_idx, T, group, capacity_of(self.cfg, group), self.n_experts)
            expert_idx = torch.where(keep, r.expert_idx, -1)
            dropped = (~keep).sum()
        y = self.dispatcher(x_ND, expert_idx, r.gates, self.experts)
        if self.shared is not None:
            y = y + self.shared(x_ND)
        self.last_stats = RouterStats(
            counts=counts,
            prob_sum=r.probs.sum(0),
            z_sum=torch.logsumexp(r.logits, -1).pow(2).sum(),
            n_tokens=B * T,
            dropped=dropped,
        )
        if self.loss_hook is not None and (attached := self.loss_hook(self, self.last_stats)) is not None:
            y = AttachLoss.apply(y, *attached)
        return y.to(x_BTD.dtype).view(B, T, D)

    def update_bias(self, counts_global: torch.Tensor) -> None:
        """sigmoid_bias: move the selection bias from the step's global counts; else nothing."""
        if self.router.expert_bias is not None:
            update_router_bias(self.router.expert_bias, counts_global, self.cfg.router_bias_rate)
