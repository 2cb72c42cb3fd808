"""The pipeline executor: one runner for any schedule's action lists.

Per optimizer step it builds (once per micro-batch count, then cached) the
schedule, checks it with the validator, and runs this rank's list in order:

- ``F(s, i)``: stage s's chunk on micro-batch i. Its input is the batch slice
  (first stage), the output of ``F(s-1, i)`` on this rank (detached, so each
  stage's backward stays its own), or the buffer a ``RECV_F`` posted. The
  last stage adds the loss.
- ``B(s, i)``: backward of that forward, from loss/m on the last stage, else
  from the gradient of the stage's output (received, or left by ``B(s+1, i)``
  on this rank). The last B of each chunk runs inside
  ``strategy.grads_final(chunk)``, so the data-parallel flavours can start
  that chunk's reduction.
- ``SEND_*``/``RECV_*``: async point-to-point on ``xtrain.comm`` over the
  pipeline's global ranks; a receive is posted at its action and waited on
  just before the compute that consumes it, and every message has its own tag
  from (payload, stage, micro-batch). Shapes come from the batch and the model
  width (no shape handshake): (B/m, T/seq_parts, D), fp32 (the residual
  stream's dtype, also under bf16 autocast).

The loss is the mean over the global batch at any m and p: every micro-batch's
mean loss is scaled by 1/m once, in its backward, and the dp average does the rest.

Each step's measured timeline is kept (``last_timeline``: every action's start
and end on this rank, ``perf_counter`` seconds), and ``step_metrics`` reports
the time spent waiting on receives, the pipeline's idle time on this rank.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn as nn

from xtrain.data import split_micro
from xtrain.parallel.pipeline.schedules import Schedule, build_schedule
from xtrain.parallel.pipeline.validate import validate

ACT_DTYPE = torch.float32


class PipelineRunner:
    def __init__(self, strategy, model: nn.Module):
        self.strategy, self.model = strategy, model
        self.plan = plan = strategy.pipeline
        self.mesh, self.comm = strategy.mesh, strategy.comm
        self.group = self.mesh.group("pp")
        # this rank's stages, each a part of the rank's model (shared modules)
        self.stage_chunk = {
            s: model.part(plan.layers[s], first=s == 0, last=s == plan.n_stages - 1) for s in plan.my_stages
        }
        self.chunks = list(self.stage_chunk.values())
        self.width = model.cfg.dim
        self._schedules: dict[int, tuple[Schedule, dict]] = {}
        self.last_timeline: list[dict] = []
        self.wait_s = 0.0
        self.peak_in_flight = 0  # most micro-batches whose activations this rank held at once

    # -- schedule --------------------------------------------------------------
    def schedule(self, m: int) -> tuple[Schedule, dict]:
        """The schedule for m micro-batches (validated once) and, per stage on this
        rank, the index of its last backward."""
        if m not in self._schedules:
            s = build_schedule(self.plan.schedule, self.plan.p, m, self.plan.v)
            if s.stage_rank != self.plan.stage_rank:
                raise RuntimeError(f"schedule {s.name} maps stages {s.stage_rank}, the model was cut for {self.plan.stage_rank}")
            validate(s)
            mine = s.actions[self.plan.rank]
            last_b = {a.stage: j for j, a in enumerate(mine) if a.kind == "B"}
            self._schedules[m] = (s, last_b)
        return self._schedules[m]

    def _peer(self, sched: Schedule, action) -> int:
        return self.mesh.rank_at("pp", sched.peer(action))

    @staticmethod
    def _tag(sched: Schedule, action) -> int:
        payload, stage, mb = sched.message_key(action)
        return 1 + ((payload == "B") * sched.n_stages + stage) * sched.n_micro + mb

    def _act_shape(self, x_mb: torch.Tensor) -> tuple[int, ...]:
        b, t = x_mb.shape
        return (b, t // self.strategy.seq_parts, self.width)

    # -- one training step -------------------------------------------------------
    def forward_backward(self, x, y, micro_batches: int, autocast) -> torch.Tensor:
        m = micro_batches
        sched, last_b = self.schedule(m)
        xs, ys = split_micro(x, m), split_micro(y, m)
        shape, device = self._act_shape(xs[0]), x.device
        # rotary positions of the whole sequence: a stage's input may hold only a part (sp)
        positions = torch.arange(x.shape[1], device=device)
        loss_fn, n_last = self.strategy.loss_fn, self.plan.n_stages - 1
        inputs, outputs, in_grads, pending, sends = {}, {}, {}, {}, []
        total = torch.zeros((), device=device)
        timeline, wait_s, in_flight = [], 0.0, 0
        for j, a in enumerate(sched.actions[self.plan.rank]):
            t0 = time.perf_counter()
            key = (a.stage, a.mb)
            if a.kind in ("RECV_F", "RECV_B"):
                buf = torch.empty(shape, dtype=ACT_DTYPE, device=device)
                work = self.comm.irecv(buf, src=self._peer(sched, a), group=self.group, tag=self._tag(sched, a))
                pending[(a.kind, key)] = (buf, work)
            elif a.kind == "F":
                if a.stage == 0:
                    inp = xs[a.mb]
                elif ("RECV_F", key) in pending:
                    buf, work = pending.pop(("RECV_F", key))
                    work.wait()
                    wait_s += time.perf_counter() - t0
                    t0 = time.perf_counter()  # the compute starts once the input is here
                    inp = buf.requires_grad_()
                else:  # the previous stage ran here: hand over its output, cut from its graph
                    inp = outputs[(a.stage - 1, a.mb)].detach().requires_grad_()
                with autocast:
                    out = self.stage_chunk[a.stage](inp, positions)
                    if a.stage == n_last:
                        out = loss_fn(out, ys[a.mb])
                        total += out.detach()
                inputs[key], outputs[key] = inp, out
                in_flight = max(in_flight, len(inputs))
            elif a.kind == "SEND_F":
                t = outputs[key].detach().to(ACT_DTYPE).contiguous()
                sends.append(self.comm.isend(t, dst=self._peer(sched, a), group=self.group, tag=self._tag(sched, a)))
            elif a.kind == "B":
                out, inp = outputs.pop(key), inputs.pop(key)
                if a.stage == n_last:
                    target, grad = out / m, None
                elif ("RECV_B", key) in pending:
                    buf, work = pending.pop(("RECV_B", key))
                    work.wait()
                    wait_s += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    target, grad = out, buf
                else:  # the next stage ran here and left the gradient of our output
                    target, grad = out, in_grads.pop((a.stage + 1, a.mb))
                final = last_b[a.stage] == j
                chunk = self.stage_chunk[a.stage]
                with self.strategy.grads_final(chunk) if final else contextlib.nullcontext():
                    torch.autograd.backward(target, grad)
                if a.stage > 0:
                    in_grads[key] = inp.grad
            elif a.kind == "SEND_B":
                t = in_grads.pop(key).to(ACT_DTYPE).contiguous()
                sends.append(self.comm.isend(t, dst=self._peer(sched, a), group=self.group, tag=self._tag(sched, a)))
            else:
                raise ValueError(f"pipeline executor: unknown action kind {a.kind!r} ({a})")
            timeline.append({"kind": a.kind, "stage": a.stage, "mb": a.mb, "start": t0, "end": time.perf_counter()})
        t0 = time.perf_counter()
        for w in sends:
            w.wait()
        self.wait_s = wait_s + time.perf_counter() - t0
        self.last_timeline, self.peak_in_flight = timeline, in_flight
        return total / m

    def step_metrics(self) -> dict:
        """Figures of the last step for metrics.jsonl (this rank's)."""
        return {"pp_wait_s": self.wait_s, "pp_peak_microbatches": self.peak_in_flight}

    # -- evaluation: one forward pass through the stages in order -----------------------
    @torch.no_grad()
    def eval_loss(self, x, y) -> torch.Tensor:
        plan, device = self.plan, x.device
        shape, sends = self._act_shape(x), []
        positions = torch.arange(x.shape[1], device=device)
        loss = torch.zeros((), device=device)
        h = None
        for s in range(plan.n_stages):
            if plan.stage_rank[s] != plan.rank:
                continue
            if s == 0:
                h = x
            elif plan.stage_rank[s - 1] != plan.rank:
                h = torch.empty(shape, dtype=ACT_DTYPE, device=device)
                self.comm.recv(h, src=self.mesh.rank_at("pp", plan.stage_rank[s - 1]), group=self.group, tag=s)
            h = self.stage_chunk[s](h, positions)
            if s == plan.n_stages - 1:
                loss = self.strategy.loss_fn(h, y)
            elif plan.stage_rank[s + 1] != plan.rank:
                t = h.to(ACT_DTYPE).contiguous()
                sends.append(self.comm.isend(t, dst=self.mesh.rank_at("pp", plan.stage_rank[s + 1]), group=self.group, tag=s + 1))
        for w in sends:
            w.wait()
        return loss
