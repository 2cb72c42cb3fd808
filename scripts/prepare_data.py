"""Turn text files into the byte-level token files that ``data=memmap`` reads.

    python scripts/prepare_data.py --out data/mycorpus notes.txt books/ --pattern "*.txt"
    python -m xtrain.train data=memmap data.path=data/mycorpus

Tokenization is byte-level: every byte of a file is one token (vocabulary
256), so any file round-trips exactly and no tokenizer has to be trained.

Inputs: each FILE is read as given; each DIR is walked recursively for files
whose name matches one of the ``--pattern`` globs (default ``*``), skipping
hidden files and folders (``.git`` and the like), files that look binary (a
NUL byte in their first 8 KiB) and the output folder itself. Files are taken
in sorted order of their resolved paths, so the result does not depend on the
order of the arguments or of the file system.

The split is deterministic and per file: the first ``1 - f`` of each file's
bytes go to train.bin and the last ``f`` (rounded down) to val.bin, with
``f = --val-fraction``. Each split is the concatenation of those pieces in
file order, without separators; meta.json lists every file with its counts,
so any piece can be located again. Splitting every file (rather than holding
out whole files) works for a single large file, and validation then measures
text the model has not seen from every source.

Output (written atomically: temporary names, then renames, meta.json last;
a folder with no meta.json is incomplete)::

    DIR/train.bin   raw token ids, dtype from meta.json (uint8 for bytes)
    DIR/val.bin
    DIR/meta.json   dtype, vocab_size, train_tokens, val_tokens, tokenizer,
                    val_fraction, split, files [{path, bytes, train, val}]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
CHUNK = 1 << 22  # bytes read at a time: memory stays flat for any corpus size
BINARY_PROBE = 8192


class PrepareError(Exception):
    """A problem with the inputs or the output folder, told to the user as is."""


def looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_PROBE)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def find_files(inputs: list[str | Path], patterns: list[str], exclude: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(files to read, files skipped as binary). Raises PrepareError for a
    missing path or when nothing is found."""
    chosen: set[Path] = set()
    skipped: list[Path] = []
    exclude = exclude.resolve() if exclude is not None else None
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise PrepareError(f"no such file or directory: {p}")
        if p.is_file():
            chosen.add(p.resolve())  # named explicitly: always read
            continue
        if not p.is_dir():
            raise PrepareError(f"not a regular file or directory: {p}")
        root = p.resolve()
        for dirpath, dirnames, filenames in os.walk(root):
            d = Path(dirpath)
            # Prune hidden folders and the output folder (whose .bin files would feed back in).
            dirnames[:] = sorted(
                n for n in dirnames if not n.startswith(".") and (exclude is None or (d / n).resolve() != exclude)
            )
            for name in filenames:
                f = d / name
                if _hidden(f.relative_to(root)) or not any(fnmatch.fnmatch(name, pat) for pat in patterns):
                    continue
                if not f.is_file():
                    continue
                if looks_binary(f):
                    skipped.append(f)
                else:
                    chosen.add(f.resolve())
    if not chosen:
        where = ", ".join(str(x) for x in inputs)
        raise PrepareError(
            f"no input files found in {where} matching {' or '.join(repr(p) for p in patterns)}"
            + (f" ({len(skipped)} binary-looking files skipped)" if skipped else "")
        )
    return sorted(chosen, key=str), sorted(skipped, key=str)


def choose_dtype(name: str) -> np.dtype:
    if name == "auto":
        return np.dtype(np.uint8)  # byte tokens: 0..255 fit in one byte
    dt = np.dtype(name)
    if dt not in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32)):
        raise PrepareError(f"--dtype must be auto, uint8, uint16 or uint32, got {name}")
    return dt


def _copy(src, dst, n: int | None, dtype: np.dtype) -> int:
    """Copy n bytes (None: to end of file) from src to dst as tokens; return the count."""
    done = 0
    while n is None or done < n:
        chunk = src.read(CHUNK if n is None else min(CHUNK, n - done))
        if not chunk:
            break
        done += len(chunk)
        if dtype.itemsize == 1:
            dst.write(chunk)
        else:
            dst.write(np.frombuffer(chunk, dtype=np.uint8).astype(dtype).tobytes())
    return done


def prepare(
    inputs: list[str | Path],
    out: str | Path,
    *,
    val_fraction: float = 0.05,
    dtype: str = "auto",
    patterns: list[str] | None = None,
) -> dict:
    """Write train.bin, val.bin and meta.json into ``out``; return the metadata."""
    if not inputs:
        raise PrepareError("no inputs given: name at least one file or directory")
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    patterns = patterns or ["*"]
    dt = choose_dtype(dtype)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} exists and is not a directory")
    files, skipped = find_files(inputs, patterns, exclude=out)
    out.mkdir(parents=True, exist_ok=True)

    tag = f".tmp-{os.getpid()}"
    tmp = {name: out / f"{name}{tag}" for name in ("train.bin", "val.bin", "meta.json")}
    try:
        records, n_train, n_val = [], 0, 0
        with open(tmp["train.bin"], "wb") as ft, open(tmp["val.bin"], "wb") as fv:
            for f in files:
                size = f.stat().st_size
                n_val_f = int(size * val_fraction)
                with open(f, "rb") as src:
                    a = _copy(src, ft, size - n_val_f, dt)
                    b = _copy(src, fv, None, dt)  # the rest, even if the file grew meanwhile
                records.append({"path": str(f), "bytes": a + b, "train": a, "val": b})
                n_train += a
                n_val += b
            for fh in (ft, fv):
                fh.flush()
                os.fsync(fh.fileno())
        if n_train == 0:
            raise PrepareError(f"the {len(files)} input file(s) hold no bytes")
        meta = {
            "dtype": dt.name,
            "vocab_size": VOCAB_SIZE,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "tokenizer": "bytes",
            "val_fraction": val_fraction,
            "split": "per file: first (1 - val_fraction) of its bytes to train, the rest to val",
            "num_files": len(files),
            "patterns": patterns,
            "inputs": [str(Path(x).expanduser().resolve()) for x in inputs],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": records,
        }
        tmp["meta.json"].write_text(json.dumps(meta, indent=1) + "\n")
        # meta.json goes first out and last in: a reader never pairs new bins with old metadata.
        (out / "meta.json").unlink(missing_ok=True)
        os.replace(tmp["train.bin"], out / "train.bin")
        os.replace(tmp["val.bin"], out / "val.bin")
        os.replace(tmp["meta.json"], out / "meta.json")
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    meta["skipped_binary"] = [str(p) for p in skipped]
    return meta


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_summary(meta: dict, out: Path, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    files = meta["files"]
    table = Table(title=f"prepared {out}", show_header=True)
    table.add_column("file")
    for col in ("bytes", "train", "val"):
        table.add_column(col, justify="right")
    shown = files if len(files) <= 12 else files[:10]
    for r in shown:
        table.add_row(r["path"], f"{r['bytes']:,}", f"{r['train']:,}", f"{r['val']:,}")
    if len(files) > len(shown):
        table.add_row(f"... {len(files) - len(shown)} more", "", "", "")
    table.add_row(
        f"[bold]total: {len(files)} files",
        f"[bold]{meta['train_tokens'] + meta['val_tokens']:,}",
        f"[bold]{meta['train_tokens']:,}",
        f"[bold]{meta['val_tokens']:,}",
    )
    console.print(table)
    itemsize = np.dtype(meta["dtype"]).itemsize
    console.print(
        f"tokenizer=bytes vocab={meta['vocab_size']} dtype={meta['dtype']} "
        f"val_fraction={meta['val_fraction']} | on disk {human((meta['train_tokens'] + meta['val_tokens']) * itemsize)} "
        f"| {seconds:.2f} s"
    )
    if meta["skipped_binary"]:
        console.print(f"[yellow]skipped {len(meta['skipped_binary'])} binary-looking file(s)[/], e.g. {meta['skipped_binary'][0]}")
    if meta["val_tokens"] < 1024:
        console.print(
            f"[yellow]warning:[/] only {meta['val_tokens']} validation tokens; evaluation needs more than "
            f"train.seq_len + 1 (raise --val-fraction or add text)"
        )
    console.print(f"train with: python -m xtrain.train data=memmap data.path={out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Byte-level tokenize text files into train.bin / val.bin / meta.json for data=memmap.",
    )
    ap.add_argument("inputs", nargs="+", metavar="FILES_OR_DIRS", help="text files, or folders to walk recursively")
    ap.add_argument("--out", required=True, help="output folder (created if missing)")
    ap.add_argument("--val-fraction", type=float, default=0.05, help="the tail of each file kept for validation (default 0.05)")
    ap.add_argument("--dtype", default="auto", help="token dtype on disk: auto (uint8 for bytes), uint16, uint32")
    ap.add_argument(
        "--pattern",
        action="append",
        metavar="GLOB",
        help='file-name glob for files found in folders, e.g. "*.txt"; repeat for several (default: every file)',
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        meta = prepare(args.inputs, args.out, val_fraction=args.val_fraction, dtype=args.dtype, patterns=args.pattern)
    except PrepareError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    print_summary(meta, Path(args.out).expanduser(), time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
