"""``comm=torch``: torch.distributed's built-in collectives behind xtrain's interface.

The reference the hand-written implementation is tested and benchmarked
against. Bytes in the ledger are the ring algorithm's per-rank figures for S
bytes on n ranks (nccl-tests' convention; ``xtrain.formulas``), since the
backend does not report its own traffic.

Async calls hand back xtrain's handle, completed from the backend work's own
future (``Work.get_future().then``), so they too are recorded when they
finish, waited on or not.
"""

from __future__ import annotations

import torch.distributed as dist

from xtrain import formulas
from xtrain.comm.base import WAITERS, CollectiveTimeout, Comm, nbytes
from xtrain.comm.groups import SOLO, group_label, group_rank, group_ranks, group_size

# Newer torch names these ``*_single`` and warns on the older names; older torch has only the older ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _chain_hops(ranks, me, root, into_root=False) -> int:
    """Links between global ranks ``me`` and ``root`` along a chain in group order:
    from the root (root -> root+1 -> ...) or, ``into_root``, to it (root+1 -> ...
    -> root); -1, neither end of the chain, when ``me`` is not a member."""
    r = ranks.index(root)
    if me not in ranks:
        return -1
    pos = (ranks.index(me) - r) % len(ranks)
    return -pos % len(ranks) if into_root else pos




def _wait_then(work, done, result) -> None:
    try:
        work.wait()
    except BaseException as e:  # noqa: BLE001 - handed to wait()
        done(e)
        return
    done(None, result)


class TorchComm(Comm):
    name = "torch"

    def _issue(self, op, group, sent, recv, call, async_op, result=None):
        """``call()`` issues the built-in with ``async_op=True`` and returns its work."""
        if not async_op:
            return self._run_sync(op, group, lambda: call().wait(), sent, recv)

        def start(done):
            work = call()
            try:
                fut = work.get_future()
            except RuntimeError:  # a backend work without a future (gloo's list reduce_scatter): wait for it
                WAITERS.submit(lambda: _wait_then(work, done, result))
                return

            def on_complete(f):
                try:
                    value = f.value()
                except BaseException as e:  # noqa: BLE001 - handed to wait()
                    done(e)
                    return
                done(None, value if value is not None else result)

            fut.then(on_complete)

        return self._start_async(op, group, start, result, sent, recv)

    def _solo(self, op, group, fn, async_op, result=None):
        if not async_op:
            return self._run_sync(op, group, fn)

        def start(done):
            fn()
            done()

        return self._start_async(op, group, start, result)

    def _all_reduce(self, tensor, op, group, async_op):
        if group is SOLO:
            return self._solo("all_reduce", group, lambda: None, async_op, [tensor])
        s = formulas.ring_bytes("all_reduce", nbytes(tensor), group_size(group))
        return self._issue(
            "all_reduce", group, s, s, lambda: dist.all_reduce(tensor, op=op, group=group, async_op=True), async_op, [tensor]
        )

    def _reduce_scatter_tensor(self, output, input, op, group, async_op, name):
        if group is SOLO:
            return self._solo(name, group, lambda: output.copy_(input), async_op, [output])
        s = formulas.ring_bytes("reduce_scatter", nbytes(input), group_size(group))
        return self._issue(
            name, group, s, s, lambda: _reduce_scatter(output, input, op=op, group=group, async_op=True), async_op, [output]
        )

    def _reduce_scatter_list(self, output, input_list, op, group, async_op):
        if group is SOLO:
            return self._solo("reduce_scatter", group, lambda: output.copy_(input_list[0]), async_op, [output])
        s = formulas.ring_bytes("reduce_scatter", nbytes(output) * len(input_list), group_size(group))
        return self._issue(
            "reduce_scatter", group, s, s,
            lambda: dist.reduce_scatter(output, list(input_list), op=op, group=group, async_op=True), async_op, [output],
        )

    def _all_gather_into_tensor(self, output_tensor, input_tensor, group, async_op, name):
        if group is SOLO:
            return self._solo(
                name, group, lambda: output_tensor.copy_(input_tensor.view_as(output_tensor)), async_op, [output_tensor]
            )
        s = formulas.ring_bytes("all_gather", nbytes(output_tensor), group_size(group))
        return self._issue(
            name, group, s, s, lambda: _all_gather(output_tensor, input_tensor, group=group, async_op=True), async_op,
            [output_tensor],
        )

    def _all_gather(self, tensor_list, tensor, group, async_op):
        if group is SOLO:
            return self._solo("all_gather", group, lambda: tensor_list[0].copy_(tensor), async_op, list(tensor_list))
        n = group_size(group)
        s = formulas.ring_bytes("all_gather", nbytes(tensor) * n, n)
        return self._issue(
            "all_gather", group, s, s, lambda: dist.all_gather(tensor_list, tensor, group=group, async_op=True), async_op,
            list(tensor_list),
        )

    def _broadcast(self, tensor, src, group, async_op):
        if group is SOLO:
            return self._solo("broadcast", group, lambda: None, async_op, [tensor])
        ranks = group_ranks(group)
        hops = _chain_hops(ranks, dist.get_rank(), src)  # the chain src -> src+1 -> ...
        sent, recv, _ = formulas.chain_broadcast_traffic(nbytes(tensor), len(ranks), hops)
        return self._issue(
            "broadcast", group, sent, recv, lambda: dist.broadcast(tensor, src, group=group, async_op=True), async_op, [tensor]
        )

    def _reduce(self, tensor, dst, op, group, async_op):
        if group is SOLO:
            return self._solo("reduce", group, lambda: None, async_op, [tensor])
        ranks = group_ranks(group)
        hops = _chain_hops(ranks, dist.get_rank(), dst, into_root=True)  # the chain dst+1 -> ... -> dst
        sent, recv, _ = formulas.chain_reduce_traffic(nbytes(tensor), len(ranks), hops)
        return self._issue(
            "reduce", group, sent, recv, lambda: dist.reduce(tensor, dst, op=op, group=group, async_op=True), async_op, [tensor]
        )

    def _gather(self, tensor, gather_list, dst, group, async_op):
        if group is SOLO:
            return self._solo("gather", group, lambda: gather_list[0].copy_(tensor), async_op, list(gather_list or []))
        root = dist.get_rank() == dst
        sent, recv, _ = formulas.gather_traffic(nbytes(tensor), group_size(group), root)
        return self._issue(
            "gather", group, sent, recv,
            lambda: dist.gather(tensor, gather_list if root else None, dst=dst, group=group, async_op=True), async_op,
            list(gather_list or []),
        )

    def _scatter(self, tensor, scatter_list, src, group, async_op):
        if group is SOLO:
            return self._solo("scatter", group, lambda: tensor.copy_(scatter_list[0]), async_op, [tensor])
        root = dist.get_rank() == src
        sent, recv, _ = formulas.scatter_traffic(nbytes(tensor), group_size(group), root)
        return self._issue(
            "scatter", group, sent, recv,
            lambda: dist.scatter(tensor, scatter_list if root else None, src=src, group=group, async_op=True), async_op,
            [tensor],
        )

    def _all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, group, async_op):
        if group is SOLO:
            return self._solo("all_to_all_single", group, lambda: output.copy_(input), async_op, [output])
        n, me = group_size(group), group_rank(group)
        row_in = nbytes(input) // max(input.shape[0], 1) if input.dim() else 0
        row_out = nbytes(output) // max(output.shape[0], 1) if output.dim() else 0
        in_splits = input_split_sizes or [input.shape[0] // n] * n
        out_splits = output_split_sizes or [output.shape[0] // n] * n
        sent = formulas.all_to_all_bytes(in_splits, me) * row_in
        recv = formulas.all_to_all_bytes(out_splits, me) * row_out
        return self._issue(
            "all_to_all_single", group, sent, recv,
            lambda: dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group, async_op=True),
            async_op, [output],
        )

    def _all_to_all(self, output_tensor_list, input_tensor_list, group, async_op):
        if group is SOLO:
            return self._solo(
                "all_to_all", group, lambda: output_tensor_list[0].copy_(input_tensor_list[0]), async_op,
                list(output_tensor_list),
            )
        me = group_rank(group)
        sent = formulas.all_to_all_bytes([nbytes(t) for t in input_tensor_list], me)
        recv = formulas.all_to_all_bytes([nbytes(t) for t in output_tensor_list], me)
        return self._issue(
            "all_to_all", group, sent, recv,
            lambda: dist.all_to_all(output_tensor_list, input_tensor_list, group=group, async_op=True), async_op,
            list(output_tensor_list),
        )

    def _barrier(self, group, async_op, timeout):
        if group is SOLO:
            return self._solo("barrier", group, lambda: None, async_op)
        return self._issue("barrier", group, 0, 0, lambda: dist.barrier(group=group, async_op=True), async_op, [])

    def _monitored_barrier(self, group, timeout, wait_all_ranks):
        if group is SOLO:
            return
        from datetime import timedelta

        t = None if timeout is None else timedelta(seconds=timeout)
        try:
            self._run_sync("monitored_barrier", group, lambda: dist.monitored_barrier(group=group, timeout=t, wait_all_ranks=wait_all_ranks))
        except RuntimeError as e:
            if isinstance(e, CollectiveTimeout):
                raise
            raise CollectiveTimeout(f"monitored_barrier on group '{group_label(group)}' failed: {e}") from e
        return
