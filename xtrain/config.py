"""Config loading, the run-directory stamp and validation.

Composition (``compose``) refuses a wrong type or an unknown key against the
schema in ``xtrain.schema``; validation (``check_config``) runs on every rank
before any collective. Either way a bad config ends the same everywhere: one
clear message per rank and exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from xtrain import schema
from xtrain.mesh import AXES, MeshError, resolve_degrees
from xtrain.model import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """An impossible configuration; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))

    def __reduce__(self):  # pickles whole across processes (Ray, the spawn harness)
        return (type(self), (self.problems,))


class CompositionError(ConfigError, ConfigCompositionException):
    """The overrides do not compose against the schema (a wrong type, an unknown
    key, an unknown group option). Raised by ``compose``; being both a
    ConfigError and Hydra's ConfigCompositionException, it is caught by code
    written for either."""


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
    """The config ``python -m xtrain.train OVERRIDES`` would get (for tests, scripts and launchers).

    Raises CompositionError, one line per problem (see ``composition_problem``),
    when the overrides do not compose: the same refusal on every rank, before
    any process group exists.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    overrides = list(overrides)
    try:
        if config_search_path().startswith("pkg://"):
            ctx = initialize_config_module("xtrain.configs", version_base=None)
        else:
            ctx = initialize_config_dir(str(CONFIG_DIR), version_base=None)
        with ctx:
            cfg = hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise CompositionError([composition_problem(e, overrides)]) from e
    # Hydra lifts the schema's struct flag for `+key=value`, so appended keys are caught here.
    appended = [_unknown_key(key, f"{key}={_given(key, overrides)!r}") for key in _keys_outside_schema(cfg, schema.XtrainConfig)]
    # A mandatory key (???) that no preset or override filled, e.g. data=memmap without data.path.
    unset = [f"{key}=???: a value is required" for key in sorted(OmegaConf.missing_keys(cfg))]
    if appended or unset:
        raise CompositionError(appended + unset)
    return cfg


def composition_problem(exc: BaseException, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """One line naming what Hydra or OmegaConf refused while composing: the key,
    the value and the expected type (``train.lr='abc': expected a float``), or
    the unknown key and its close matches. ``overrides`` (the ones composed)
    supply the value as the user typed it. An unknown group option keeps Hydra's
    own text, which lists the available options. For a ConfigError, its
    problems (joined as ConfigError prints them).
    """
    if isinstance(exc, ConfigError):
        return "\n  - ".join(exc.problems)
    cause = _omegaconf_cause(exc)
    if cause is None:
        return str(exc).strip()
    key, where = str(cause.full_key), _in_file(exc)
    given = _given(key, overrides)
    shown = key if given is _UNSET else f"{key}={given!r}"
    m = re.match(r"Value '(.*)' of type '(\w+)'", str(cause))
    if given is _UNSET and m:  # the value came from a file, or is an item of a list
        shown = f"{key}={m.group(1)!r}" if m.group(2) == "str" else f"{key}={m.group(1)}"
    expected = schema.field_type(key)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and expected is None:
        return _unknown_key(key, shown) + where
    if isinstance(cause, ValidationError) and expected is not None:
        return f"{shown}: expected {schema.describe_type(expected)}{where}"
    return f"{shown}: {str(cause).splitlines()[0]}{where}"


_UNSET = object()


def _omegaconf_cause(exc: BaseException) -> OmegaConfBaseException | None:
    """The first OmegaConf error in ``exc``'s chain that names a key."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OmegaConfBaseException) and getattr(exc, "full_key", None):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _in_file(exc: BaseException) -> str:
    """`` (in strategy/tp.yaml)`` when Hydra says a config file, not an override, was refused."""
    m = re.match(r"In '([^']+)': \w+ raised while composing", str(exc))
    return f" (in {m.group(1)}.yaml)" if m else ""


def _given(key: str, overrides) -> Any:
    """The value the last override of ``key`` gave (parsed as Hydra does), else _UNSET."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return _UNSET
    values = [o.value() for o in parsed if o.key_or_group == key and o.package is None and not o.is_delete()]
    return values[-1] if values else _UNSET


def _unknown_key(key: str, shown: str) -> str:
    """``shown`` (the key, or key=value) is unknown: name the close matches, else every known key."""
    parent, _, name = key.rpartition(".")
    node = schema.field_type(parent) if parent else schema.XtrainConfig
    if not dataclasses.is_dataclass(node):
        return f"{shown}: unknown key"
    names = [f.name for f in dataclasses.fields(node)]
    close = difflib.get_close_matches(name, names, n=3)
    prefix = f"{parent}." if parent else ""
    if close:
        return f"{shown}: unknown key (did you mean {' or '.join(prefix + c for c in close)}?)"
    return f"{shown}: unknown key; {parent or 'the root'} has {', '.join(names)}"


def _keys_outside_schema(cfg: DictConfig, node: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(node)
    out = []
    for key in cfg.keys():
        if key not in hints:
            out.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(cfg[key], DictConfig):
            out += _keys_outside_schema(cfg[key], hints[key], f"{prefix}{key}.")
    return out


# -- validation ---------------------------------------------------------------


def mesh_degrees(cfg: DictConfig) -> dict[str, int]:
    s = cfg.strategy
    return {a: s.get(a) for a in AXES if a != "dp" or s.get("dp") is not None}


def check_config(cfg: DictConfig, world_size: int, data_vocab: int | None = None) -> list[str]:
    """Every reason this config cannot run on ``world_size`` ranks (empty when it can).

    Types are the schema's business (``compose``); these are the allowed values
    it declares and the checks that need several keys or the world size.
    """
    # A strategy's own check may repeat a schema choice (strategy.reduce_dtype): report it once.
    return list(dict.fromkeys(_problems(cfg, world_size, data_vocab)))


def _one_of(value: Any, allowed: tuple) -> bool:
    # By type too: True == 1, but train.progress=1 is not one of its choices.
    return any(type(value) is type(a) and value == a for a in allowed)


def _problems(cfg: DictConfig, world_size: int, data_vocab: int | None) -> list[str]:
    from xtrain.parallel import STRATEGIES

    problems: list[str] = []
    for key, allowed in schema.choices().items():
        value = OmegaConf.select(cfg, key)
        if not _one_of(value, allowed):
            problems.append(f"{key}={value!r} is not one of {list(allowed)}")

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
    except ValueError as e:  # a model key outside the schema (a config not made by compose)
        problems.append(str(e))
        mcfg = None

    t = cfg.train
    bad_ints = [
        f"train.{key} must be a positive integer, got {t.get(key)!r}"
        for key in ("steps", "global_batch_size", "micro_batches", "seq_len")
        if t.get(key) < 1
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
    if degrees is not None and mcfg is not None and degrees["pp"] > 1:
        from xtrain.parallel.pipeline.stages import check_pipeline

        problems += check_pipeline(cfg.strategy, degrees["pp"], t.micro_batches, mcfg.n_layers)
    if degrees is not None and degrees["cp"] > 1:
        from xtrain.parallel.context import check_context_parallel

        problems += check_context_parallel(cfg.strategy, degrees["cp"], t.seq_len, mcfg, degrees["tp"], sp)
    if degrees is not None and (degrees["ep"] > 1 or (mcfg is not None and mcfg.n_experts)):
        from xtrain.parallel.expert import check_expert_parallel

        problems += check_expert_parallel(cfg.strategy, degrees["ep"], mcfg, sp)
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
