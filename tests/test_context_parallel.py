"""Context parallel training against strategy=single: per-step losses within
1e-5 relative and final parameters within 1e-5, 10 steps, model=tiny, fp32.

cp 2 and 4 for ring (zigzag and contiguous), allgather and ulysses; cp2 x dp2
under zero1, ddp, zero2 and zero3; cp2 x tp2 (with sequence parallel too);
cp2 x pp2. Both comms on every 2-rank case; on 4 ranks the cases alternate
between them. A cp2 x dp2 checkpoint resumes at cp=4 and at cp=1. bf16 cp
training stays within a tested distance of bf16 single. Bad cp configs are
refused before any collective.
"""

import json

import pytest
from parity import TINY_10_STEPS, assert_parity, run_many, single_reference

from xtrain.config import check_config, compose

BASE = TINY_10_STEPS
ULYSSES4 = ("model.n_heads=8", "model.n_kv_heads=4")  # Ulysses at cp=4 shards 4 kv heads
VARIANTS = [
    "strategy=cp",
    "strategy=cp strategy.cp_layout=contiguous",
    "strategy=cp strategy.cp_attn=allgather",
    "strategy=cp strategy.cp_attn=ulysses",
]
FOUR = [
    "strategy=cp strategy.cp=4",
    "strategy=cp strategy.cp=4 strategy.cp_layout=contiguous",
    "strategy=cp strategy.cp=4 strategy.cp_attn=allgather",
    "strategy=cp strategy.cp=4 strategy.cp_attn=ulysses " + " ".join(ULYSSES4),
    "strategy=zero1 strategy.cp=2",
    "strategy=ddp strategy.cp=2 strategy.cp_attn=allgather",
    "strategy=zero2 strategy.cp=2 strategy.cp_layout=contiguous",
    "strategy=zero3 strategy.cp=2",
    "strategy=cp strategy.tp=2",
    "strategy=zero1 strategy.cp=2 strategy.tp=2 strategy.sp=true strategy.cp_attn=ulysses " + " ".join(ULYSSES4),
    "strategy=cp strategy.pp=2",
    "strategy=cp strategy.pp=2 strategy.pp_schedule=zb1p train.micro_batches=2 strategy.cp_layout=contiguous",
]


def _reference(layout: str, tmp_path):
    extra = tuple(o for o in layout.split() if o.startswith("model."))
    return single_reference((*BASE, *extra, "comm=torch", f"train.out_dir={tmp_path / 'ref'}"))


def test_context_parallel_matches_single_on_2_ranks(tmp_path):
    todo = [(layout, comm) for layout in VARIANTS for comm in ("xtrain", "torch")]
    configs = [[*BASE, *layout.split(), f"comm={comm}", f"train.out_dir={tmp_path / str(i)}"] for i, (layout, comm) in enumerate(todo)]
    configs.append([*BASE, "strategy=cp", "precision=bf16", f"train.out_dir={tmp_path / 'bf16'}"])
    results = run_many(configs, 2, timeout=600)
    ref = _reference("", tmp_path)
    for i, ((layout, comm), got) in enumerate(zip(todo, results)):
        assert_parity(ref, got, label=f"{layout} comm={comm}")
        rec = json.loads((tmp_path / str(i) / "metrics.jsonl").read_text().splitlines()[-1])
        assert any(k.endswith("@cp") for k in rec["comm"]), rec["comm"].keys()
    bf16_ref = single_reference((*BASE, "precision=bf16", f"train.out_dir={tmp_path / 'ref_bf16'}"))
    for a, b in zip(results[-1][0], bf16_ref[0]):
        assert abs(a - b) <= 2e-3 * abs(b), (a, b)


def test_context_parallel_matches_single_on_4_ranks(tmp_path):
    todo = [(layout, ("xtrain", "torch")[i % 2]) for i, layout in enumerate(FOUR)]
    configs = [[*BASE, *layout.split(), f"comm={comm}", f"train.out_dir={tmp_path / str(i)}"] for i, (layout, comm) in enumerate(todo)]
    # cp2 x dp2 zero1, checkpointed at step 5, resumed at cp=4 (ring) and at cp=1 (ddp, dp=4)
    ckpt = tmp_path / "ckpt"
    configs.append([*BASE, "strategy=zero1", "strategy.cp=2", "train.ckpt_every=5", f"train.out_dir={ckpt}"])
    step5 = f"train.resume={ckpt / 'checkpoints' / 'step_000005'}"
    configs.append([*BASE, "strategy=cp", "strategy.cp=4", step5, f"train.out_dir={tmp_path / 'cp4'}"])
    configs.append([*BASE, "strategy=ddp", step5, f"train.out_dir={tmp_path / 'cp1'}"])
    results = run_many(configs, 4, timeout=900)
    for (layout, comm), got in zip(todo, results):
        assert_parity(_reference(layout, tmp_path), got, label=f"{layout} comm={comm} world=4")
    ref = _reference("", tmp_path)
    saved, cp4, cp1 = results[len(todo):]
    assert_parity(ref, saved, label="zero1 cp2 x dp2 checkpointed run")
    assert_parity((ref[0][5:], ref[1]), cp4, label="resumed at cp=4")
    assert_parity((ref[0][5:], ref[1]), cp1, label="resumed at cp=1")


def _problems(overrides, world):
    return "\n".join(check_config(compose([*BASE, *overrides]), world))


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["strategy=cp", "train.seq_len=30"], 2, "train.seq_len=30 is not divisible by 4 (2·cp"),
        (["strategy=cp", "strategy.cp_layout=contiguous", "train.seq_len=33"], 2, "train.seq_len=33 is not divisible by 2 (cp"),
        (["strategy=cp", "strategy.cp=4", "strategy.cp_attn=ulysses"], 4, "n_heads 4 and n_kv_heads 2 must both be divisible by cp"),
        (["strategy=cp", "strategy.cp_attn=tree"], 2, "strategy.cp_attn='tree' is not one of ['ring', 'allgather', 'ulysses']"),
        (["strategy=cp", "strategy.cp_layout=striped"], 2, "strategy.cp_layout='striped' is not one of ['zigzag', 'contiguous']"),
        (["strategy=cp", "strategy.tp=2", "strategy.sp=true", "strategy.cp_layout=contiguous", "train.seq_len=34"], 4, "sequence parallel splits each rank's 17 columns"),
        (["strategy=cp", "strategy.cp=3"], 2, "world size 2 is not divisible by pp*cp*tp = 1*3*1"),
    ],
)
def test_bad_context_parallel_configs_are_named(overrides, world, message):
    assert message in _problems(overrides, world)


def test_good_context_parallel_configs_pass():
    assert _problems(["strategy=cp"], 2) == ""
    assert _problems(["strategy=cp", "strategy.cp=4", "strategy.cp_attn=ulysses", *ULYSSES4], 4) == ""
    assert _problems(["strategy=zero3", "strategy.cp=2"], 4) == ""
