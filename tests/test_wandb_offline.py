"""wandb never touches the network unless the user asks for an online mode.

The run happens in a subprocess whose Python loads ``tests/net_guard``: any
DNS lookup of a non-local name or connect to a non-loopback address is logged
and refused. ``WANDB_MODE`` is removed from the environment, so the offline
mode comes from the config alone (``wandb.mode: offline``, the default).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

GUARD = Path(__file__).resolve().parent / "net_guard"

RUN = """
from xtrain.config import compose
from xtrain.train import run
run(compose(["model=tiny", "train.steps=3", "train.seq_len=32", "train.global_batch_size=4",
             "train.eval_every=0", "train.progress=false", "comm=torch", "logger=wandb",
             "train.out_dir={out}"]))
"""


def _guarded(code: str, log: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(GUARD), XTRAIN_NET_GUARD_LOG=str(log), WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_the_guard_catches_a_lookup(tmp_path):
    log = tmp_path / "net.log"
    proc = _guarded("import socket\ntry:\n    socket.getaddrinfo('example.com', 443)\nexcept OSError as e:\n    print(e)", log, tmp_path)
    assert "network guard" in proc.stdout, proc.stderr
    assert "getaddrinfo('example.com')" in log.read_text()


def test_wandb_logger_offline_by_config_makes_no_network_call(tmp_path):
    pytest.importorskip("wandb")
    log, out = tmp_path / "net.log", tmp_path / "run"
    proc = _guarded(RUN.format(out=out), log, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not log.exists(), log.read_text()[:3000]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
