"""`python -m xtrain.train` finds its configs from an installed wheel, not only
from a checkout (configs/ ships inside the package as xtrain.configs)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_configs_and_the_entry_point_finds_them(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("xtrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("config.yaml", "strategy/zero3.yaml", "model/tiny.yaml", "data/stdlib.yaml", "hydra/job_logging/xtrain.yaml"):
        assert f"xtrain/configs/{f}" in names, f

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-m", "xtrain.train", "strategy=zero2", "model=tiny", "--cfg", "job"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: zero2" in proc.stdout and "dim: 64" in proc.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import xtrain.config as c; print(c.__file__); print(c.config_search_path())"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert where.stdout.splitlines() == [str(site / "xtrain" / "config.py"), "pkg://xtrain.configs"]
