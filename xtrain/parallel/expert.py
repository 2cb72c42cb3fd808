"""Mixture-of-experts training: global-batch load balancing for every strategy,
and expert parallelism over the ``ep`` axis.

Balancing (``moe_transform``, whenever the model has MoE layers). The
load-balancing statistics are the step's, summed over every data-parallel rank
and micro-batch (global-batch balancing, Qiu et al., arXiv:2501.11873), so the
aux loss and training are the same at any world size and micro-batch count:

- f_i (each expert's share of assignments) must be known before any backward;
  when one forward does not see the whole step (micro-batches > 1, or several
  data ranks) and the aux loss is on, a no-grad forward of this rank's batch
  counts them first and one all-reduce sums them over the data axes. Routing
  is per token, so those counts are exact. It is a whole forward (each
  layer's routing depends on the layers before it), dispatch exchanges
  included: under ep about +50% of the step's all-to-all bytes, measured in
  docs/expert-parallel.md.
- each layer then adds its share coef·E·Σ f_i·prob_sum_i/N + z_coef·z_sum/N
  (N the step's global tokens) to its own backward (``AttachLoss``); the
  shares sum to the global loss, and their gradient is scaled by the number
  of data ranks to undo the data-parallel average.
- after the optimizer step one all-reduce gives the global load per layer:
  the metrics (aux and z loss, dropped fraction, tokens per expert) and
  sigmoid_bias's update (DeepSeek-V3's aux-loss-free balancing).

Expert parallelism (``expert_parallel_transform``, ep > 1) borrows its ranks
from data parallelism (torchtitan, Megatron): ep ranks see different tokens,
each holds n_experts/ep experts (``Shard(0)`` on ep), dense weights stay
replicated. Gradients: dense ones average over dp × cp × ep; an expert's over
dp × cp (its replicas), scaled by 1/ep, since its holder already summed the
shares of all its ep peers' tokens. Dispatch (``strategy.ep_dispatch``):

- ``alltoall`` (GShard, arXiv:2006.16668; Megatron's alltoall dispatcher):
  sort assignments by expert, exchange counts, all-to-all the tokens with
  uneven splits, regroup by local expert, run the experts, and undo every step;
  each of the layer's four token exchanges (two forward, two backward) moves
  about top_k·N·D·(ep-1)/ep elements each way (``formulas.ep_dispatch_bytes``);
- ``allgather``: all-gather every ep rank's tokens and gates, run the local
  experts on the assignments that are theirs, reduce-scatter the outputs back.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from xtrain.comm import ReduceOp
from xtrain.model.moe import (
    LocalDispatcher,
    MoE,
    aux_loss,
    combine,
    sort_by_expert,
    z_loss,
)
from xtrain.parallel import placement as pl

DISPATCHERS = ("alltoall", "allgather")


def moe_modules(model: nn.Module) -> dict[int, MoE]:
    """This rank's MoE layers by block index (a module shared by two stages once)."""
    found: dict[int, MoE] = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE) and (hit := re.search(r"blocks\.(\d+)\.mlp$", name)):
            found.setdefault(int(hit.group(1)), m)
    return found


# -- balancing ---------------------------------------------------------------------------------


class MoEBalance:
    """The step hook of global-batch balancing (module docstring)."""

    def __init__(self, strategy, layers: dict[int, MoE]):
        self.s, self.layers = strategy, dict(sorted(layers.items()))
        self.cfg = next(iter(self.layers.values())).cfg
        self.all_layers = [i for i in range(self.cfg.n_layers) if self.cfg.is_moe_layer(i)]
        self.counting, self.counted, self.fixed = False, {}, None
        self.acc: dict[int, list] = {}
        self.n_global = 0
        for m in self.layers.values():
            m.loss_hook = self._hook

    def begin(self, x, y, micro_batches: int, autocast) -> None:
        self.acc, self.fixed, self.counted = {}, None, {}
        self.n_global = x.numel() * self.s.data_size  # every rank holds as many tokens
        if self.cfg.aux_loss_coef > 0 and (micro_batches > 1 or self.s.data_size > 1):
            self.counting = True
            try:
                with torch.no_grad(), autocast:
                    self.s.runner.eval_loss(x, y)
            finally:
                self.counting = False
            counts = torch.stack([self.counted[id(m)] for m in self.layers.values()]).to(torch.float64)
            self.s.comm.all_reduce(counts, op=ReduceOp.SUM, group=self.s.data_group)
            self.fixed = {id(m): c for m, c in zip(self.layers.values(), counts)}

    def _hook(self, module: MoE, stats):
        if self.counting:
            self.counted[id(module)] = self.counted.get(id(module), 0) + stats.counts
            return None
        if not torch.is_grad_enabled():  # evaluation
            return None
        row = self.acc.setdefault(id(module), [0, 0, 0, 0])
        for j, v in enumerate((stats.counts, stats.prob_sum.detach(), stats.z_sum.detach(), stats.dropped)):
            row[j] = row[j] + v
        cfg, n = self.cfg, self.n_global
        if not (cfg.aux_loss_coef or cfg.z_loss_coef):
            return None
        counts = self.fixed[id(module)] if self.fixed is not None else stats.counts
        share = cfg.aux_loss_coef * aux_loss(counts, stats.prob_sum, n, cfg.n_experts, cfg.top_k)
        share = share + cfg.z_loss_coef * z_loss(stats.z_sum, n)
        return share, float(self.s.data_size)

    @torch.no_grad()
    def end(self) -> dict:
        cfg, E = self.cfg, self.cfg.n_experts
        device = next(iter(self.layers.values())).router.weight.device
        table = torch.zeros(len(self.all_layers), 2 * E + 2, dtype=torch.float64, device=device)
        for i, m in self.layers.items():
            counts, prob, z, dropped = self.acc.get(id(m), [0, 0, 0, 0])
            r = self.all_layers.index(i)
            table[r, :E] += counts if torch.is_tensor(counts) else 0
            table[r, E : 2 * E] += prob if torch.is_tensor(prob) else 0
            table[r, 2 * E] += z
            table[r, 2 * E + 1] += dropped
        self.s.comm.all_reduce(table, op=ReduceOp.SUM, group=self.s.data_group)
        if self.s.mesh.degrees["pp"] > 1:  # each stage holds its layers: fill in the others'
            self.s.comm.all_reduce(table, op=ReduceOp.SUM, group=self.s.mesh.group("pp"))
        for i, m in self.layers.items():
            m.update_bias(table[self.all_layers.index(i), :E].to(torch.float32))
        n = max(self.n_global, 1)
        counts, prob = table[:, :E], table[:, E : 2 * E]
        aux = (E * (counts / (n * cfg.top_k)) * (prob / n)).sum().item()
        return {
            "moe_aux_loss": aux,  # sum over layers of E·Σ f_i·P_i (1 per layer when balanced), before its coefficient
            "moe_z_loss": (table[:, 2 * E] / n).sum().item(),
            "moe_dropped_frac": (table[:, 2 * E + 1].sum() / (n * cfg.top_k * len(self.all_layers))).item(),
            "moe_tokens_per_expert": counts.round().long().tolist(),  # per MoE layer, in layer order
        }


def moe_transform(strategy, model: nn.Module) -> nn.Module:
    """Install global-batch balancing when the model has MoE layers (any strategy)."""
    layers = moe_modules(model)
    for m in layers.values():
        if m.router.expert_bias is not None:  # saved by whoever holds the router (its stage)
            pl.carry_marks(m.router.expert_bias, m.router.weight)
    if layers:
        strategy.step_hooks.append(MoEBalance(strategy, layers))
    return model


# -- dispatch over ep ---------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, comm, group):
        ctx.splits, ctx.comm, ctx.group = (out_splits, in_splits), comm, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        comm.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        back = g.new_empty((sum(in_splits), *g.shape[1:]))
        ctx.comm.all_to_all_single(back, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None, None


class _Gather(torch.autograd.Function):
    """All-gather along dim 0; backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x, comm, group, n):
        ctx.comm, ctx.group, ctx.n = comm, group, n
        out = x.new_empty((n * x.shape[0], *x.shape[1:]))
        comm.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty((g.shape[0] // ctx.n, *g.shape[1:]))
        ctx.comm.reduce_scatter_tensor(out, g.contiguous(), op=ReduceOp.SUM, group=ctx.group)
        return out, None, None, None


class _ReduceScatter(torch.autograd.Function):
    """Reduce-scatter (sum) along dim 0; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, comm, group, n):
        ctx.comm, ctx.group, ctx.n = comm, group, n
        out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
        comm.reduce_scatter_tensor(out, x.contiguous(), op=ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty((ctx.n * g.shape[0], *g.shape[1:]))
        ctx.comm.all_gather_into_tensor(out, g.contiguous(), group=ctx.group)
        return out, None, None, None


class AllToAllDispatcher:
    """Tokens travel to the ranks holding their experts and back (module docstring)."""

    def __init__(self, comm, group, ep: int, ep_rank: int, n_experts: int):
        self.comm, self.group, self.ep, self.rank, self.E = comm, group, ep, ep_rank, n_experts

    def __call__(self, x_ND, expert_idx, gates, experts):
        ep, k, local = self.ep, expert_idx.shape[1], self.E // self.ep
        order, counts = sort_by_expert(expert_idx, self.E)  # by expert, so by destination rank
        x_sorted = x_ND[order // k]
        got = torch.empty_like(counts)  # got[s·local + e]: what rank s sends my expert e
        self.comm.all_to_all_single(got, counts, group=self.group)
        got = got.view(ep, local)
        in_splits, out_splits = counts.view(ep, local).sum(1).tolist(), got.sum(1).tolist()
        x_recv = _AllToAll.apply(x_sorted, out_splits, in_splits, self.comm, self.group)
        # received by source rank, then expert: regroup by local expert (source order
        # inside), one stable sort on each row's (expert, source) key, no host syncs
        key = torch.arange(local, device=got.device).repeat(ep) * ep + torch.arange(ep, device=got.device).repeat_interleave(local)
        perm = torch.argsort(key.repeat_interleave(got.reshape(-1)), stable=True)
        y_local = experts.run(x_recv[perm], got.sum(0))
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        y_sorted = _AllToAll.apply(y_local[inverse], in_splits, out_splits, self.comm, self.group)
        return combine(y_sorted, order, gates)


class AllGatherDispatcher:
    """Every ep rank's tokens gathered, local experts applied, outputs reduce-scattered."""

    def __init__(self, comm, group, ep: int, ep_rank: int, n_experts: int):
        self.comm, self.group, self.ep, self.rank, self.E = comm, group, ep, ep_rank, n_experts

    def __call__(self, x_ND, expert_idx, gates, experts):
        ep, local = self.ep, self.E // self.ep
        x_all = _Gather.apply(x_ND, self.comm, self.group, ep)
        g_all = _Gather.apply(gates, self.comm, self.group, ep)
        idx_all = expert_idx.new_empty((ep * expert_idx.shape[0], expert_idx.shape[1]))
        self.comm.all_gather_into_tensor(idx_all, expert_idx.contiguous(), group=self.group)
        lo = self.rank * local
        mine = (idx_all >= lo) & (idx_all < lo + local)
        y_all = LocalDispatcher()(x_all, torch.where(mine, idx_all - lo, -1), g_all, experts)
        return _ReduceScatter.apply(y_all, self.comm, self.group, ep)


def expert_parallel_transform(strategy, model: nn.Module) -> nn.Module:
    """Shard every MoE layer's experts over ep and swap its dispatcher."""
    mesh = strategy.mesh
    ep = mesh.degrees["ep"]
    if ep == 1:
        return model
    r, group = mesh.coord("ep"), mesh.group("ep")
    kind = str(strategy.options.get("ep_dispatch", "alltoall"))
    cls = AllToAllDispatcher if kind == "alltoall" else AllGatherDispatcher
    for m in moe_modules(model).values():
        E = m.n_experts
        local = E // ep
        for name in ("gate", "up", "down"):
            old = getattr(m.experts, name)
            new = nn.Parameter(old.detach()[r * local : (r + 1) * local].clone())
            pl.carry_marks(new, old)
            pl.mark(new, "ep", pl.Shard(0, ep, r, E))
            setattr(m.experts, name, new)
        m.dispatcher = cls(strategy.comm, group, ep, r, E)
    strategy.batch_axes.append("ep")  # ep ranks see different tokens,
    strategy.data_axes.append("ep")  # so each one's loss is a share,
    strategy.model_axes.append("ep")  # and the experts are split over them
    return model


def check_expert_parallel(options, ep: int, model_cfg, sp: bool = False) -> list[str]:
    """Every reason this ep / MoE configuration cannot run (static)."""
    problems = []
    dispatch = str(options.get("ep_dispatch", "alltoall"))
    if dispatch not in DISPATCHERS:
        problems.append(f"strategy.ep_dispatch={dispatch!r} is not one of {list(DISPATCHERS)}")
    if model_cfg is None:
        return problems
    if ep > 1 and not model_cfg.n_experts:
        problems.append(f"strategy.ep={ep} needs a mixture-of-experts model (model.n_experts > 0, e.g. model=tiny_moe)")
    elif ep > 1 and model_cfg.n_experts % ep:
        problems.append(f"model.n_experts={model_cfg.n_experts} is not divisible by ep={ep} (experts are split over ep)")
    if sp and model_cfg.n_experts:
        problems.append("strategy.sp=true with a mixture-of-experts model is not supported yet (experts stay whole on tp ranks)")
    return problems
