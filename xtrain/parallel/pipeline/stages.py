"""Cutting the model into pipeline stages: the layer split, the pipeline
transform, and its checks (static, before any process group exists).

The model's blocks are cut into layer blocks, contiguous runs in model order;
stage s runs layer block ``stage_layers_of(s)`` on pipeline rank
``stage_rank[s]`` (the schedule's map: s for GPipe, 1F1B and ZB-H1, s mod p
for interleaved, the V for DualPipeV; DualPipe runs every layer block twice,
on ranks r and p-1-r, one copy per direction). The embedding joins the first
layer block; the final norm, the head and the loss the last. By default the
split balances parameter counts: the contiguous partition of the blocks (with
the embedding's parameters counted on the first block and the head's on the
last) that minimises the largest, every block holding at least one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from xtrain.parallel.pipeline.schedules import CHUNKED_SCHEDULES, check_schedule_config, schedule_layout
from xtrain.parallel.placement import Owned, Partial, mark

TIED_ROLE = "pp_ends"  # the mesh role group of the first and last pipeline ranks
MIRROR_ROLE = "pp_mirror"  # ranks r and p-1-r: DualPipe holds the same layers on both


@dataclass(frozen=True)
class StagePlan:
    schedule: str
    p: int  # pipeline ranks
    v: int  # stages per rank (interleaved)
    layers: list[list[int]]  # block indices of each layer block, in model order
    stage_rank: list[int]  # pipeline rank of each stage
    stage_block: list[int]  # the layer block each stage runs (two stages share one under DualPipe)
    first_stages: frozenset  # stages that take the batch
    last_stages: frozenset  # stages that compute the loss
    eval_path: list[int]  # the stages of one forward through the whole model, in order
    rank: int  # this rank's coordinate on pp

    @property
    def n_stages(self) -> int:
        return len(self.stage_rank)

    @property
    def my_stages(self) -> list[int]:
        return [s for s, r in enumerate(self.stage_rank) if r == self.rank]


def balanced_split(costs: list[int], n_stages: int, first_extra: int = 0, last_extra: int = 0) -> list[int]:
    """Blocks per stage: the contiguous split of ``costs`` into ``n_stages`` runs
    (each non-empty) that minimises the largest run's cost, with ``first_extra``
    added to the first run and ``last_extra`` to the last. Exact (dynamic
    programming over split points); ties go to the earliest split."""
    L = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: the smallest max-cost of splitting the first j blocks into k runs
    best = [[inf] * (L + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (L + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for k in range(1, n_stages + 1):
        for j in range(k, L - (n_stages - k) + 1):
            for i in range(k - 1, j):
                run = prefix[j] - prefix[i] + (first_extra if k == 1 else 0) + (last_extra if k == n_stages else 0)
                cost = max(best[k - 1][i], run)
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    sizes, j = [], L
    for k in range(n_stages, 0, -1):
        i = cut[k][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def stage_layers(model: nn.Module, n_stages: int, explicit=None) -> list[list[int]]:
    """Block indices per stage: ``explicit`` counts (``strategy.pp_layers``) or
    the parameter-balanced split."""
    n_layers = len(model.blocks)
    if explicit:
        sizes = [int(k) for k in explicit]
    else:
        costs = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
        embed = model.embed.weight.numel()
        tied = model.head.weight is model.embed.weight
        head = (0 if tied else model.head.weight.numel()) + model.norm.weight.numel()
        # a tied head still costs the last stage a vocabulary-sized matmul: count it there too
        sizes = balanced_split(costs, n_stages, first_extra=embed, last_extra=head + (embed if tied else 0))
    out, start = [], 0
    for k in sizes:
        out.append(list(range(start, start + k)))
        start += k
    assert start == n_layers, (sizes, n_layers)
    return out


def check_pipeline(options, pp: int, micro_batches: int, n_layers: int) -> list[str]:
    """Every reason the pipeline options cannot run (empty when they can)."""
    name = options.get("pp_schedule", "1f1b")
    v = int(options.get("pp_chunks", 1) or 1)
    problems = check_schedule_config(name, pp, micro_batches, v, n_layers)
    explicit = options.get("pp_layers")
    if explicit:
        explicit = list(explicit)
        if len(explicit) != pp * v:
            problems.append(f"strategy.pp_layers={explicit} must give one layer count per stage: pp*pp_chunks = {pp}*{v} = {pp * v}")
        if sum(explicit) != n_layers:
            problems.append(f"strategy.pp_layers={explicit} sums to {sum(explicit)}, but model.n_layers={n_layers}")
        if any(int(k) < 1 for k in explicit):
            problems.append(f"strategy.pp_layers={explicit}: every stage needs at least one layer")
    return problems


def pipeline_transform(strategy, model: nn.Module) -> nn.Module:
    """Keep this rank's stages of ``model`` (``Transformer.part``) and mark them:
    its parameters are ``Owned`` on pp, except a tied embedding held by both the
    first and the last pipeline rank, which is ``Partial`` over their role group
    (its two gradients are summed, Megatron's embedding group). The step runner
    becomes the pipeline executor."""
    from xtrain.parallel.pipeline.executor import PipelineRunner

    mesh, opts = strategy.mesh, strategy.options
    p = mesh.degrees["pp"]
    if p == 1:
        return model
    name = opts.get("pp_schedule", "1f1b")
    v = int(opts.get("pp_chunks", 1) or 1) if name in CHUNKED_SCHEDULES else 1
    ref = schedule_layout(name, p, v)  # the stage map depends on (name, p, v) only
    blocks = [ref.stage_layers_of(s) for s in range(ref.n_stages)]
    layers = stage_layers(model, max(blocks) + 1, opts.get("pp_layers"))
    path, s = [], min(ref.first_stages)
    while s is not None:
        path.append(s)
        s = ref.next_stage(s)
    plan = StagePlan(name, p, v, layers, list(ref.stage_rank), blocks, frozenset(ref.first_stages),
                     frozenset(ref.last_stages), path, mesh.coord("pp"))
    mine = plan.my_stages
    first, last = any(s in plan.first_stages for s in mine), any(s in plan.last_stages for s in mine)
    tied = model.head.weight is model.embed.weight
    part = model.part(sorted({i for s in mine for i in layers[blocks[s]]}), first=first, last=last)
    holders = {}  # layer block -> the pipeline ranks that run it
    for s, b in enumerate(blocks):
        holders.setdefault(b, set()).add(plan.stage_rank[s])
    duplicated = any(len(h) > 1 for h in holders.values())
    if duplicated and any(h != {r, p - 1 - r} for h in holders.values() for r in h):
        raise ValueError(f"schedule {name}: a layer block on ranks other than a mirror pair (r, p-1-r)")
    ends_apart = plan.stage_rank[min(plan.first_stages)] != plan.stage_rank[max(plan.last_stages)]
    for prm in part.parameters():
        if duplicated:  # every layer on this rank also lives on its mirror: gradients summed over the pair
            mark(prm, "pp", Partial(MIRROR_ROLE))
        elif tied and ends_apart and part.embed is not None and prm is part.embed.weight:
            mark(prm, "pp", Partial(TIED_ROLE))
        else:
            mark(prm, "pp", Owned())
    strategy.pipeline = plan
    strategy.model_axes.append("pp")
    strategy.loss_counts = strategy.loss_counts and last
    strategy.eval_loss_counts = strategy.eval_loss_counts and plan.stage_rank[path[-1]] == plan.rank
    strategy.runner_cls = PipelineRunner
    return part
