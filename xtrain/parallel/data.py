"""Data parallelism: every rank holds the whole model and a slice of the batch.

``dp``: after backward, every gradient is all-reduced (averaged) over the dp
axis, one collective per parameter: the textbook version.

``ddp``: gradients live in flat buckets of about ``bucket_mb`` MB (the first
one ``first_bucket_mb``, 1 by default), filled in
reverse parameter order (the order backward produces them), per model chunk
(the runner's chunks: the whole model, or this rank's pipeline stages). Each parameter's
``.grad`` is a view into its bucket, so autograd accumulates straight into the
buffer the collective reads. When the last gradient of a bucket arrives
(a post-accumulate-grad hook), the bucket's all-reduce starts asynchronously
while backward goes on computing earlier layers (Li et al., "PyTorch
Distributed", VLDB 2020). Buckets send only during the chunk's last backward
of the step (the runner's ``grads_final(chunk)``); before that gradients
accumulate locally, as under torch's ``no_sync``.

Per rank and step both move 2Ψ(dp-1)/dp elements each way (ring all-reduce).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from xtrain.comm import SOLO, ReduceOp
from xtrain.parallel.base import Strategy
from xtrain.parallel.flat import FlatGroup

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def reduce_dtype_of(options) -> torch.dtype | None:
    """The gradient-communication dtype (``strategy.reduce_dtype``), None for the grads' own."""
    name = options.get("reduce_dtype", "fp32") if options is not None else "fp32"
    return DTYPES[name]


def check_reduce_dtype(options) -> list[str]:
    name = options.get("reduce_dtype", "fp32")
    return [] if name in DTYPES else [f"strategy.reduce_dtype={name!r} is not one of {list(DTYPES)}"]


class DataParallel(Strategy):
    name = "dp"
    supported_axes = ("pp", "dp", "cp", "ep", "tp")

    @classmethod
    def check(cls, options, degrees, world_size):
        return super().check(options, degrees, world_size) + check_reduce_dtype(options)

    @torch.no_grad()
    def reduce_gradients(self, model: nn.Module) -> None:
        dtype = reduce_dtype_of(self.options)
        for p in model.parameters():
            axes = self.replica_axes(p)
            group, scale = self.mesh.group(axes), self.grad_scale(axes)
            if p.grad is None:
                continue
            if group is not SOLO:  # one replica: nothing to average
                if p.grad.dtype == dtype:
                    self.comm.all_reduce(p.grad, op=ReduceOp.AVG, group=group)
                else:
                    g = p.grad.to(dtype)
                    self.comm.all_reduce(g, op=ReduceOp.AVG, group=group)
                    p.grad.copy_(g)
            if scale != 1:  # an expert: its holders already saw every ep peer's share
                p.grad.mul_(scale)
        self.reduce_partial_grads(model)


class Bucket:
    """A flat gradient buffer for a run of parameters, and its in-flight all-reduce."""

    def __init__(self, layout: FlatGroup, buffer: torch.Tensor):
        self.layout, self.buffer = layout, buffer
        self.armed = False  # sends only during its chunks' last backward of the step
        self.chunks: set[int] = set()  # the model chunks its parameters belong to
        self.axes: tuple[str, ...] = ("dp",)  # the data axes its parameters are replicated over
        self.pending = len(layout.params)
        self.work = None
        self.comm_buffer = None

    def view(self, i: int) -> torch.Tensor:
        o = self.layout.offsets[i]
        return self.buffer[o : o + self.layout.numels[i]].view(self.layout.shapes[i])


class DistributedDataParallel(DataParallel):
    name = "ddp"

    def apply_data_parallel(self, model: nn.Module) -> nn.Module:
        self.reduce_dtype = reduce_dtype_of(self.options)
        limit = float(self.options.get("bucket_mb", 25)) * 2**20
        # The first bucket (the last layers) is small, so its all-reduce starts
        # early in backward and overlaps the rest (torch DDP caps it at 1 MB too).
        first_limit = min(limit, float(self.options.get("first_bucket_mb", 1)) * 2**20)
        self.buckets, self.final_chunks, seen = [], set(), set()
        chunks_of: dict[int, set[int]] = {}  # a parameter shared by two chunks (DualPipeV's tied ends) is final after both
        for chunk in self.runner.chunks:
            for p in chunk.parameters():
                chunks_of.setdefault(id(p), set()).add(id(chunk))
        for chunk in self.runner.chunks:
            named = [(n, p) for n, p in chunk.named_parameters() if p.requires_grad and id(p) not in seen][::-1]
            seen |= {id(p) for _, p in named}
            runs, run, size = [], [], 0
            for n, p in named:  # a bucket closes once it reaches its limit (as torch DDP's)
                if run and self.replica_axes(p) != self.replica_axes(run[0][1]):
                    runs.append(run)  # a bucket reduces over one group (experts apart from dense weights)
                    run, size = [], 0
                run.append((n, p))
                size += p.numel() * p.element_size()
                if size >= (first_limit if not self.buckets and not runs else limit):
                    runs.append(run)
                    run, size = [], 0
            if run:
                runs.append(run)
            for run in runs:
                layout = FlatGroup([n for n, _ in run], [p for _, p in run], shards=1)
                bucket = Bucket(layout, torch.zeros(layout.numel, dtype=run[0][1].dtype, device=run[0][1].device))
                bucket.chunks = set().union(*(chunks_of[id(p)] for _, p in run))
                bucket.axes = self.replica_axes(run[0][1])
                self.buckets.append(bucket)
                for i, (_, p) in enumerate(run):
                    p.grad = bucket.view(i)
                    p.register_post_accumulate_grad_hook(self._hook(bucket, i))
        return model

    def _hook(self, bucket: Bucket, i: int):
        def on_grad_ready(p: torch.Tensor) -> None:
            if p.grad.data_ptr() != bucket.view(i).data_ptr():
                # autograd replaced the view (it does when the grad is shared): put it back
                bucket.view(i).copy_(p.grad)
                p.grad = bucket.view(i)
            if not bucket.armed:
                return
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch(bucket)

        return on_grad_ready

    def _launch(self, bucket: Bucket) -> None:
        buf = bucket.buffer if bucket.buffer.dtype == self.reduce_dtype else bucket.buffer.to(self.reduce_dtype)
        bucket.comm_buffer = buf
        bucket.work = self.comm.all_reduce(buf, op=ReduceOp.AVG, group=self.mesh.group(bucket.axes), async_op=True)

    def grads_final(self, chunk: nn.Module):
        @contextlib.contextmanager
        def armed():
            self.final_chunks.add(id(chunk))
            ready = [b for b in self.buckets if id(chunk) in b.chunks and b.chunks <= self.final_chunks]
            for b in ready:
                b.armed = True
            try:
                yield
            finally:
                for b in ready:
                    b.armed = False

        return armed()

    @torch.no_grad()
    def reduce_gradients(self, model: nn.Module) -> None:
        for bucket in self.buckets:
            if bucket.work is None:  # a parameter that got no gradient this step
                self._launch(bucket)
        for bucket in self.buckets:
            bucket.work.wait()
            if bucket.comm_buffer is not bucket.buffer:
                bucket.buffer.copy_(bucket.comm_buffer)
            if (scale := self.grad_scale(bucket.axes)) != 1:
                bucket.buffer.mul_(scale)
            bucket.work = bucket.comm_buffer = None
            bucket.pending = len(bucket.layout.params)
        self.final_chunks.clear()
        self.reduce_partial_grads(model)

    def zero_grad(self, model: nn.Module, optimizer) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()


class TensorParallel(DataParallel):
    """``strategy=tp``: Megatron tensor parallelism (``strategy.tp``, default 2;
    ``strategy.sp`` for sequence parallel), with plain data parallelism over any
    remaining ranks. ddp, zero1 and zero2 compose with tp the same way."""

    name = "tp"


class PipelineParallel(DataParallel):
    """``strategy=pp``: pipeline parallelism (``strategy.pp``, default 2, and
    ``strategy.pp_schedule``), with plain data parallelism over any remaining
    ranks. ddp, zero1 and zero2 compose with pp the same way."""

    name = "pp"


class ContextParallel(DataParallel):
    """``strategy=cp``: context parallelism (``strategy.cp``, default 2;
    ``strategy.cp_attn``, ``strategy.cp_layout``), with plain data parallelism
    over any remaining ranks; gradients are averaged over dp x cp. ddp, zero1,
    zero2 and zero3 compose with cp the same way."""

    name = "cp"


class ExpertParallel(DataParallel):
    """``strategy=ep``: expert parallelism (``strategy.ep``, default 2, borrowed
    from dp; ``strategy.ep_dispatch``) for a mixture-of-experts model, with plain
    data parallelism; dense gradients average over dp x ep, experts' over
    their replicas. ddp composes with ep the same way."""

    name = "ep"
