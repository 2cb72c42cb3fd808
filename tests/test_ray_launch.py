"""The Ray launcher: dp on 2 Ray workers matches `single`, and bad input fails fast.

One local Ray instance serves the whole module (starting Ray takes 5-10 s).
It runs with token auth off and no dashboard; nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import time

import pytest

ray = pytest.importorskip("ray", reason="the Ray launcher needs ray: pip install -e '.[ray]'")

from xtrain.config import ConfigError, compose  # noqa: E402
from xtrain.ray_launcher import LaunchError, launch, main, plan_ranks  # noqa: E402

TINY = [
    "model=tiny",
    "comm=torch",
    "train.steps=4",
    "train.seq_len=32",
    "train.global_batch_size=4",
    "train.eval_batches=1",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def ray_cluster():
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "WANDB_MODE")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["WANDB_MODE"] = "offline"
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dp_on_two_ray_workers_matches_single(ray_cluster, tmp_path):
    from xtrain.train import run

    ray_dir = tmp_path / "ray"
    results = launch(["strategy=dp", "ray.num_workers=2", f"train.out_dir={ray_dir}", *TINY], timeout_s=240)

    assert len(results) == 2 and all(r.run_dir == ray_dir for r in results)
    for name in ("metrics.jsonl", "config.yaml", "rank0.log", "rank1.log", ".hydra/overrides.yaml"):
        assert (ray_dir / name).is_file(), name
    records = _metrics(ray_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]

    single_dir = tmp_path / "single"
    reference = run(compose(["strategy=single", f"train.out_dir={single_dir}", *TINY]))
    assert len(reference.losses) == 4
    for got, want in zip([r["loss"] for r in records], reference.losses):
        assert got == pytest.approx(want, rel=1e-5)
    assert results[0].losses == pytest.approx(reference.losses, rel=1e-5)


def test_bad_config_fails_in_the_driver_before_any_worker(ray_cluster, tmp_path):
    out = tmp_path / "bad"
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="global_batch_size=3 is not divisible by dp"):
        launch(["strategy=dp", "ray.num_workers=2", f"train.out_dir={out}", *TINY, "train.global_batch_size=3"])
    assert time.monotonic() - t0 < 30
    assert not out.exists()


def test_bad_config_in_the_workers_names_the_rank_and_does_not_hang(ray_cluster, tmp_path):
    # check=False skips the driver's validation, so the workers' own check must stop the job.
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank \d of 2 failed: invalid configuration") as info:
        launch(
            ["strategy=dp", "ray.num_workers=2", f"train.out_dir={tmp_path / 'bad'}", *TINY, "train.global_batch_size=3"],
            check=False,
            timeout_s=120,
        )
    assert info.value.rank in (0, 1) and info.value.config_error
    assert "global_batch_size=3 is not divisible" in str(info.value)
    assert time.monotonic() - t0 < 60


def test_main_reports_a_bad_config_with_exit_code_2(capsys, tmp_path):
    code = main(["strategy=dp", "ray.num_workers=2", f"train.out_dir={tmp_path}", *TINY, "train.global_batch_size=3"])
    assert code == 2
    assert "invalid configuration" in capsys.readouterr().err


def test_plan_ranks_keeps_each_node_contiguous():
    places = plan_ranks(["a", "b", "a", "b", "a"])
    assert [(p.rank, p.node_id, p.local_rank, p.local_world_size, p.node_rank) for p in places] == [
        (0, "a", 0, 3, 0),
        (1, "a", 1, 3, 0),
        (2, "a", 2, 3, 0),
        (3, "b", 0, 2, 1),
        (4, "b", 1, 2, 1),
    ]
    assert [p.bundle_index for p in places] == [0, 2, 4, 1, 3]
