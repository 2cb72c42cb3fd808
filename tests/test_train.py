"""Single-process training: learning, metrics, accumulation, precision, resume."""

import json

import torch

from xtrain.checkpoint import complete_checkpoints
from xtrain.config import compose
from xtrain.train import run

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "peak_mem_bytes", "comm"}


def test_loss_falls_on_default_data_within_100_steps(tmp_path):
    cfg = compose(
        [
            "model=tiny",
            "comm=torch",
            "train.steps=100",
            "train.seq_len=64",
            "train.global_batch_size=16",
            "train.eval_every=50",
            "train.progress=false",
            f"train.out_dir={tmp_path}",
        ]
    )
    result = run(cfg)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert first > 5.0  # about ln(256) = 5.55 at init
    assert last < first - 1.5, (first, last)
    assert result.val_losses[100] < result.val_losses[50] < first

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 101))
    assert all(METRIC_KEYS <= r.keys() for r in records)
    assert records[-1]["tokens"] == 100 * 16 * 64
    assert {"val_loss"} <= records[49].keys() and "val_loss" not in records[48]
    assert records[0]["lr"] < records[19]["lr"]  # warmup
    assert (tmp_path / "config.yaml").is_file()


def test_gradient_accumulation_matches_one_big_batch(tiny_overrides):
    one = run(compose([*tiny_overrides, "comm=torch", "train.micro_batches=1"]), return_params=True)
    two = run(compose([*tiny_overrides, "comm=torch", "train.micro_batches=3"]), return_params=True)
    for a, b in zip(one.losses, two.losses):
        assert abs(a - b) <= 1e-5 * abs(a)
    for k in one.params:
        assert torch.allclose(one.params[k], two.params[k], atol=1e-5)


def test_bf16_tracks_fp32(tiny_overrides):
    fp32 = run(compose([*tiny_overrides, "comm=torch"]), return_params=True)
    bf16 = run(compose([*tiny_overrides, "comm=torch", "precision=bf16"]), return_params=True)
    # bf16 autocast with fp32 master weights: per-step loss within 2% of fp32 on tiny over 10 steps.
    for a, b in zip(fp32.losses, bf16.losses):
        assert abs(a - b) <= 0.02 * abs(a), (a, b)
    assert all(p.dtype == torch.float32 for p in bf16.params.values())


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, tiny_overrides):
    base = [o for o in tiny_overrides if not o.startswith("train.out_dir")] + ["comm=torch"]
    straight = run(compose([*base, f"train.out_dir={tmp_path / 'straight'}"]), return_params=True)

    out = tmp_path / "interrupted"
    first = run(compose([*base, f"train.out_dir={out}", "train.steps=10", "train.ckpt_every=4", "train.ckpt_keep=5"]))
    assert [d.name for d in complete_checkpoints(out)] == ["step_000004", "step_000008", "step_000010"]
    # resume by path from step 4: steps 5..10 must replay bit for bit
    resumed = run(
        compose([*base, f"train.out_dir={out}", f"train.resume={out / 'checkpoints' / 'step_000004'}"]),
        return_params=True,
    )
    assert resumed.start_step == 4
    assert resumed.losses == straight.losses[4:]  # exact, not approximately
    for k in straight.params:
        assert torch.equal(resumed.params[k], straight.params[k])
    assert first.losses == straight.losses

    auto = run(compose([*base, f"train.out_dir={out}", "train.resume=auto", "train.steps=12"]))
    assert auto.start_step == 10 and len(auto.losses) == 2


def test_incomplete_checkpoint_is_ignored(tmp_path, tiny_overrides):
    base = [o for o in tiny_overrides if not o.startswith("train.out_dir")] + ["comm=torch"]
    out = tmp_path / "run"
    run(compose([*base, f"train.out_dir={out}", "train.steps=4", "train.ckpt_every=2"]))
    (out / "checkpoints" / "step_000004" / "meta.json").unlink()  # as if killed mid-save
    resumed = run(compose([*base, f"train.out_dir={out}", "train.steps=4", "train.resume=auto"]))
    assert resumed.start_step == 2


def test_resume_auto_with_nothing_to_resume_says_where_it_looked(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "fresh"
    result = run(compose([*tiny_overrides, "comm=torch", "train.steps=2", "train.resume=auto", f"train.out_dir={out}"]))
    assert result.start_step == 0 and len(result.losses) == 2
    printed = " ".join(capsys.readouterr().out.split())  # rich may wrap a long path
    assert f"train.resume=auto: no complete checkpoint in {out / 'checkpoints'}; training from step 0" in printed


def test_a_resumed_run_logs_each_step_once(tmp_path, tiny_overrides):
    base = [o for o in tiny_overrides if not o.startswith("train.out_dir")] + ["comm=torch", "train.ckpt_keep=5"]
    out = tmp_path / "run"
    straight = run(compose([*base, f"train.out_dir={out}", "train.ckpt_every=4"]))
    # as if the job died after step 10 but before checkpoints 8 and 10 were sealed
    for step in (8, 10):
        (out / "checkpoints" / f"step_{step:06d}" / "meta.json").unlink()
    resumed = run(compose([*base, f"train.out_dir={out}", "train.ckpt_every=4", "train.resume=auto"]))
    assert resumed.start_step == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["loss"] for r in records] == straight.losses
