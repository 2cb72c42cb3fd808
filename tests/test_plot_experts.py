"""scripts/plot_experts.py on a tiny single-process MoE run: the PNG is written,
the arrays drawn have one row per MoE layer and expert and one column per
step, and a missing file or a dense run exits 2."""

import importlib.util
import json
from pathlib import Path

import pytest

from xtrain.config import compose
from xtrain.train import run

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("plot_experts", ROOT / "scripts" / "plot_experts.py")
plot_experts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_experts)


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_run")
    run(compose(["model=tiny_moe", "train.steps=3", "train.seq_len=32", "train.global_batch_size=4",
                 "train.progress=false", f"train.out_dir={d}"]), run_dir=d)
    return d


def test_plot_experts_draws_the_run(moe_run, tmp_path):
    out = tmp_path / "experts.png"
    assert plot_experts.main([str(moe_run), "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 1000
    a = plot_experts.expert_arrays(moe_run)
    L, E, S = 2, 4, 3  # tiny_moe: 2 MoE layers of 4 experts; 3 steps
    assert a["steps"].tolist() == [1, 2, 3]
    assert a["counts"].shape == a["load"].shape == (L, E, S)
    assert (a["counts"].sum(axis=1) == 4 * 32 * 2).all()  # every token's top-2 assignments, each step
    assert abs(a["load"].sum(axis=1) - 1).max() < 1e-12
    assert a["ep_bytes"] == {} and a["ep_total"].shape == a["per_layer"].shape == (S,)


def test_plot_experts_fails_clearly(tmp_path, capsys):
    assert plot_experts.main([str(tmp_path)]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    assert plot_experts.main([str(tmp_path)]) == 2
    assert "not a MoE run" in capsys.readouterr().err


def test_plot_experts_counts_ep_traffic_only(tmp_path):
    rec = {"step": 1, "moe_tokens_per_expert": [[3, 1], [2, 2]],
           "comm": {"all_to_all_single@ep": {"bytes_sent": 100}, "all_reduce@ep": {"bytes_sent": 7},
                    "all_gather_into_tensor@dp": {"bytes_sent": 5}, "all_gather_into_tensor@ep": {"bytes_sent": 10},
                    "reduce_scatter_single@ep": {"bytes_sent": 4}, "reduce_scatter_tensor@ep": {"bytes_sent": 6}}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    a = plot_experts.expert_arrays(tmp_path)
    assert {k: v.tolist() for k, v in a["ep_bytes"].items()} == {"all_to_all": [100], "all_gather": [10],
                                                               "reduce_scatter": [10]}
    assert a["per_layer"].tolist() == [60.0]
