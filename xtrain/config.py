"""Config loading, the run-directory stamp and validation.

Validation runs on every rank before any collective, so a bad config ends the
same way everywhere: one clear message per rank and a non-zero exit.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xtrain.mesh import AXES, MeshError, resolve_degrees
from xtrain.model import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CHOICES = {
    "comm": ("xtrain", "torch"),
    "precision": ("fp32", "bf16"),
    "device": ("auto", "cpu", "cuda"),
    "backend": ("auto", "gloo", "nccl"),
    "logger": ("none", "wandb"),
}


class ConfigError(ValueError):
    """An impossible configuration; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))

    def __reduce__(self):  # pickles whole across processes (Ray, the spawn harness)
        return (type(self), (self.problems,))


def config_search_path() -> str:
    """The configs/ folder of a checkout or editable install, else the packaged copy."""
    return str(CONFIG_DIR) if (CONFIG_DIR / "config.yaml").is_file() else "pkg://xtrain.configs"


# -- resolvers --------------------------------------------------------------

_stamp: str | None = None


def run_stamp() -> str:
    """A timestamp that every rank of one job agrees on, naming the run directory.

    Ranks resolve the config independently and may straddle a second, so under
    torchrun the first rank to ask stores its stamp in the agent's TCPStore
    (not a collective) and the others read it back. XTRAIN_RUN_STAMP overrides
    (the Ray launcher sets it for its workers).
    """
    global _stamp
    if os.environ.get("XTRAIN_RUN_STAMP"):
        return os.environ["XTRAIN_RUN_STAMP"]
    if _stamp is None:
        now = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            import torch.distributed as dist

            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=60)
            )
            now = store.compare_set("xtrain/run_stamp", "", now).decode()
        _stamp = now
    return _stamp


def rank0_only(value):
    """``value`` on global rank 0, None elsewhere (for files only one rank writes)."""
    return value if os.environ.get("RANK", "0") == "0" else None


def register_resolvers() -> None:
    for name, fn in (("xtrain.stamp", run_stamp), ("xtrain.rank0_only", rank0_only)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config ``python -m xtrain.train OVERRIDES`` would get (for tests and scripts)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    if config_search_path().startswith("pkg://"):
        ctx = initialize_config_module("xtrain.configs", version_base=None)
    else:
        ctx = initialize_config_dir(str(CONFIG_DIR), version_base=None)
    with ctx:
        return hydra_compose("config", overrides=list(overrides))


# -- validation ---------------------------------------------------------------


def mesh_degrees(cfg: DictConfig) -> dict[str, int]:
    s = cfg.strategy
    return {a: s.get(a) for a in AXES if a != "dp" or s.get("dp") is not None}


def check_config(cfg: DictConfig, world_size: int, data_vocab: int | None = None) -> list[str]:
    """Every reason this config cannot run on ``world_size`` ranks (empty when it can)."""
    from xtrain.parallel import STRATEGIES

    problems: list[str] = []
    for key, allowed in CHOICES.items():
        if cfg.get(key) not in allowed:
            problems.append(f"{key}={cfg.get(key)!r} is not one of {list(allowed)}")

    name = cfg.strategy.get("name")
    if name not in STRATEGIES:
        problems.append(f"strategy.name={name!r} is not one of {sorted(STRATEGIES)}")
        return problems
    strategy_cls = STRATEGIES[name]

    try:
        degrees = resolve_degrees(world_size, **mesh_degrees(cfg))
    except MeshError as e:
        problems.append(str(e))
        degrees = None
    if degrees is not None:
        problems += strategy_cls.check(cfg.strategy, degrees, world_size)

    try:
        mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
        problems += mcfg.check()
    except (ValueError, TypeError) as e:
        problems.append(str(e))
        mcfg = None

    t = cfg.train
    bad_ints = [
        f"train.{key} must be a positive integer, got {t.get(key)!r}"
        for key in ("steps", "global_batch_size", "micro_batches", "seq_len")
        if not isinstance(t.get(key), int) or t.get(key) < 1
    ]
    if bad_ints:
        return problems + bad_ints

    if mcfg is not None and t.seq_len > mcfg.max_seq_len:
        problems.append(f"train.seq_len={t.seq_len} is above the model's limit model.max_seq_len={mcfg.max_seq_len}")
    if degrees is not None:
        dp = degrees["dp"]
        if t.global_batch_size % (dp * t.micro_batches):
            problems.append(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"dp*micro_batches = {dp}*{t.micro_batches} = {dp * t.micro_batches}"
            )
    sp = bool(cfg.strategy.get("sp", False))
    if degrees is not None and mcfg is not None and (degrees["tp"] > 1 or sp):
        from xtrain.parallel.tensor import check_tensor_parallel

        if sp and degrees["tp"] == 1:
            problems.append("strategy.sp=true (sequence parallel) needs strategy.tp > 1")
        problems += check_tensor_parallel(mcfg, degrees["tp"], sp, t.seq_len)
    if data_vocab is not None and mcfg is not None and data_vocab > mcfg.vocab_size:
        problems.append(f"the data has {data_vocab} token ids but model.vocab_size={mcfg.vocab_size}")
    if not t.lr > 0:
        problems.append(f"train.lr must be > 0, got {t.lr}")
    if t.warmup_steps < 0 or not 0 <= t.min_lr_ratio <= 1:
        problems.append("train.warmup_steps must be >= 0 and train.min_lr_ratio in [0, 1]")
    resume = str(t.resume)
    if resume not in ("none", "auto", "None") and not Path(resume).expanduser().exists():
        problems.append(f"train.resume={resume}: no such checkpoint")
    return problems
