"""Tensor parallelism (Megatron-LM: Shoeybi et al., 2019, arXiv:1909.08053) and
sequence parallelism (Korthikanti et al., 2022, arXiv:2205.05198), applied from
outside to the plain Llama-style model.

The vocabulary is a small set of conjugate autograd functions over a ``comm``
object and the tp process group; each one's backward is the other's forward:

    copy_to_tp_region          identity        | all-reduce       (f in Megatron)
    reduce_from_tp_region      all-reduce      | identity         (g in Megatron)
    scatter_to_tp_region       split last dim  | all-gather last dim
    gather_from_tp_region      all-gather last | split last dim
    gather_from_sequence_region  all-gather T  | reduce-scatter T  (g under sp)
    reduce_scatter_to_sequence_region  r-s T   | all-gather T      (g-bar under sp)

``ColumnParallelLinear`` keeps a slice of the output features, ``RowParallelLinear``
a slice of the input features, ``VocabParallelEmbedding`` a range of the
vocabulary, and ``vocab_parallel_cross_entropy`` computes the loss from
vocabulary-sharded logits with three all-reduces and no full logits anywhere.

``apply_tensor_parallel(model, mesh, comm, sequence_parallel)`` swaps a plain
``Transformer``'s layers in place. Parameter names do not change, so
checkpoints stay in the canonical form (full tensors by name) through
``full_tp_parameters`` / ``load_full_tp_parameters``.

Parameter marks (``xtrain.parallel.placement``, on the ``tp`` axis), which the
strategy's generic code reads:

- ``Shard(dim, parts, rank, full_size)``: this rank holds chunk ``rank`` of
  ``parts`` equal chunks along ``dim`` (the last chunk is zero-padded when
  ``full_size`` is not a multiple of ``parts``: the vocabulary);
- ``Partial()``: the parameter is replicated over tp, but each rank's gradient
  is a partial sum (norm weights under sequence parallel, replicated kv
  heads); it is summed over tp before use;
- unmarked: replicated, with complete gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import ReduceOp

from xtrain.comm.groups import group_rank, group_size
from xtrain.parallel.placement import Partial, Shard, carry_marks, gather_along, mark, placement, shard_tensor
from xtrain.model.transformer import SwiGLU

# -- collectives along one dimension (through the comm object only) ---------------


def _all_gather_along(x: torch.Tensor, dim: int, comm, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (in group-rank order)."""
    return gather_along(x, dim, comm, group)


def _reduce_scatter_along(x: torch.Tensor, dim: int, comm, group) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"reduce-scatter along dim {dim}: size {x.shape[dim]} is not divisible by tp={n}")
    x0 = x.movedim(dim, 0).contiguous()
    out = torch.empty((x0.shape[0] // n, *x0.shape[1:]), dtype=x0.dtype, device=x0.device)
    comm.reduce_scatter_tensor(out, x0, op=ReduceOp.SUM, group=group)
    return out.movedim(0, dim).contiguous()


def _split_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` (no communication)."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"split along dim {dim}: size {x.shape[dim]} is not divisible by tp={n}")
    size = x.shape[dim] // n
    return x.narrow(dim, group_rank(group) * size, size).contiguous()


def _all_reduce(x: torch.Tensor, comm, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()  # never reduce in place into a tensor autograd may hold
    comm.all_reduce(out, op=ReduceOp.SUM, group=group)
    return out


# -- the conjugate autograd functions (Megatron's f/g and their sp variants) -----------


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, group):
        ctx.comm, ctx.group = comm, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.comm, ctx.group), None, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, group):
        return _all_reduce(x, comm, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, group):
        ctx.comm, ctx.group = comm, group
        return _split_along(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_along(grad, -1, ctx.comm, ctx.group), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, group):
        ctx.group = group
        return _all_gather_along(x, -1, comm, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_along(grad, -1, ctx.group), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, group):
        ctx.comm, ctx.group = comm, group
        return _all_gather_along(x, 1, comm, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_along(grad, 1, ctx.comm, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, group):
        ctx.comm, ctx.group = comm, group
        return _reduce_scatter_along(x, 1, comm, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_along(grad, 1, ctx.comm, ctx.group), None, None


def copy_to_tp_region(x, comm, group):
    """Identity forward, all-reduce of the gradient backward (the entry of a column-parallel region)."""
    return _CopyToRegion.apply(x, comm, group)


def reduce_from_tp_region(x, comm, group):
    """All-reduce forward, identity backward (the exit of a row-parallel region)."""
    return _ReduceFromRegion.apply(x, comm, group)


def scatter_to_tp_region(x, comm, group):
    """Keep this rank's chunk of the last dim forward; all-gather the gradient backward."""
    return _ScatterToRegion.apply(x, comm, group)


def gather_from_tp_region(x, comm, group):
    """All-gather along the last dim forward; keep this rank's chunk of the gradient backward."""
    return _GatherFromRegion.apply(x, comm, group)


def gather_from_sequence_region(x_BtD, comm, group):
    """Sequence parallel entry: all-gather (B, T/tp, D) -> (B, T, D) forward, reduce-scatter backward."""
    return _GatherFromSequence.apply(x_BtD, comm, group)


def reduce_scatter_to_sequence_region(x_BTD, comm, group):
    """Sequence parallel exit: reduce-scatter (B, T, D) partial sums -> (B, T/tp, D), all-gather backward."""
    return _ReduceScatterToSequence.apply(x_BTD, comm, group)


def enter_tp_region(x, comm, group, sequence_parallel: bool):
    """What a column-parallel region does to its (replicated or sequence-sharded) input."""
    if sequence_parallel:
        return gather_from_sequence_region(x, comm, group)
    return copy_to_tp_region(x, comm, group)


def exit_tp_region(x, comm, group, sequence_parallel: bool):
    """What a row-parallel region does to its partial-sum output."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_region(x, comm, group)
    return reduce_from_tp_region(x, comm, group)


# -- shard bookkeeping --------------------------------------------------------------------


TPShard = Shard  # the tp axis's shard spec is the shared placement


def _mark_shard(p: nn.Parameter, dim: int, parts: int, rank: int, full_size: int) -> nn.Parameter:
    return mark(p, "tp", Shard(dim, parts, rank, full_size))


def _mark_partial(p: nn.Parameter) -> nn.Parameter:
    return mark(p, "tp", Partial())


def tp_shard_spec(p: torch.Tensor) -> Shard | None:
    """The parameter's tp ``Shard`` (None when it is whole on every tp rank)."""
    pl = placement(p, "tp")
    return pl if isinstance(pl, Shard) else None


def is_tp_partial(p: torch.Tensor) -> bool:
    """True when the parameter is replicated but its gradient is a partial sum over tp."""
    return isinstance(placement(p, "tp"), Partial)


def shard_full_tensor(full: torch.Tensor, spec_or_param) -> torch.Tensor:
    """This rank's tp shard of ``full`` (a copy); ``full`` itself when not sharded.
    ``spec_or_param`` is a ``Shard`` or a parameter carrying one."""
    spec = spec_or_param if isinstance(spec_or_param, Shard) else tp_shard_spec(spec_or_param)
    return full if spec is None else shard_tensor(full, spec)


def gather_tp_tensor(local: torch.Tensor, spec: TPShard | None, comm, group) -> torch.Tensor:
    """The full tensor from every rank's shard (a collective: every tp rank calls it).
    Works for a parameter, its gradient or an optimizer state of the same shape."""
    if spec is None:
        return local.detach()
    full = _all_gather_along(local.detach(), spec.dim, comm, group)
    return full.narrow(spec.dim, 0, spec.full_size)


@torch.no_grad()
def full_tp_parameters(model: nn.Module, comm, group) -> dict[str, torch.Tensor]:
    """Every parameter, whole, on CPU in fp32, by its (unchanged) name. Collective over tp."""
    return {
        n: gather_tp_tensor(p, tp_shard_spec(p), comm, group).float().cpu().clone()
        for n, p in model.named_parameters()
    }


@torch.no_grad()
def load_full_tp_parameters(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (by name) into this rank's shards. No communication."""
    for n, p in model.named_parameters():
        p.copy_(shard_full_tensor(params[n], p).to(p.dtype))


@torch.no_grad()
def reduce_tp_partial_grads(model: nn.Module, comm, group) -> None:
    """Sum the partial gradients of replicated parameters over tp (the strategy calls
    this in ``reduce_gradients``, once per optimizer step, before any dp reduction
    or clipping). One flat all-reduce for all of them."""
    grads = [p.grad for p in model.parameters() if is_tp_partial(p) and p.grad is not None]
    if not grads or group_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, op=ReduceOp.SUM, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def tp_grads_for_norm(model: nn.Module, tp_rank: int) -> list[torch.Tensor]:
    """The gradients that count toward the global norm on this tp rank, so that
    summing squared norms over tp counts each element once: shards on every
    rank, replicated parameters only on tp rank 0. (Clipping must still scale
    every gradient, not only these.)"""
    return [
        p.grad
        for p in model.parameters()
        if p.grad is not None and (tp_shard_spec(p) is not None or tp_rank == 0)
    ]


# -- layers -------------------------------------------------------------------------------


def _take_rows(w: torch.Tensor, parts: int, rank: int) -> torch.Tensor:
    spec = TPShard(0, parts, rank, w.shape[0])
    return shard_full_tensor(w.detach(), spec)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features): rank r computes
    y[..., r-th chunk] (Megatron-LM, Shoeybi et al., 2019, section 3).

    The input is replicated (identity forward, all-reduce of its gradient
    backward) or, under sequence parallel (Korthikanti et al., 2022),
    sequence-sharded (B, T/tp, D) and all-gathered here. ``enter_region=False``
    skips that step when the caller already applied ``enter_tp_region`` to an
    input shared by several column-parallel layers (q, k, v), so they share one
    collective. ``gather_output`` all-gathers the output features; otherwise the
    output stays sharded (B, T, out/tp). An output size not divisible by tp is
    zero-padded (the vocabulary); gathered outputs are trimmed back.
    """

    def __init__(self, linear: nn.Linear, comm, group, *, gather_output=False, sequence_parallel=False,
                 enter_region=True, weight: nn.Parameter | None = None):
        super().__init__()
        self.comm, self.group = comm, group
        self.tp, self.tp_rank = group_size(group), group_rank(group)
        self.in_features, self.full_out_features = linear.in_features, linear.out_features
        self.gather_output, self.sequence_parallel, self.enter_region = gather_output, sequence_parallel, enter_region
        if weight is None:  # a shared weight (tied embeddings) is already a marked shard
            weight = carry_marks(nn.Parameter(_take_rows(linear.weight, self.tp, self.tp_rank)), linear.weight)
            _mark_shard(weight, 0, self.tp, self.tp_rank, self.full_out_features)
        self.weight = weight
        self.out_features = self.weight.shape[0]
        if linear.bias is not None:
            self.bias = carry_marks(nn.Parameter(_take_rows(linear.bias, self.tp, self.tp_rank)), linear.bias)
            _mark_shard(self.bias, 0, self.tp, self.tp_rank, self.full_out_features)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        if self.enter_region:
            x = enter_tp_region(x, self.comm, self.group, self.sequence_parallel)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_tp_region(y, self.comm, self.group)[..., : self.full_out_features]
        return y

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features} of {self.full_out_features}, tp={self.tp}, "
                f"sp={self.sequence_parallel}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features): rank r computes
    the partial sum x[..., r-th chunk] A[:, r-th chunk]^T, and the partial sums
    are all-reduced (or, under sequence parallel, reduce-scattered along the
    sequence to (B, T/tp, out)) (Megatron-LM, Shoeybi et al., 2019; Korthikanti
    et al., 2022). The bias is added once, after the reduction.

    ``input_is_parallel`` says the input already holds this rank's chunk of the
    features (the output of a column-parallel layer); otherwise it is split here.
    Under sequence parallel the bias sees only this rank's tokens, so its
    gradient is partial and marked for a sum over tp.
    """

    def __init__(self, linear: nn.Linear, comm, group, *, input_is_parallel=True, sequence_parallel=False):
        super().__init__()
        self.comm, self.group = comm, group
        self.tp, self.tp_rank = group_size(group), group_rank(group)
        if linear.in_features % self.tp:
            raise ValueError(f"RowParallelLinear: in_features={linear.in_features} is not divisible by tp={self.tp}")
        self.full_in_features, self.out_features = linear.in_features, linear.out_features
        self.in_features = linear.in_features // self.tp
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        w = linear.weight.detach().narrow(1, self.tp_rank * self.in_features, self.in_features).clone()
        self.weight = _mark_shard(carry_marks(nn.Parameter(w), linear.weight), 1, self.tp, self.tp_rank, self.full_in_features)
        if linear.bias is not None:
            self.bias = carry_marks(nn.Parameter(linear.bias.detach().clone()), linear.bias)
            if sequence_parallel:
                _mark_partial(self.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.comm, self.group)
        y = exit_tp_region(F.linear(x, self.weight), self.comm, self.group, self.sequence_parallel)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return (f"in={self.in_features} of {self.full_in_features}, out={self.out_features}, tp={self.tp}, "
                f"sp={self.sequence_parallel}, input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows are split by vocabulary range: rank r owns ids
    [r*chunk, (r+1)*chunk), chunk = ceil(V / tp) (padded rows are zero and
    never looked up). Ids outside the range give zero rows, and the partial
    results are all-reduced, or reduce-scattered along the sequence to
    (B, T/tp, D) under sequence parallel (Megatron-LM; Korthikanti et al., 2022).
    """

    def __init__(self, embedding: nn.Embedding, comm, group, *, sequence_parallel=False):
        super().__init__()
        if embedding.padding_idx is not None or embedding.max_norm is not None or embedding.sparse:
            raise ValueError("VocabParallelEmbedding supports plain embeddings only (no padding_idx, max_norm, sparse)")
        self.comm, self.group = comm, group
        self.tp, self.tp_rank = group_size(group), group_rank(group)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.sequence_parallel = sequence_parallel
        self.weight = carry_marks(nn.Parameter(_take_rows(embedding.weight, self.tp, self.tp_rank)), embedding.weight)
        _mark_shard(self.weight, 0, self.tp, self.tp_rank, self.num_embeddings)
        self.vocab_start = tp_shard_spec(self.weight).start
        self.vocab_end = min(self.vocab_start + self.weight.shape[0], self.num_embeddings)

    def forward(self, ids):
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        y = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return exit_tp_region(y, self.comm, self.group, self.sequence_parallel)

    def extra_repr(self):
        return (f"vocab [{self.vocab_start}, {self.vocab_end}) of {self.num_embeddings}, dim={self.embedding_dim}, "
                f"tp={self.tp}, sp={self.sequence_parallel}")


class ReplicatedHeadsLinear(nn.Module):
    """Key/value projection when there are fewer kv heads than tp ranks: every
    rank keeps the full (K*E, D) weight and uses the rows of the one kv head
    its query heads attend with. Each rank's gradient then covers only that
    head, from its own query heads, so the weight is marked partial: summed
    over tp it is the full gradient, and every rank applies the same update."""

    def __init__(self, linear: nn.Linear, head_dim: int, head_index: int):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("ReplicatedHeadsLinear: biases are not supported")
        self.head_dim, self.head_index = head_dim, head_index
        self.weight = _mark_partial(carry_marks(nn.Parameter(linear.weight.detach().clone()), linear.weight))

    def forward(self, x):
        rows = self.weight.narrow(0, self.head_index * self.head_dim, self.head_dim)
        return F.linear(x, rows)

    def extra_repr(self):
        return f"kv head {self.head_index} of {self.weight.shape[0] // self.head_dim}, head_dim={self.head_dim}"


# -- the loss -------------------------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, targets_N, comm, group, vocab_size, ignore_index):
        n_local = logits_NV.shape[-1]
        start = group_rank(group) * n_local
        logits = logits_NV.float()
        if start + n_local > vocab_size:  # padded entries take no probability mass
            cols = torch.arange(start, start + n_local, device=logits.device)
            logits = logits.masked_fill(cols >= vocab_size, float("-inf"))
        # 1) the global max, for a stable log-sum-exp
        max_N = logits.max(dim=-1).values
        if group_size(group) > 1:
            comm.all_reduce(max_N, op=ReduceOp.MAX, group=group)
        shifted = logits - max_N.unsqueeze(-1)
        # 2) the target's shifted logit, from the rank that owns it
        valid = targets_N != ignore_index
        owned = valid & (targets_N >= start) & (targets_N < start + n_local)
        local_t = (targets_N - start).masked_fill(~owned, 0)
        target_N = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)
        target_N = _all_reduce(target_N, comm, group)
        # 3) the global sum of exponentials
        exp = shifted.exp()
        sum_exp_N = _all_reduce(exp.sum(dim=-1), comm, group)
        count = valid.sum().clamp(min=1)
        loss = ((sum_exp_N.log() - target_N) * valid).sum() / count
        softmax = exp.div_(sum_exp_N.unsqueeze(-1))
        ctx.save_for_backward(softmax, owned, local_t, valid, count)
        ctx.in_dtype = logits_NV.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, owned, local_t, valid, count = ctx.saved_tensors
        # d loss / d logits = (softmax - onehot) / count on this rank's slice
        grad = softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= owned.to(grad.dtype)
        grad.mul_((valid.to(grad.dtype) * (grad_loss / count)).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits_local, targets, comm, group, vocab_size: int | None = None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean cross entropy from vocabulary-sharded logits (Megatron-LM, Shoeybi et al., 2019).

    ``logits_local`` (..., V_local) holds rank r's slice [r*V_local, (r+1)*V_local)
    of the (padded) vocabulary; ``targets`` (...) the global ids. Three
    all-reduces over ``group`` (max, target logit, sum of exponentials) and no
    full-vocabulary tensor on any rank. Columns at or past ``vocab_size`` (the
    padding to a multiple of tp) are masked to -inf; targets equal to
    ``ignore_index`` are left out of the mean, as in ``F.cross_entropy``.
    Every tp rank returns the same value.
    """
    n_local = logits_local.shape[-1]
    if vocab_size is None:
        vocab_size = n_local * group_size(group)
    return _VocabParallelCrossEntropy.apply(
        logits_local.reshape(-1, n_local), targets.reshape(-1), comm, group, vocab_size, ignore_index
    )


# -- validation and the model transform -------------------------------------------------------


def check_tensor_parallel(model_cfg, tp: int, sequence_parallel: bool = False, seq_len: int | None = None) -> list[str]:
    """Every reason ``model_cfg`` cannot run at this tp degree (empty when it can).
    Static: runs before any process group exists. A vocabulary that is not a
    multiple of tp is padded, so it is not a problem."""
    problems = []
    if tp < 1:
        return [f"tp={tp} must be >= 1"]
    H, K = model_cfg.n_heads, model_cfg.n_kv_heads
    if H % tp:
        problems.append(f"model.n_heads={H} is not divisible by tp={tp} (attention is split by heads)")
    if model_cfg.ffn_hidden % tp:
        problems.append(f"model.ffn_hidden={model_cfg.ffn_hidden} is not divisible by tp={tp} (the MLP is split by hidden units)")
    if K % tp and tp % K:
        problems.append(
            f"model.n_kv_heads={K} and tp={tp}: kv heads must divide evenly over the ranks (n_kv_heads % tp == 0) "
            f"or be replicated (tp % n_kv_heads == 0)"
        )
    if sequence_parallel and seq_len is not None and seq_len % tp:
        problems.append(f"sequence parallel splits the sequence: seq_len={seq_len} is not divisible by tp={tp}")
    return problems


class _EnterRegion:
    """Forward pre-hook on attention / MLP: one entry collective for the
    column-parallel layers that share its input (q, k, v; gate, up)."""

    def __init__(self, comm, group, sequence_parallel):
        self.comm, self.group, self.sequence_parallel = comm, group, sequence_parallel

    def __call__(self, module, args):
        return (enter_tp_region(args[0], self.comm, self.group, self.sequence_parallel), *args[1:])


@dataclass
class TensorParallelContext:
    """What a strategy needs after ``apply_tensor_parallel``: the group and the loss."""

    comm: object
    group: object
    tp: int
    tp_rank: int
    sequence_parallel: bool
    vocab_size: int

    def loss(self, logits_local, targets):
        """Mean next-token cross entropy from the model's vocabulary-sharded logits."""
        return vocab_parallel_cross_entropy(logits_local, targets, self.comm, self.group, self.vocab_size)


def apply_tensor_parallel(model: nn.Module, mesh, comm, sequence_parallel: bool = False) -> nn.Module:
    """Swap a plain ``Transformer``'s layers for tensor-parallel ones, in place,
    over ``mesh.group("tp")``; returns the model.

    Attention: wq column-parallel by query heads; wk/wv by kv heads when
    n_kv_heads % tp == 0, else (tp % n_kv_heads == 0) each rank keeps the kv
    head its query heads use (``ReplicatedHeadsLinear``); wo row-parallel.
    MLP: gate/up column-parallel, down row-parallel. The embedding is
    vocab-parallel and the head column-parallel over the (padded) vocabulary
    with no gather, so the model returns (B, T, V_padded/tp) logits for
    ``vocab_parallel_cross_entropy``; tied embeddings stay tied (the head uses
    the embedding's shard). Under sequence parallel the residual stream and
    the norms hold (B, T/tp, D); norm weights are marked partial.

    The context (group, loss) is left on ``model.tp_context``.
    """
    if hasattr(model, "tp_context"):
        raise ValueError("apply_tensor_parallel: the model is already tensor-parallel")
    tp, group = mesh.degrees["tp"], mesh.group("tp")
    rank = group_rank(group)
    if rank != mesh.coord("tp"):
        raise RuntimeError(f"tp group rank {rank} differs from the mesh's tp coordinate {mesh.coord('tp')}")
    cfg = model.cfg
    problems = check_tensor_parallel(cfg, tp, sequence_parallel)
    if problems:
        raise ValueError("cannot apply tensor parallelism:\n  " + "\n  ".join(problems))
    sp = sequence_parallel
    # A part of the model (a pipeline stage) may lack either end.
    tied = model.head is not None and model.embed is not None and model.head.weight is model.embed.weight
    if model.embed is not None:
        model.embed = VocabParallelEmbedding(model.embed, comm, group, sequence_parallel=sp)
    if model.head is not None:
        head_weight = model.embed.weight if tied else None
        model.head = ColumnParallelLinear(model.head, comm, group, sequence_parallel=sp, weight=head_weight)

    K, H, E = cfg.n_kv_heads, cfg.n_heads, cfg.head_dim
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        col = dict(sequence_parallel=sp, enter_region=False)
        attn.wq = ColumnParallelLinear(attn.wq, comm, group, **col)
        if K % tp == 0:
            attn.wk = ColumnParallelLinear(attn.wk, comm, group, **col)
            attn.wv = ColumnParallelLinear(attn.wv, comm, group, **col)
        else:  # tp % K == 0: tp/K consecutive ranks share kv head rank // (tp/K)
            head = rank // (tp // K)
            attn.wk = ReplicatedHeadsLinear(attn.wk, E, head)
            attn.wv = ReplicatedHeadsLinear(attn.wv, E, head)
        attn.wo = RowParallelLinear(attn.wo, comm, group, sequence_parallel=sp)
        attn.n_heads, attn.n_kv_heads = H // tp, max(K // tp, 1)
        regions = [attn]
        if isinstance(mlp, SwiGLU):  # a mixture of experts stays whole on every tp rank (replicated)
            mlp.gate = ColumnParallelLinear(mlp.gate, comm, group, **col)
            mlp.up = ColumnParallelLinear(mlp.up, comm, group, **col)
            mlp.down = RowParallelLinear(mlp.down, comm, group, sequence_parallel=sp)
            regions.append(mlp)
        for module in regions:
            module.register_forward_pre_hook(_EnterRegion(comm, group, sp))
        if sp:
            _mark_partial(block.attn_norm.weight)
            _mark_partial(block.mlp_norm.weight)
    if sp and model.norm is not None:
        _mark_partial(model.norm.weight)
    model.tp_context = TensorParallelContext(comm, group, tp, rank, sp, cfg.vocab_size)
    return model


def tensor_parallel_transform(strategy, model: nn.Module) -> nn.Module:
    """The strategy's tp transform: ``apply_tensor_parallel`` when tp > 1, the
    vocabulary-parallel loss, tp among the axes the gradient norm sums over,
    and the loss counted once per tp group (every tp rank computes the same)."""
    mesh = strategy.mesh
    if mesh.degrees["tp"] == 1:
        return model
    apply_tensor_parallel(model, mesh, strategy.comm, sequence_parallel=bool(strategy.options.get("sp", False)))
    strategy.loss_fn = model.tp_context.loss
    strategy.model_axes.append("tp")
    strategy.loss_counts = strategy.loss_counts and mesh.coord("tp") == 0
    strategy.eval_loss_counts = strategy.eval_loss_counts and mesh.coord("tp") == 0
    if model.tp_context.sequence_parallel:
        strategy.seq_parts *= mesh.degrees["tp"]
    return model


__all__ = [
    "ColumnParallelLinear",
    "ReplicatedHeadsLinear",
    "RowParallelLinear",
    "TPShard",
    "TensorParallelContext",
    "VocabParallelEmbedding",
    "apply_tensor_parallel",
    "check_tensor_parallel",
    "copy_to_tp_region",
    "enter_tp_region",
    "exit_tp_region",
    "full_tp_parameters",
    "gather_from_sequence_region",
    "gather_from_tp_region",
    "gather_tp_tensor",
    "is_tp_partial",
    "load_full_tp_parameters",
    "reduce_from_tp_region",
    "reduce_scatter_to_sequence_region",
    "reduce_tp_partial_grads",
    "scatter_to_tp_region",
    "shard_full_tensor",
    "tp_grads_for_norm",
    "tensor_parallel_transform",
    "tp_shard_spec",
    "vocab_parallel_cross_entropy",
]
