"""scripts/consolidate_ckpt.py on a single-process checkpoint: both outputs are
safetensors (a name that says otherwise is refused), and the summary reads right."""

import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from xtrain.config import compose
from xtrain.train import run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "consolidate_ckpt.py"


def _consolidate(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_consolidate_writes_model_and_optimizer_and_refuses_other_suffixes(tmp_path, tiny_overrides):
    result = run(compose([*tiny_overrides, "comm=torch", "train.steps=2", "train.ckpt_every=2"]), return_params=True)
    ckpt = result.run_dir / "checkpoints" / "step_000002"
    model, optim = tmp_path / "model.safetensors", tmp_path / "optim.safetensors"

    proc = _consolidate(ckpt, "--out", model, "--optim", optim)
    assert proc.returncode == 0, proc.stderr
    assert "(from single on 1 rank, step 2)" in proc.stdout
    full = load_file(str(model))
    assert full.keys() == result.params.keys()
    assert all((full[k] == v).all() for k, v in result.params.items())
    assert {f"{n}/{k}" for n in full for k in ("exp_avg", "exp_avg_sq", "step")} == load_file(str(optim)).keys()

    bad = _consolidate(ckpt, "--optim", tmp_path / "optim.pt")
    assert bad.returncode == 2
    assert "--optim" in bad.stderr and "safetensors format; name it *.safetensors" in bad.stderr
    assert not (tmp_path / "optim.pt").exists()
