"""The config's schema: every key, its type, its default and its allowed values.

Hydra composes configs/ onto these dataclasses (its "structured config
schema" pattern), so OmegaConf refuses a wrong type or an unknown key at
compose time, before any code runs. configs/config.yaml extends ``xtrain_schema``;
each file of the strategy/, model/ and data/ groups extends its group's schema
with ``defaults: [/schema/<group>@_here_]`` and holds only what it changes.
The schemas live in the group ``schema``, not in the groups themselves, so
they never show up among a group's choices.

Allowed values are declared next to their field (``choice``); ``xtrain.config``
checks them after composition, with the other per-rank checks. Values stay
plain strings: the code compares with strings.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from xtrain.parallel.context.attention import VARIANTS as CP_VARIANTS
from xtrain.parallel.context.kernels import KERNELS as CP_KERNELS
from xtrain.parallel.context.layout import LAYOUTS as CP_LAYOUTS
from xtrain.parallel.expert import DISPATCHERS as EP_DISPATCHERS
from xtrain.parallel.pipeline.schedules import SCHEDULES

from xtrain.model import ModelConfig


def choice(*allowed: Any, default: Any = None) -> Any:
    """A field whose value must be one of ``allowed`` (default: the first), checked by
    ``xtrain.config.check_config`` with the other per-rank checks."""
    default = allowed[0] if default is None else default
    if default not in allowed:
        raise ValueError(f"default {default!r} is not one of {allowed}")
    return field(default=default, metadata={"choices": allowed})


@dataclass
class StrategyConfig:
    """``strategy=``: one schema for every strategy; a preset sets its name and what it changes."""

    name: str = MISSING  # a key of xtrain.parallel.STRATEGIES, checked by check_config
    # Mesh degrees (xtrain.mesh); their product must tile the world size.
    dp: int = -1  # -1: inferred from the world size
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    sp: bool = False  # sequence parallel: norms and residuals sharded along the sequence (needs tp > 1)
    # Data parallelism (dp, ddp, zero*, tp's dp axis).
    reduce_dtype: str = choice("fp32", "bf16", "fp16")  # dtype gradients are reduced in over dp
    bucket_mb: float = 25.0  # ddp: bucket size in MB of gradients
    first_bucket_mb: float = 1.0  # ddp: the first bucket (last layers), small so communication starts early
    prefetch: int = 1  # zero3: units whose all-gather is issued ahead of use (0: none)
    # Pipeline parallelism (pp > 1).
    pp_schedule: str = choice(*SCHEDULES, default="1f1b")  # the registry in parallel/pipeline/schedules.py
    pp_chunks: int = 1  # model chunks per pipeline rank (interleaved schedules)
    pp_layers: Optional[List[int]] = None  # blocks per stage; null: balanced by parameter count
    # Context parallelism (cp > 1): xtrain/parallel/context/.
    cp_attn: str = choice(*CP_VARIANTS)  # ring (default) | allgather (Llama 3) | ulysses (all-to-all over heads)
    cp_layout: str = choice(*CP_LAYOUTS)  # zigzag (rank r: chunks r and 2cp-1-r of 2cp) | contiguous
    cp_kernel: str = choice(*CP_KERNELS)  # auto: the device's fused kernel with log-sum-exp | math
    # Expert parallelism (ep > 1, borrowed from dp): xtrain/parallel/expert.py.
    ep_dispatch: str = choice(*EP_DISPATCHERS)  # alltoall (default) | allgather (the baseline)


# Every field of the model's own dataclass, plus the preset's name: declared once, in ModelConfig.
_model_hints = typing.get_type_hints(ModelConfig)
ModelSchema = dataclasses.make_dataclass(
    "ModelSchema",
    [("name", str, field(default=MISSING))]
    + [
        (f.name, _model_hints[f.name], field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(ModelConfig)
    ],
)
ModelSchema.__doc__ = "``model=``: the fields of xtrain.model.ModelConfig and the preset's name."
ModelSchema.__module__ = __name__  # pickled configs (Ray workers) find the class here


@dataclass
class DataConfig:
    """``data=``: where the tokens come from."""

    name: str = MISSING  # stdlib | memmap (checked by xtrain.data.load_data)
    # memmap: the folder holding meta.json, train.bin and val.bin. Required (???)
    # unless a preset sets it: a preset's own ??? would not override a null here.
    path: Optional[str] = MISSING
    max_bytes: Optional[int] = None  # stdlib: cap the training bytes read (null: all top-level stdlib files)


@dataclass
class TrainConfig:
    """``train.*``: the optimisation loop, evaluation, checkpoints and the run directory."""

    steps: int = 200
    global_batch_size: int = 16  # sequences per optimizer step, summed over all ranks
    micro_batches: int = 1  # gradient accumulation steps per optimizer step
    seq_len: int = 128
    lr: float = 1.0e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1  # not applied to norms and biases
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    eval_every: int = 50  # 0 disables validation
    eval_batches: int = 4
    ckpt_every: int = 0  # 0 disables checkpoints
    ckpt_keep: int = 2  # keep the newest N checkpoints
    resume: str = "none"  # none | auto (latest in this run dir) | a checkpoint path
    log_every: int = 10
    # Rich progress bar on rank 0: auto (only on a terminal) | true | false. A
    # str-or-bool union, which OmegaConf cannot type, so Any plus its choices.
    progress: Any = choice("auto", True, False)
    out_dir: str = "outputs/${xtrain.stamp:}"  # the run directory all ranks agree on
    # Write every pipeline action's start and end, per rank, to RUN/trace.json
    # (Chrome trace / Perfetto format: chrome://tracing, ui.perfetto.dev).
    trace: bool = False


@dataclass
class WandbConfig:
    """``wandb.*``: used when logger=wandb."""

    project: str = "xtrain"
    mode: str = choice("offline", "online", "disabled")  # WANDB_MODE overrides
    name: Optional[str] = None


@dataclass
class RayConfig:
    """``ray.*``: the Ray launcher (xtrain/ray_launcher.py)."""

    num_workers: int = 2
    address: Optional[str] = None  # null starts a local Ray instance; "auto" or host:port joins one
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass
class XtrainConfig:
    """The root: configs/config.yaml picks the groups; everything else has its default here."""

    comm: str = choice("xtrain", "torch")  # hand-written collectives | torch built-ins
    precision: str = choice("fp32", "bf16")  # bf16: autocast; fp32 master weights and optimizer states
    seed: int = 0
    device: str = choice("auto", "cpu", "cuda")  # auto: cuda if available, else cpu
    backend: str = choice("auto", "gloo", "nccl")  # auto: nccl on cuda, gloo on cpu
    dist_timeout_s: float = 300.0  # every collective fails after this, never hangs
    logger: str = choice("none", "wandb")
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    model: ModelSchema = field(default_factory=ModelSchema)  # type: ignore[valid-type]
    data: DataConfig = field(default_factory=DataConfig)


GROUP_SCHEMAS = {"strategy": StrategyConfig, "model": ModelSchema, "data": DataConfig}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore: ``xtrain_schema`` and ``schema/<group>``."""
    cs = ConfigStore.instance()
    cs.store(name="xtrain_schema", node=XtrainConfig, provider="xtrain")
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group="schema", name=group, node=node, provider="xtrain")


register()


def choices(schema: type = XtrainConfig, prefix: str = "") -> Dict[str, Tuple[Any, ...]]:
    """``{dotted key: allowed values}`` for every field declared with ``choice``."""
    out: Dict[str, Tuple[Any, ...]] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if "choices" in f.metadata:
            out[key] = f.metadata["choices"]
        elif dataclasses.is_dataclass(hints[f.name]):
            out.update(choices(hints[f.name], key + "."))
    return out


def field_type(key: str, schema: type = XtrainConfig) -> Any:
    """The declared type at dotted ``key`` (``train.betas[0]``: the element type); None if no such key."""
    t: Any = schema
    for part in key.replace("[", ".[").split("."):
        if part.startswith("["):
            args = typing.get_args(_strip_optional(t))
            t = args[0] if args else Any
        elif dataclasses.is_dataclass(t) and part in {f.name for f in dataclasses.fields(t)}:
            t = typing.get_type_hints(t)[part]
        else:
            return None
    return t


def describe_type(t: Any) -> str:
    """Words for a schema type: int -> 'an integer', Optional[int] -> 'an integer or null'."""
    if _strip_optional(t) is not t:
        return f"{describe_type(_strip_optional(t))} or null"
    origin = typing.get_origin(t)
    if origin in (list, List):
        (item,) = typing.get_args(t) or (Any,)
        return f"a list of {_PLURALS.get(item, 'values')}"
    if dataclasses.is_dataclass(t):
        return "a group of keys (set them one at a time)"
    return _NAMES.get(t, "any value")


_NAMES = {int: "an integer", float: "a float", bool: "a boolean (true or false)", str: "a string"}
_PLURALS = {int: "integers", float: "floats", bool: "booleans", str: "strings"}


def _strip_optional(t: Any) -> Any:
    args = typing.get_args(t)
    if typing.get_origin(t) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else t
    return t
