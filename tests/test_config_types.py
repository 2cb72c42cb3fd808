"""Typed configs (xtrain/schema.py): a wrong type or an unknown key is refused at
compose time with one message naming the key, the value and the expected type;
the entry point turns it into exit code 2 on every rank, without a traceback."""

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from xtrain import config, schema
from xtrain.config import ConfigError, check_config, compose, composition_problem
from xtrain.model import ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MESSAGE = "[rank {rank}] xtrain: invalid configuration:\n  - train.lr='abc': expected a float\n"


def refusal(overrides) -> list[str]:
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    return e.value.problems


@pytest.mark.parametrize(
    "override, problem",
    [
        ("train.lr=abc", "train.lr='abc': expected a float"),
        ("train.warmup_steps=abc", "train.warmup_steps='abc': expected an integer"),
        ("train.grad_clip=abc", "train.grad_clip='abc': expected a float"),
        ("seed=abc", "seed='abc': expected an integer"),
        ("train.eval_every=abc", "train.eval_every='abc': expected an integer"),
        ("train.steps=1.5", "train.steps=1.5: expected an integer"),
        ("train.betas=[0.9,x]", "train.betas[1]='x': expected a float"),
        ("train.resume=null", "train.resume=None: expected a string"),
        ("strategy.tp=two", "strategy.tp='two': expected an integer"),
        ("strategy.sp=maybe", "strategy.sp='maybe': expected a boolean (true or false)"),
        ("model.dim=big", "model.dim='big': expected an integer"),
        ("data.max_bytes=lots", "data.max_bytes='lots': expected an integer or null"),
    ],
)
def test_a_wrong_type_is_refused_naming_key_value_and_type(override, problem):
    assert refusal(["model=tiny", override]) == [problem]


@pytest.mark.parametrize(
    "override, key, sibling",
    [
        ("train.bogus=1", "train.bogus", "warmup_steps"),
        ("strategy.bogus=1", "strategy.bogus", "pp_schedule"),
        ("model.bogus=1", "model.bogus", "n_kv_heads"),
        ("+train.bogus=1", "train.bogus", "warmup_steps"),  # Hydra's append lifts struct mode
        ("bogus=1", "bogus", "dist_timeout_s"),
    ],
)
def test_an_unknown_key_is_refused_with_the_known_ones(override, key, sibling):
    (problem,) = refusal([override])
    assert problem.startswith(f"{key}=1: unknown key; ") and sibling in problem


def test_a_required_key_left_unset_is_refused():
    assert refusal(["data=memmap"]) == ["data.path=???: a value is required"]
    assert compose(["data=memmap", "data.path=corpus"]).data.path == "corpus"


def test_a_near_miss_suggests_the_key():
    assert refusal(["train.warmup_step=5"]) == ["train.warmup_step=5: unknown key (did you mean train.warmup_steps?)"]


def test_composition_problem_formats_hydras_own_exception():
    # The contract for launchers: compose's error is also a Hydra error, and
    # composition_problem turns the underlying Hydra exception into the same line.
    with pytest.raises(HydraException) as e:
        compose(["strategy.tp=two"])
    assert isinstance(e.value, ConfigError)
    assert composition_problem(e.value.__cause__, ["strategy.tp=two"]) == "strategy.tp='two': expected an integer"
    assert composition_problem(e.value) == "strategy.tp='two': expected an integer"


def test_a_bad_key_in_a_config_file_names_the_file(tmp_path, monkeypatch):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    tp = tmp_path / "configs" / "strategy" / "tp.yaml"
    tp.write_text(tp.read_text().replace("tp: 2", "tp: two"))
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path / "configs")
    assert refusal(["strategy=tp"]) == ["strategy.tp='two': expected an integer (in strategy/tp.yaml)"]


def test_an_unknown_group_option_lists_the_choices():
    (problem,) = refusal(["strategy=nope"])
    assert "Could not find 'strategy/nope'" in problem and "Available options in 'strategy'" in problem
    assert "\tzero3\n" in problem and "schema" not in problem.split("Config search path")[0]


def test_allowed_values_come_from_the_schema():
    allowed = schema.choices()
    assert {"comm", "precision", "device", "backend", "logger", "strategy.reduce_dtype", "strategy.pp_schedule", "train.progress"} <= set(allowed)
    assert allowed["strategy.pp_schedule"] == ("gpipe", "1f1b", "interleaved_1f1b", "zb1p", "dualpipe", "dualpipev")
    for key in allowed:
        problems = check_config(compose(["model=tiny", f"{key}=nonesuch"]), 1)
        assert f"{key}='nonesuch' is not one of {list(allowed[key])}" in problems, key
    # Declared once: a strategy's own check of reduce_dtype is not reported twice.
    problems = check_config(compose(["model=tiny", "strategy=dp", "strategy.reduce_dtype=fp8"]), 2)
    assert sum("strategy.reduce_dtype" in p for p in problems) == 1


def test_progress_is_auto_or_a_boolean():
    assert compose([]).train.progress == "auto"
    for given, want in (("false", False), ("true", True), ("auto", "auto")):
        cfg = compose(["model=tiny", f"train.progress={given}"])
        assert (type(cfg.train.progress), cfg.train.progress) == (type(want), want)
        assert check_config(cfg, 1) == []
    assert "train.progress=1 is not one of ['auto', True, False]" in check_config(compose(["train.progress=1"]), 1)


def test_every_preset_composes_and_strategies_hold_only_their_changes():
    defaults = OmegaConf.structured(schema.StrategyConfig)
    for path in sorted((CONFIGS / "strategy").glob("*.yaml")):
        cfg = compose([f"strategy={path.stem}"])
        assert cfg.strategy.name == path.stem and cfg.strategy.pp == (2 if path.stem == "pp" else 1) and cfg.strategy.dp == -1
        own = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k not in ("defaults", "name")}
        assert all(defaults[k] != v for k, v in own.items()), (path.name, own)
    for group in ("model", "data"):
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            assert compose([f"{group}={path.stem}", "data.path=somewhere"])[group].name == path.stem
    cfg = compose(["model=tiny", "strategy=zero1", "strategy.tp=2", "train.global_batch_size=8"])
    assert (cfg.strategy.name, cfg.strategy.tp, cfg.strategy.reduce_dtype) == ("zero1", 2, "fp32")
    assert check_config(cfg, 4) == []


def test_the_composed_config_stays_typed_and_usable():
    cfg = compose(["model=tiny"])
    assert OmegaConf.to_container(cfg.train, resolve=True)["out_dir"].startswith("outputs/")  # an interpolated str
    assert ModelConfig.from_dict(OmegaConf.to_container(cfg.model)) == ModelConfig()
    again = pickle.loads(pickle.dumps(cfg))  # as Ray ships it to the workers
    with pytest.raises(ValidationError):
        again.train.lr = "abc"


def test_the_packaged_configs_carry_the_schema(tmp_path, monkeypatch):
    # Without a configs/ folder next to the package, compose reads pkg://xtrain.configs, as from a wheel.
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path / "absent")
    assert config.config_search_path() == "pkg://xtrain.configs"
    assert compose(["strategy=tp"]).strategy.tp == 2
    assert refusal(["train.lr=abc"]) == ["train.lr='abc': expected a float"]


def test_the_entry_point_exits_2_with_one_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xtrain.train", "train.lr=abc"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr == MESSAGE.format(rank=0) and proc.stdout == ""
    assert not (tmp_path / "outputs").exists()


def _main_on_rank(rank, world, argv):
    """``xtrain.train.main`` with ``argv`` on one rank: (exit code, what it printed on stderr)."""
    import contextlib
    import io

    from xtrain.train import main

    err = io.StringIO()
    sys.argv = ["xtrain", *argv]
    with contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            return e.code, err.getvalue()
    return 0, err.getvalue()


def test_every_rank_prints_the_message_once(tmp_path):
    # Ranks spawned with torchrun's environment (RANK, WORLD_SIZE, ...) and no
    # process group: the config is refused before any collective could start.
    from xtrain.spawn import run_on_ranks

    results = run_on_ranks(_main_on_rank, 2, ["model=tiny", "train.lr=abc", f"train.out_dir={tmp_path}"],
                           backend=None, timeout=120)
    assert results == [(2, MESSAGE.format(rank=0)), (2, MESSAGE.format(rank=1))]