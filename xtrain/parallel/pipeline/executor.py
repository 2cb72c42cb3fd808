"""The pipeline executor: one runner for any schedule's action lists.

Per optimizer step it builds (once per micro-batch count, then cached) the
schedule, checks it with the validator, and runs this rank's list in order:

- ``F(s, i)``: stage s's chunk on micro-batch i. Its input is the batch slice
  (a first stage), the output of the previous stage's F on this rank
  (detached, so each stage's backward stays its own), or the buffer a
  ``RECV_F`` posted. A last stage adds the loss.
- ``B(s, i)``: the whole backward of that forward, from loss/m on a last
  stage, else from the gradient of the stage's output (received, or left by
  the next stage's backward on this rank). ``I(s, i)`` is the same backward
  with the linear layers' weight gradients kept for ``W(s, i)``
  (``weight_grad.py``: zero-bubble's split). The action holding a chunk's last
  gradient accumulation of the step (its last B or W) runs inside
  ``strategy.grads_final(chunk)``, so the data-parallel flavours can start
  that chunk's reduction.
- ``OVERLAP``: a forward and a backward of two micro-batches (DualPipe's
  overlapped chunk), run one after the other; the schedule posts both one's
  receives before it and both one's sends after it, so the messages travel
  while the two computations run.
- ``SEND_*``/``RECV_*``: async point-to-point on ``xtrain.comm`` over the
  pipeline's global ranks; a receive is posted at its action and waited on
  just before the compute that consumes it, and every message has its own tag
  from (payload, stage, micro-batch). Shapes come from the batch and the model
  width (no shape handshake): (B/m, T/seq_parts, D), fp32 (the residual
  stream's dtype, also under bf16 autocast).

The loss is the mean over the global batch at any m and p: every micro-batch's
mean loss is scaled by 1/m once, in its backward, and the dp average does the rest.

Each step's measured timeline is kept (``last_timeline``: every action's start
and end on this rank, ``perf_counter`` seconds; every step's in ``trace`` when
a run asks for one), and ``step_metrics`` reports the time spent waiting on
receives, the pipeline's idle time on this rank.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn as nn

from xtrain.data import split_micro
from xtrain.parallel.pipeline.schedules import Schedule, build_schedule
from xtrain.parallel.pipeline.validate import validate
from xtrain.parallel.pipeline.weight_grad import WeightGradStore

ACT_DTYPE = torch.float32


class PipelineRunner:
    def __init__(self, strategy, model: nn.Module):
        self.strategy, self.model = strategy, model
        self.plan = plan = strategy.pipeline
        self.mesh, self.comm = strategy.mesh, strategy.comm
        self.group = self.mesh.group("pp")
        # this rank's stages, each a part of the rank's model (shared modules)
        self.stage_chunk = {
            s: model.part(plan.layers[plan.stage_block[s]], first=s in plan.first_stages, last=s in plan.last_stages)
            for s in plan.my_stages
        }
        self.chunks = list(self.stage_chunk.values())
        self.width = model.cfg.dim
        self._schedules: dict[int, tuple[Schedule, dict]] = {}
        self.last_timeline: list[dict] = []
        self.wait_s = 0.0
        self.peak_in_flight = 0  # most (stage, micro-batch) activations this rank held at once
        self.weight_grads = WeightGradStore()  # W's deferred work, for schedules that split backward
        self.trace: list[list[dict]] | None = None  # every step's actions, when a run asks for a trace

    # -- schedule --------------------------------------------------------------
    def schedule(self, m: int) -> tuple[Schedule, dict]:
        """The schedule for m micro-batches (validated once) and, per stage on this
        rank, the index of the action holding its last gradient accumulation."""
        if m not in self._schedules:
            s = build_schedule(self.plan.schedule, self.plan.p, m, self.plan.v)
            if list(s.stage_rank) != list(self.plan.stage_rank):
                raise RuntimeError(f"schedule {s.name} maps stages {s.stage_rank}, the model was cut for {self.plan.stage_rank}")
            validate(s)
            finals = {}
            for j, a in enumerate(s.actions[self.plan.rank]):
                for b in a.parts:
                    if b.kind in ("B", "W"):
                        finals[b.stage] = j
            self._schedules[m] = (s, finals)
        return self._schedules[m]

    def _peer(self, sched: Schedule, action) -> int:
        return self.mesh.rank_at("pp", sched.peer(action))

    @staticmethod
    def _tag(sched: Schedule, action) -> int:
        payload, stage, mb = sched.message_key(action)
        return 1 + ((payload == "B") * sched.n_stages + stage) * sched.n_micro + mb

    def _positions(self, x_mb: torch.Tensor) -> torch.Tensor | None:
        """Rotary positions for a stage's forward, from this rank's tokens: None
        (0..T-1 from the input's length) unless this rank holds only some columns
        (cp), or the activations between stages hold a part of them (sp)."""
        positions = self.strategy.positions(x_mb)
        if positions is not None or self.strategy.seq_parts == 1:
            return positions
        return torch.arange(x_mb.shape[1], device=x_mb.device)

    def _act_shape(self, x_mb: torch.Tensor) -> tuple[int, ...]:
        b, t = x_mb.shape
        return (b, t // self.strategy.seq_parts, self.width)

    # -- one training step -------------------------------------------------------
    def forward_backward(self, x, y, micro_batches: int, autocast) -> torch.Tensor:
        m = micro_batches
        sched, finals = self.schedule(m)
        step = _Step(self, sched, split_micro(x, m), split_micro(y, m), autocast)
        for j, a in enumerate(sched.actions[self.plan.rank]):
            for b in a.parts:  # an OVERLAP's forward, then its backward
                step.run(b, final=finals.get(b.stage) == j and b.kind in ("B", "W"))
        return step.finish()

    # -- evaluation: one forward pass along the model's layers ---------------------
    @torch.no_grad()
    def eval_loss(self, x, y) -> torch.Tensor:
        """The loss of one forward through the stages of the first path (the
        model's layers in order), each rank running its stages on that path."""
        plan, device = self.plan, x.device
        shape, sends = self._act_shape(x), []
        positions = self._positions(x)
        loss = torch.zeros((), device=device)
        path, h = plan.eval_path, None
        for k, s in enumerate(path):
            if plan.stage_rank[s] != plan.rank:
                continue
            if k == 0:
                h = x
            elif plan.stage_rank[path[k - 1]] != plan.rank:
                h = torch.empty(shape, dtype=ACT_DTYPE, device=device)
                self.comm.recv(h, src=self.mesh.rank_at("pp", plan.stage_rank[path[k - 1]]), group=self.group, tag=k)
            h = self.stage_chunk[s](h, positions)
            if k == len(path) - 1:
                loss = self.strategy.loss_fn(h, y)
            elif plan.stage_rank[path[k + 1]] != plan.rank:
                dst = self.mesh.rank_at("pp", plan.stage_rank[path[k + 1]])
                sends.append(self.comm.isend(h.to(ACT_DTYPE).contiguous(), dst=dst, group=self.group, tag=k + 1))
        for w in sends:
            w.wait()
        return loss

    def step_metrics(self) -> dict:
        """Figures of the last step for metrics.jsonl (this rank's)."""
        return {"pp_wait_s": self.wait_s, "pp_peak_microbatches": self.peak_in_flight}


class _Step:
    """One step's state on this rank: inputs and outputs held for backward, input
    gradients to hand back, posted receives, sends in flight, the timeline."""

    def __init__(self, runner: PipelineRunner, sched: Schedule, xs, ys, autocast):
        self.r, self.sched, self.xs, self.ys, self.autocast = runner, sched, xs, ys, autocast
        self.device = xs[0].device
        self.shape = runner._act_shape(xs[0])
        # rotary positions of the whole sequence when a stage's input holds only a part (sp)
        self.positions = runner._positions(xs[0])
        self.first, self.last = sched.first_stages, sched.last_stages
        mine = sched.actions[runner.plan.rank]
        self.split = {(b.stage, b.mb) for a in mine for b in a.parts if b.kind == "I"}
        self.inputs, self.outputs, self.in_grads, self.pending, self.sends = {}, {}, {}, {}, []
        self.total, self.n_losses = torch.zeros((), device=self.device), 0
        self.timeline, self.wait_s, self.in_flight = [], 0.0, 0

    def run(self, a, final: bool) -> None:
        t0 = time.perf_counter()
        key, r, sched = (a.stage, a.mb), self.r, self.sched
        if a.kind in ("RECV_F", "RECV_B"):
            buf = torch.empty(self.shape, dtype=ACT_DTYPE, device=self.device)
            work = r.comm.irecv(buf, src=r._peer(sched, a), group=r.group, tag=r._tag(sched, a))
            self.pending[(a.kind, key)] = (buf, work)
        elif a.kind == "F":
            if a.stage in self.first:
                inp = self.xs[a.mb]
            elif ("RECV_F", key) in self.pending:
                inp = self._wait("RECV_F", key).requires_grad_()
                t0 = time.perf_counter()  # the compute starts once the input is here
            else:  # the previous stage ran here: hand over its output, cut from its graph
                inp = self.outputs[(sched.prev_stage(a.stage), a.mb)].detach().requires_grad_()
            chunk = r.stage_chunk[a.stage]
            split = r.weight_grads.mode(chunk, key) if key in self.split else contextlib.nullcontext()
            with self.autocast, split:
                out = chunk(inp, self.positions)
                if a.stage in self.last:
                    out = r.strategy.loss_fn(out, self.ys[a.mb])
                    self.total += out.detach()
                    self.n_losses += 1
            self.inputs[key], self.outputs[key] = inp, out
            self.in_flight = max(self.in_flight, len(self.inputs))
        elif a.kind in ("B", "I"):
            out, inp = self.outputs.pop(key), self.inputs.pop(key)
            if a.stage in self.last:
                target, grad = out / sched.n_micro, None
            elif ("RECV_B", key) in self.pending:
                target, grad = out, self._wait("RECV_B", key)
                t0 = time.perf_counter()
            else:  # the next stage ran here and left the gradient of our output
                target, grad = out, self.in_grads.pop((sched.next_stage(a.stage), a.mb))
            # I leaves the linear weight gradients in the store for W; B is whole
            with r.strategy.grads_final(r.stage_chunk[a.stage]) if final and a.kind == "B" else contextlib.nullcontext():
                torch.autograd.backward(target, grad)
            if a.stage not in self.first:
                self.in_grads[key] = inp.grad
        elif a.kind == "W":
            with r.strategy.grads_final(r.stage_chunk[a.stage]) if final else contextlib.nullcontext():
                r.weight_grads.run(key)
        elif a.kind in ("SEND_F", "SEND_B"):
            t = (self.outputs[key].detach() if a.kind == "SEND_F" else self.in_grads.pop(key)).to(ACT_DTYPE).contiguous()
            self.sends.append(r.comm.isend(t, dst=r._peer(sched, a), group=r.group, tag=r._tag(sched, a)))
        else:
            raise ValueError(f"pipeline executor: unknown action kind {a.kind!r} ({a})")
        self.timeline.append({"kind": a.kind, "stage": a.stage, "mb": a.mb, "start": t0, "end": time.perf_counter()})

    def _wait(self, kind: str, key) -> torch.Tensor:
        t0 = time.perf_counter()
        buf, work = self.pending.pop((kind, key))
        work.wait()
        self.wait_s += time.perf_counter() - t0
        return buf

    def finish(self) -> torch.Tensor:
        t0 = time.perf_counter()
        for w in self.sends:
            w.wait()
        r = self.r
        r.wait_s = self.wait_s + time.perf_counter() - t0
        r.last_timeline, r.peak_in_flight = self.timeline, self.in_flight
        if r.trace is not None:
            r.trace.append(self.timeline)
        # the mean of this rank's micro-batch losses (a rank that computes none reports 0, at weight 0)
        return self.total / max(self.n_losses, 1)
