"""``comm=torch``: torch.distributed's built-in collectives behind xtrain's interface.

The reference the hand-written implementation is tested and benchmarked
against. Bytes in the ledger are the ring algorithm's per-rank figures for S
bytes on n ranks (nccl-tests' convention; ``xtrain.formulas``), since the
backend does not report its own traffic.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed import ReduceOp

from xtrain import formulas
from xtrain.comm.base import Comm, nbytes
from xtrain.comm.groups import SOLO, group_rank, group_ranks, group_size

# Newer torch names these ``*_single`` and warns on the older names; older torch has only the older ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _pg(group):
    return None if group is SOLO else group


def _done():
    return None


def _chain_hops(ranks, me, root, into_root=False) -> int:
    """Links between global ranks ``me`` and ``root`` along a chain in group order:
    from the root (root -> root+1 -> ...) or, ``into_root``, to it (root+1 -> ...
    -> root); -1, neither end of the chain, when ``me`` is not a member."""
    r = ranks.index(root)
    if me not in ranks:
        return -1
    pos = (ranks.index(me) - r) % len(ranks)
    return -pos % len(ranks) if into_root else pos


class TorchComm(Comm):
    name = "torch"

    def _issue(self, op, group, sent, recv, call, async_op):
        """``call(async_op=True)`` returns a torch Work; wrap it for our ledger."""

        def run():
            work = call()
            return work.wait if work is not None else _done

        return self._timed(op, group, sent, recv, run, async_op)

    def all_reduce(self, tensor, op=ReduceOp.SUM, group=None, async_op=False):
        n = group_size(group)
        if group is SOLO:
            return self._timed("all_reduce", group, 0, 0, lambda: _done, async_op)
        s = formulas.ring_bytes("all_reduce", nbytes(tensor), n)
        return self._issue(
            "all_reduce", group, s, s, lambda: dist.all_reduce(tensor, op=op, group=group, async_op=True), async_op
        )

    def reduce_scatter_tensor(self, output, input, op=ReduceOp.SUM, group=None, async_op=False):
        n = group_size(group)
        if group is SOLO:
            return self._timed("reduce_scatter", group, 0, 0, lambda: (output.copy_(input), _done)[1], async_op)
        s = formulas.ring_bytes("reduce_scatter", nbytes(input), n)
        return self._issue(
            "reduce_scatter",
            group,
            s,
            s,
            lambda: _reduce_scatter(output, input, op=op, group=group, async_op=True),
            async_op,
        )

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        n = group_size(group)
        if group is SOLO:
            return self._timed(
                "all_gather", group, 0, 0, lambda: (output_tensor.copy_(input_tensor.view_as(output_tensor)), _done)[1], async_op
            )
        s = formulas.ring_bytes("all_gather", nbytes(output_tensor), n)
        return self._issue(
            "all_gather",
            group,
            s,
            s,
            lambda: _all_gather(output_tensor, input_tensor, group=group, async_op=True),
            async_op,
        )

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        n = group_size(group)
        if group is SOLO:
            return self._timed("all_gather", group, 0, 0, lambda: (tensor_list[0].copy_(tensor), _done)[1], async_op)
        s = formulas.ring_bytes("all_gather", nbytes(tensor) * n, n)
        return self._issue(
            "all_gather", group, s, s, lambda: dist.all_gather(tensor_list, tensor, group=group, async_op=True), async_op
        )

    def broadcast(self, tensor, src, group=None, async_op=False):
        if group is SOLO:
            return self._timed("broadcast", group, 0, 0, lambda: _done, async_op)
        ranks = group_ranks(group)
        hops = _chain_hops(ranks, dist.get_rank(), src)  # the chain src -> src+1 -> ...
        sent, recv, _ = formulas.chain_broadcast_traffic(nbytes(tensor), len(ranks), hops)
        return self._issue(
            "broadcast", group, sent, recv, lambda: dist.broadcast(tensor, src, group=group, async_op=True), async_op
        )

    def reduce(self, tensor, dst, op=ReduceOp.SUM, group=None, async_op=False):
        if group is SOLO:
            return self._timed("reduce", group, 0, 0, lambda: _done, async_op)
        ranks = group_ranks(group)
        hops = _chain_hops(ranks, dist.get_rank(), dst, into_root=True)  # the chain dst+1 -> ... -> dst
        sent, recv, _ = formulas.chain_reduce_traffic(nbytes(tensor), len(ranks), hops)
        return self._issue(
            "reduce", group, sent, recv, lambda: dist.reduce(tensor, dst, op=op, group=group, async_op=True), async_op
        )

    def gather(self, tensor, gather_list=None, dst=0, group=None, async_op=False):
        if group is SOLO:
            return self._timed("gather", group, 0, 0, lambda: (gather_list[0].copy_(tensor), _done)[1], async_op)
        root = dist.get_rank() == dst
        sent, recv, _ = formulas.gather_traffic(nbytes(tensor), group_size(group), root)
        return self._issue(
            "gather",
            group,
            sent,
            recv,
            lambda: dist.gather(tensor, gather_list if root else None, dst=dst, group=group, async_op=True),
            async_op,
        )

    def scatter(self, tensor, scatter_list=None, src=0, group=None, async_op=False):
        if group is SOLO:
            return self._timed("scatter", group, 0, 0, lambda: (tensor.copy_(scatter_list[0]), _done)[1], async_op)
        root = dist.get_rank() == src
        sent, recv, _ = formulas.scatter_traffic(nbytes(tensor), group_size(group), root)
        return self._issue(
            "scatter",
            group,
            sent,
            recv,
            lambda: dist.scatter(tensor, scatter_list if root else None, src=src, group=group, async_op=True),
            async_op,
        )

    def all_to_all_single(
        self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        if group is SOLO:
            return self._timed("all_to_all", group, 0, 0, lambda: (output.copy_(input), _done)[1], async_op)
        n, me = group_size(group), group_rank(group)
        row_in = nbytes(input) // max(input.shape[0], 1) if input.dim() else 0
        row_out = nbytes(output) // max(output.shape[0], 1) if output.dim() else 0
        in_splits = input_split_sizes or [input.shape[0] // n] * n
        out_splits = output_split_sizes or [output.shape[0] // n] * n
        sent = formulas.all_to_all_bytes(in_splits, me) * row_in
        recv = formulas.all_to_all_bytes(out_splits, me) * row_out
        return self._issue(
            "all_to_all",
            group,
            sent,
            recv,
            lambda: dist.all_to_all_single(
                output, input, output_split_sizes, input_split_sizes, group=group, async_op=True
            ),
            async_op,
        )

    def all_to_all(self, output_tensor_list, input_tensor_list, group=None, async_op=False):
        if group is SOLO:
            return self._timed(
                "all_to_all", group, 0, 0, lambda: (output_tensor_list[0].copy_(input_tensor_list[0]), _done)[1], async_op
            )
        me = group_rank(group)
        sent = formulas.all_to_all_bytes([nbytes(t) for t in input_tensor_list], me)
        recv = formulas.all_to_all_bytes([nbytes(t) for t in output_tensor_list], me)
        return self._issue(
            "all_to_all",
            group,
            sent,
            recv,
            lambda: dist.all_to_all(output_tensor_list, input_tensor_list, group=group, async_op=True),
            async_op,
        )

    def barrier(self, group=None, async_op=False):
        if group is SOLO:
            return self._timed("barrier", group, 0, 0, lambda: _done, async_op)
        return self._issue("barrier", group, 0, 0, lambda: dist.barrier(group=group, async_op=True), async_op)

    def send(self, tensor, dst, group=None, tag=0):
        self.isend(tensor, dst, group, tag).wait()

    def recv(self, tensor, src=None, group=None, tag=0):
        """Blocking receive; returns the sender's global rank (any sender when ``src`` is None)."""
        sender = []

        def run():
            sender.append(dist.recv(tensor, src, group=_pg(group), tag=tag))
            return _done

        self._timed("recv", group, 0, nbytes(tensor), run, False)
        return sender[0]

    def isend(self, tensor, dst, group=None, tag=0):
        return self._issue(
            "send", group, nbytes(tensor), 0, lambda: dist.isend(tensor, dst, group=_pg(group), tag=tag), True
        )

    def irecv(self, tensor, src=None, group=None, tag=0):
        return self._issue(
            "recv", group, 0, nbytes(tensor), lambda: dist.irecv(tensor, src, group=_pg(group), tag=tag), True
        )


