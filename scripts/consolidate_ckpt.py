#!/usr/bin/env python
"""Write one full state dict (safetensors) from any strategy's checkpoint.

    python scripts/consolidate_ckpt.py outputs/RUN/checkpoints/step_000100 --out model.safetensors

Works for replicated checkpoints (single, dp, ddp) and sharded ones (zero1/2/3:
every rank's slices are stitched back by shards.json). ``--optim`` also writes
the AdamW state by parameter name (``NAME/exp_avg``, ``NAME/exp_avg_sq``,
``NAME/step``) to a second file. Both files are safetensors, so both names
must end in ``.safetensors``. Runs on one process, no torch.distributed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from xtrain.checkpoint import META, optim_to_flat_dict, read_file, read_full_state


def consolidate(ckpt: Path, out: Path, optim_out: Path | None = None) -> dict:
    if not (ckpt / META).is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {META})")
    params, optim = read_full_state(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in params.items()}, str(out), metadata={"source": str(ckpt)})
    if optim_out is not None:
        save_file({k: v.contiguous().reshape(v.shape) for k, v in optim_to_flat_dict(optim).items()}, str(optim_out))
    return {"meta": read_file(ckpt / META), "tensors": len(params), "numel": sum(v.numel() for v in params.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a checkpoints/step_NNNNNN folder")
    ap.add_argument("--out", type=Path, default=None,
                    help="output safetensors file (default: CHECKPOINT/consolidated.safetensors)")
    ap.add_argument("--optim", type=Path, default=None,
                    help="also write the optimizer state to this safetensors file (NAME/exp_avg, NAME/exp_avg_sq, NAME/step)")
    args = ap.parse_args(argv)
    out = args.out or args.checkpoint / "consolidated.safetensors"
    for flag, path in (("--out", out), ("--optim", args.optim)):
        if path is not None and path.suffix != ".safetensors":
            ap.error(f"{flag} {path}: the file is written in safetensors format; name it *.safetensors")
    try:
        info = consolidate(args.checkpoint, out, args.optim)
    except FileNotFoundError as e:
        print(f"consolidate_ckpt: {e}", file=sys.stderr)
        return 2
    meta = info["meta"]
    world = meta.get("world_size")
    print(
        f"{out}: {info['tensors']} tensors, {info['numel']:,} parameters "
        f"(from {meta.get('strategy')} on {world} rank{'' if world == 1 else 's'}, step {meta.get('step')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
