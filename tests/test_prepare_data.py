"""scripts/prepare_data.py: byte-exact token files that ``data=memmap`` trains on,
and a clear error when the data folder is missing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xtrain.config import ConfigError, compose
from xtrain.data import load_memmap
from xtrain.train import run

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "prepare_data.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_data = _load_script()


def _write_corpus(root: Path) -> dict[str, bytes]:
    """A few text files (with non-ASCII bytes) in nested folders, plus files that must be ignored."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "naïve", "café", "über", "λόγος", "\n", "\t", "42", "."]
    texts = {
        "a.txt": " ".join(rng.choice(words, 3000)),
        "sub/b.txt": " ".join(rng.choice(words, 2000)),
        "sub/deeper/c.txt": "short file\n",
    }
    files = {}
    for rel, text in texts.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("utf-8"))
        files[rel] = p.read_bytes()
    (root / "notes.md").write_text("not matched by the pattern")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden folders are skipped")
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = _write_corpus(root / "text")
    out = root / "tokens"
    # The real command line, once: exit code 0 and a summary.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--pattern", "*.txt", "--val-fraction", "0.1", str(root / "text")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "data=memmap" in proc.stdout
    return root / "text", out, files


def test_bins_round_trip_to_the_original_bytes(corpus):
    text_dir, out, files = corpus
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint8" and meta["vocab_size"] == 256 and meta["tokenizer"] == "bytes"
    assert sorted(out.iterdir()) == [out / "meta.json", out / "train.bin", out / "val.bin"]  # no temp files left
    # Exactly the *.txt files outside hidden folders, in sorted path order.
    assert [r["path"] for r in meta["files"]] == [str((text_dir / rel).resolve()) for rel in sorted(files)]

    train = (out / "train.bin").read_bytes()
    val = (out / "val.bin").read_bytes()
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    ti = vi = 0
    for r, rel in zip(meta["files"], sorted(files)):
        original = files[rel]
        assert r["bytes"] == len(original) and r["val"] == int(len(original) * 0.1)
        # Each file's head is in train.bin and its tail in val.bin, in file order.
        assert train[ti : ti + r["train"]] + val[vi : vi + r["val"]] == original
        ti, vi = ti + r["train"], vi + r["val"]
    assert (ti, vi) == (len(train), len(val))

    data = load_memmap(out)
    assert data.vocab_size == 256
    assert bytes(np.asarray(data.train)) == train and bytes(np.asarray(data.val)) == val


def test_uint16_round_trip_and_output_folder_inside_the_input(tmp_path):
    files = _write_corpus(tmp_path / "text")
    out = tmp_path / "text" / "tokens"  # inside the walked folder: must not feed back into itself
    for _ in range(2):
        meta = prepare_data.prepare([tmp_path / "text"], out, val_fraction=0.2, dtype="uint16", patterns=["*.txt", "*.bin"])
    assert meta["dtype"] == "uint16" and len(meta["files"]) == len(files)
    data = load_memmap(out)
    everything = np.concatenate([np.asarray(data.train), np.asarray(data.val)])
    assert everything.dtype == np.uint16 and everything.max() < 256
    assert sorted(bytes(everything.astype(np.uint8))) == sorted(b"".join(files.values()))


def test_prepare_errors_are_clear(tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    assert prepare_data.main(["--out", str(tmp_path / "o"), str(missing)]) == 2
    assert f"no such file or directory: {missing}" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.md").write_text("markdown")
    assert prepare_data.main(["--out", str(tmp_path / "o"), "--pattern", "*.txt", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no input files found" in err and str(tmp_path / "empty") in err and "*.txt" in err

    with pytest.raises(prepare_data.PrepareError, match="val-fraction"):
        prepare_data.prepare([tmp_path / "empty" / "a.md"], tmp_path / "o", val_fraction=1.0)
    assert not (tmp_path / "o").exists()  # nothing written on error


def _overrides(path, out_dir):
    return [
        "model=tiny",
        "data=memmap",
        f"data.path={path}",
        "comm=torch",
        "train.steps=4",
        "train.seq_len=32",
        "train.global_batch_size=4",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.warmup_steps=1",
        "train.progress=false",
        f"train.out_dir={out_dir}",
    ]


def test_memmap_data_trains(corpus, tmp_path):
    _, out, _ = corpus
    result = run(compose(_overrides(out, tmp_path / "run")))
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert result.losses[0] == pytest.approx(np.log(256), rel=0.1)  # a fresh byte model starts near uniform
    assert sorted(result.val_losses) == [2, 4]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_missing_data_folder_is_a_config_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=str(missing / "meta.json")):
        run(compose(_overrides(missing, tmp_path / "run")))


def test_missing_data_folder_from_the_command_line(tmp_path):
    missing = tmp_path / "nowhere"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "xtrain.train", *_overrides(missing, tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "invalid configuration" in proc.stderr and str(missing / "meta.json") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 30, f"a missing data folder took {elapsed:.1f} s to report"
