"""Causal attention over a sequence spread across the ranks of the cp axis:
three exact algorithms behind one call, ``context_attention(q, k, v, cp, variant)``.

Every rank holds queries, keys and values of its own columns (``layout.py``):
q (B,H,Tl,E), k and v (B,K,Tl,E), with Tl = T/cp. Grouped-query attention
moves only the K kv heads; they are repeated (if at all) inside the kernel.

- ``ring`` (Liu et al., "Ring Attention", arXiv:2310.01889): k and v travel
  once around the ring, one async P2P exchange per step posted before that
  step's blocks are computed, so the transfer hides behind them; partial
  results merge through the log-sum-exp in fp32. Backward sends k and v
  around again, with the dK/dV accumulators one step behind, arriving home
  after cp hops (ring-flash-attention's scheme).
- ``allgather`` (the Llama 3 recipe, arXiv:2407.21783 §3.3.2): all-gather k
  and v, attend locally block by block, reduce-scatter dK/dV in backward.
- ``ulysses`` (Jacobs et al., DeepSpeed-Ulysses, arXiv:2309.14509): all-to-all
  from sequence-sharded to head-sharded (every rank the whole sequence for
  H/cp query and K/cp kv heads), plain causal attention, all-to-all back.

Per layer and rank, bytes sent are in ``xtrain.formulas.cp_attention_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xtrain.comm import ReduceOp
from xtrain.parallel.context.kernels import (
    attend,
    attend_backward,
    attend_causal_tiled,
    attend_causal_tiled_backward,
    merge_,
    uses_math,
)
from xtrain.parallel.context.layout import SequenceLayout

VARIANTS = ("ring", "allgather", "ulysses")
TAG_KV, TAG_DKV = 1, 2  # P2P tags of the ring (its own cp group; one of each in flight per pair)


@dataclass(frozen=True)
class CPGroup:
    """This rank's view of its cp line."""

    comm: object
    group: object
    rank: int  # coordinate on cp
    size: int
    prev: int  # global ranks of the ring neighbours
    next: int
    layout: SequenceLayout
    kernel: str = "auto"

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, tag: int):
        """Send ``send`` to the next rank and receive the previous rank's into ``recv``."""
        return [
            self.comm.isend(send, dst=self.next, group=self.group, tag=tag),
            self.comm.irecv(recv, src=self.prev, group=self.group, tag=tag),
        ]


def context_attention(q, k, v, cp: CPGroup, variant: str = "ring", return_lse: bool = False):
    """Causal attention of this rank's queries over the whole sequence's keys and
    values; (out, lse) when ``return_lse`` (lse (B,H,Tl) fp32, not differentiable)."""
    if variant == "ring":
        out, lse = _Ring.apply(q, k, v, cp)
    elif variant == "allgather":
        out, lse = _AllGather.apply(q, k, v, cp)
    elif variant == "ulysses":
        qh, kh, vh = (_Exchange.apply(t, cp, _seq_to_heads, _heads_to_seq) for t in (q, k, v))
        out_h, lse_h = _LocalCausal.apply(qh, kh, vh, cp.kernel, cp.size)
        out = _Exchange.apply(out_h, cp, _heads_to_seq, _seq_to_heads)
        lse = _heads_to_seq(lse_h.unsqueeze(-1), cp).squeeze(-1) if return_lse else None
    else:
        raise ValueError(f"strategy.cp_attn={variant!r} is not one of {list(VARIANTS)}")
    return (out, lse) if return_lse else out


# -- blocks -----------------------------------------------------------------------------


def _blocks(cp: CPGroup, src: int, local_len: int):
    c = local_len // cp.layout.chunks_per_rank
    return [b.scaled(c) for b in cp.layout.plan(cp.rank, src)]


def _forward_blocks(q, k, v, cp, src, out, lse, scale) -> None:
    """Fold the blocks of kv rank ``src`` into (out, lse); the own block (always
    first: one causal block over every row) initialises them."""
    for qs, ks, causal in _blocks(cp, src, q.shape[2]):
        o_b, l_b = attend(q[:, :, qs].contiguous(), k[:, :, ks].contiguous(), v[:, :, ks].contiguous(), causal, scale, cp.kernel)
        if src == cp.rank:
            out.copy_(o_b)
            lse.copy_(l_b)
        else:
            merge_(out[:, :, qs], lse[:, :, qs], o_b, l_b)


def _backward_blocks(dout, q, k, v, out, lse, cp, src, dq, dkv, scale) -> None:
    """Add the blocks of kv rank ``src`` to dq and to that rank's dk/dv (``dkv``)."""
    for qs, ks, causal in _blocks(cp, src, q.shape[2]):
        dq_b, dk_b, dv_b = attend_backward(
            dout[:, :, qs].contiguous(), q[:, :, qs].contiguous(), k[:, :, ks].contiguous(), v[:, :, ks].contiguous(),
            out[:, :, qs].contiguous(), lse[:, :, qs].contiguous(), causal, scale, cp.kernel,
        )
        dq[:, :, qs] += dq_b
        dkv[0][:, :, ks] += dk_b
        dkv[1][:, :, ks] += dv_b


def _start(q):
    B, H, T, E = q.shape
    out = torch.empty(B, H, T, E, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    return out, lse, E**-0.5


# -- ring -------------------------------------------------------------------------------


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: CPGroup):
        out, lse, scale = _start(q)
        bufs = [torch.stack([k, v]), None]  # one message per step: k and v together
        bufs[1] = torch.empty_like(bufs[0])
        for s in range(cp.size):
            cur = bufs[s % 2]
            works = cp.exchange(cur, bufs[(s + 1) % 2], TAG_KV) if s + 1 < cp.size else []
            _forward_blocks(q, cur[0], cur[1], cp, (cp.rank - s) % cp.size, out, lse, scale)
            for w in works:
                w.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cp = cp
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        cp, n, scale = ctx.cp, ctx.cp.size, q.shape[-1] ** -0.5
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        bufs = [torch.stack([k, v]), None]
        bufs[1] = torch.empty_like(bufs[0])
        incoming, sends = None, []
        for s in range(n):
            cur = bufs[s % 2]
            works = cp.exchange(cur, bufs[(s + 1) % 2], TAG_KV) if s + 1 < n else []
            part = torch.zeros(cur.shape, dtype=torch.float32, device=q.device)
            _backward_blocks(dout, q, cur[0], cur[1], out, lse, cp, (cp.rank - s) % n, dq, part, scale)
            if incoming is not None:  # the accumulator of this block from the ranks that held it before
                buf, w = incoming
                w.wait()
                part += buf
            # pass it on; receive the next block's (after the last step: our own, complete)
            buf = torch.empty_like(part)
            send, recv = cp.exchange(part, buf, TAG_DKV)
            sends.append(send)
            incoming = (buf, recv)
            for w in works:
                w.wait()
        dkv, w = incoming
        w.wait()
        for w in sends:
            w.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


# -- all-gather -------------------------------------------------------------------------


def _order(cp: CPGroup):
    """kv ranks in the order their blocks are folded in: the own block first."""
    return [(cp.rank - s) % cp.size for s in range(cp.size)]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: CPGroup):
        kv = torch.stack([k, v])
        # concatenated along dim 0 (gloo takes no stacked output), then viewed per rank
        flat = torch.empty((cp.size * 2, *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
        cp.comm.all_gather_into_tensor(flat, kv, group=cp.group)
        gathered = flat.view(cp.size, *kv.shape)
        out, lse, scale = _start(q)
        for src in _order(cp):
            _forward_blocks(q, gathered[src, 0], gathered[src, 1], cp, src, out, lse, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, gathered, out, lse)
        ctx.cp = cp
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, gathered, out, lse = ctx.saved_tensors
        cp, scale = ctx.cp, q.shape[-1] ** -0.5
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv_all = torch.zeros(gathered.shape, dtype=torch.float32, device=q.device)
        for src in _order(cp):
            _backward_blocks(dout, q, gathered[src, 0], gathered[src, 1], out, lse, cp, src, dq, dkv_all[src], scale)
        dkv = torch.empty(gathered.shape[1:], dtype=torch.float32, device=q.device)
        cp.comm.reduce_scatter_tensor(dkv, dkv_all.flatten(0, 1), op=ReduceOp.SUM, group=cp.group)
        return dq.to(q.dtype), dkv[0].to(gathered.dtype), dkv[1].to(gathered.dtype), None


# -- Ulysses ----------------------------------------------------------------------------


def _seq_to_heads(x: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """(B, h·cp, Tl, E) sequence-sharded -> (B, h, T, E) head-sharded, in position order."""
    B, H, Tl, E = x.shape
    n = cp.size
    parts = x.reshape(B, n, H // n, Tl, E).transpose(0, 1).contiguous()  # part j -> rank j
    got = torch.empty_like(parts)  # got[j]: rank j's columns of this rank's heads
    cp.comm.all_to_all_single(got, parts, group=cp.group)
    z = got.permute(1, 2, 0, 3, 4).reshape(B, H // n, n * Tl, E)
    return z.index_select(2, cp.layout.natural_order(n * Tl).to(z.device))


def _heads_to_seq(z: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """The inverse of ``_seq_to_heads``."""
    B, h, T, E = z.shape
    n = cp.size
    order = cp.layout.natural_order(T).to(z.device)
    ranked = torch.empty_like(z).index_copy_(2, order, z)  # back to rank-order columns
    parts = ranked.reshape(B, h, n, T // n, E).permute(2, 0, 1, 3, 4).contiguous()  # part j: rank j's columns
    got = torch.empty_like(parts)  # got[j]: this rank's columns of rank j's heads
    cp.comm.all_to_all_single(got, parts, group=cp.group)
    return got.transpose(0, 1).reshape(B, n * h, T // n, E)


class _Exchange(torch.autograd.Function):
    """``there(x, cp)`` forward, its inverse ``back`` backward (the all-to-all pair)."""

    @staticmethod
    def forward(ctx, x, cp, there, back):
        ctx.cp, ctx.back = cp, back
        return there(x, cp)

    @staticmethod
    def backward(ctx, g):
        return ctx.back(g.contiguous(), ctx.cp), None, None, None


class _LocalCausal(torch.autograd.Function):
    """Whole-sequence causal attention through the same kernel (lse kept for tests).
    A fused kernel tiles by itself; the math path runs in ``tiles`` × ``tiles``
    blocks, so no rank ever holds a T × T score matrix."""

    @staticmethod
    def forward(ctx, q, k, v, kernel, tiles):
        ctx.tiles = tiles if uses_math(q, kernel) else 1
        out, lse = attend_causal_tiled(q, k, v, ctx.tiles, q.shape[-1] ** -0.5, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kernel = kernel
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attend_causal_tiled_backward(dout, q, k, v, out, lse, ctx.tiles, q.shape[-1] ** -0.5, ctx.kernel)
        return dq, dk, dv, None, None
