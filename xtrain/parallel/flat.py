"""Flat parameter groups: the layout the bucketed and sharded strategies share.

A ``FlatGroup`` lays a list of parameters end to end in one 1-D buffer,
padded to a multiple of the shard count n, so rank r owns the contiguous
slice [r·S, (r+1)·S) with S = ceil(numel / n). Reduce-scatter of the flat
gradient leaves each rank exactly its slice; all-gather of the slices
rebuilds the whole. Parameters and gradients can be views into such buffers,
so collectives read and write them without copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class FlatGroup:
    names: list[str]
    params: list[nn.Parameter]
    shards: int  # n: the number of ranks the buffer is split over
    offsets: list[int] = field(init=False)
    numel: int = field(init=False)

    def __post_init__(self):
        # Shapes are recorded now: a sharded parameter's own data may be empty later.
        self.shapes = [tuple(p.shape) for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.offsets, total = [], 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.numel = total

    @property
    def shard_numel(self) -> int:
        return math.ceil(self.numel / self.shards) if self.numel else 0

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.shards

    def shard_range(self, rank: int) -> tuple[int, int]:
        s = self.shard_numel
        return rank * s, (rank + 1) * s

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's shaped view into a flat buffer laid out like this group."""
        return [flat[o : o + n].view(shape) for o, n, shape in zip(self.offsets, self.numels, self.shapes)]

    def flatten(self, tensors, dtype=None, device=None) -> torch.Tensor:
        """A new padded flat buffer holding ``tensors`` (one per parameter) end to end."""
        p0 = self.params[0]
        flat = torch.zeros(self.padded_numel, dtype=dtype or p0.dtype, device=device or p0.device)
        for view, t in zip(self.views(flat), tensors):
            view.copy_(t)
        return flat

    def layout(self) -> dict:
        """A JSON-able description, enough to rebuild full tensors from the shards."""
        return {
            "names": self.names,
            "shapes": [list(shape) for shape in self.shapes],
            "offsets": self.offsets,
            "numel": self.numel,
            "shards": self.shards,
        }


def unique_named_parameters(module: nn.Module, seen: set[int]) -> list[tuple[str, nn.Parameter]]:
    """Parameters of ``module`` (full names from the root) not already in ``seen``."""
    out = []
    for name, p in module.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def model_units(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """Split a model's parameters into units: ``embed`` (the embedding), one per
    transformer block, and ``head`` (everything else: final norm, output head).
    A tied weight lands in the first unit that holds it (the head's tied weight
    stays in ``embed``). Every trainable parameter lands in exactly one unit."""
    seen: set[int] = set()
    units = []
    children = dict(model.named_children())
    if "embed" in children:
        units.append(("embed", [(f"embed.{n}", p) for n, p in unique_named_parameters(children["embed"], seen)]))
    if "blocks" in children:  # named by layer index: a pipeline stage holds only some
        for i, block in children["blocks"].named_children():
            units.append((f"blocks.{i}", [(f"blocks.{i}.{n}", p) for n, p in unique_named_parameters(block, seen)]))
    units.append(("head", unique_named_parameters(model, seen)))
    return [(name, named) for name, named in units if named]


def decay_split(named: list[tuple[str, nn.Parameter]]):
    """(decayed, not decayed): matrices decay, norms and biases (1-D) do not, as in xtrain.optim."""
    return [(n, p) for n, p in named if p.dim() >= 2], [(n, p) for n, p in named if p.dim() < 2]
