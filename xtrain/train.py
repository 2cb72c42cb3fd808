"""The training entry point: ``python -m xtrain.train [overrides]``.

Data flows one way: config -> mesh -> plain model -> strategy transform ->
training step (which calls comm through the strategy) -> metrics. ``run`` is
the whole job for one rank; ``main`` wraps it for Hydra and torchrun, and the
Ray launcher and the tests call ``run`` directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from xtrain import checkpoint
from xtrain.comm import CollectiveTimeout, CommError, get_comm
from xtrain.config import ConfigError, check_config, config_search_path, mesh_degrees
from xtrain.data import load_data, local_batch
from xtrain.mesh import Mesh
from xtrain.metrics import MetricsLogger, human_bytes, peak_memory_bytes, write_trace
from xtrain.model import ModelConfig, build_model
from xtrain.optim import lr_at, set_lr
from xtrain.parallel import STRATEGIES

log = logging.getLogger("xtrain")


@dataclass
class RunResult:
    losses: list[float]  # global mean training loss per optimizer step run here
    val_losses: dict[int, float]
    run_dir: Path
    start_step: int
    params: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # full, on CPU


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables or a live process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(cfg: DictConfig, local_rank: int) -> torch.device:
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(["device=cuda but no CUDA device is available"])
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(cfg: DictConfig, device: torch.device, world: int) -> bool:
    """Join the job's process group (unless one exists); True if we created it."""
    if world == 1 or dist.is_initialized():
        return False
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.dist_timeout_s))
    return True


def validate(cfg: DictConfig, world: int):
    """Load the data and check the config; raise ConfigError before any collective."""
    try:
        data = load_data(cfg.data)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError([str(e)]) from e
    problems = check_config(cfg, world, data_vocab=data.vocab_size)
    if problems:
        raise ConfigError(problems)
    return data


def run(cfg: DictConfig, run_dir: str | Path | None = None, return_params: bool = False, on_step=None) -> RunResult:
    """Train one rank. ``on_step(record)``, if given, is called on every rank after
    each optimizer step with that step's metrics record (benchmarks hook in here)."""
    rank, world, local_rank = dist_env()
    data = validate(cfg, world)
    device = resolve_device(cfg, local_rank)
    run_dir = Path(run_dir if run_dir is not None else cfg.train.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    owns_pg = init_distributed(cfg, device, world)
    try:
        return _train(cfg, data, device, rank, world, run_dir, return_params, on_step)
    finally:
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, data, device, rank, world, run_dir, return_params, on_step=None) -> RunResult:
    torch.manual_seed(cfg.seed)
    # A plain namespace: OmegaConf attribute access costs ~40 us, too much per step.
    t = SimpleNamespace(**OmegaConf.to_container(cfg.train, resolve=True))
    mesh = Mesh.build(world, rank, timeout=timedelta(seconds=cfg.dist_timeout_s), **mesh_degrees(cfg))
    comm = get_comm(cfg.comm)
    # Bookkeeping (metrics, barriers) has its own ledger, so the training
    # ledger counts exactly what the strategy moves.
    meta_comm = get_comm(cfg.comm)
    strategy = STRATEGIES[cfg.strategy.name](mesh, comm, cfg.strategy)

    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    model = build_model(mcfg, cfg.seed)
    n_params = model.num_params()
    model = strategy.parallelize(model.to(device))
    optimizer = strategy.build_optimizer(model, t)

    logger = MetricsLogger(run_dir, cfg, rank, start_step=0)
    if rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    logger.print(
        f"[bold]xtrain[/] strategy={strategy.name} comm={cfg.comm} precision={cfg.precision} "
        f"world={world} mesh: {mesh.describe()} device={device}\n"
        f"model={cfg.model.get('name')}: {n_params:,} parameters | data: {data.description}\n"
        f"run dir: {run_dir}"
    )

    def barrier():
        if world > 1:
            meta_comm.barrier()

    start_step = 0
    resume = str(t.resume)
    ckpt_path = checkpoint.latest_checkpoint(run_dir) if resume == "auto" else (None if resume in ("none", "None") else Path(resume))
    if ckpt_path is not None:
        meta = checkpoint.load(ckpt_path, strategy, model, optimizer)
        start_step = int(meta["step"])
        logger.print(f"resumed from {ckpt_path} at step {start_step}")
    elif resume == "auto":
        logger.print(f"train.resume=auto: no complete checkpoint in {run_dir / 'checkpoints'}; training from step 0")
    # Rows past the start step are a failed attempt's (or an earlier run's in this directory): each step once.
    logger.truncate_after(start_step)
    if logger.task is not None:
        logger.progress.update(logger.task, completed=start_step)

    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if cfg.precision == "bf16"
        else contextlib.nullcontext()
    )
    tokens_per_step = t.global_batch_size * t.seq_len
    batch_args = dict(seed=cfg.seed, global_batch_size=t.global_batch_size, seq_len=t.seq_len)
    losses, val_losses = [], {}

    def global_mean(local: torch.Tensor, weight: float, *extra_max: float):
        """Weighted mean of ``local`` over ranks, and the max of each ``extra_max``."""
        # on the compute device: NCCL moves only CUDA tensors
        v = torch.tensor([float(local) * weight, weight, *extra_max], dtype=torch.float64, device=device)
        if world > 1:
            out = torch.empty(world * v.numel(), dtype=torch.float64, device=device)
            meta_comm.all_gather_into_tensor(out, v)
            v = out.view(world, -1)
        else:
            v = v.view(1, -1)
        mean = (v[:, 0].sum() / v[:, 1].sum()).item()
        return mean, [v[:, 2 + i].max().item() for i in range(len(extra_max))]

    def evaluate() -> float:
        model.eval()
        total = torch.zeros((), device=device)
        with torch.no_grad(), autocast:
            for i in range(t.eval_batches):
                x, y = local_batch(data.val, step=i, split="val", dp_rank=strategy.dp_rank, dp=strategy.dp_size, **batch_args)
                x, y = strategy.take_columns(x, y)
                total += strategy.runner.eval_loss(x.to(device), y.to(device))
        model.train()
        return global_mean(total / t.eval_batches, strategy.loss_weight(eval=True))[0]

    if t.trace and hasattr(strategy.runner, "trace"):
        strategy.runner.trace = []  # the pipeline executor keeps every step's actions
    try:
        for step in range(start_step, t.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps, min_lr_ratio=t.min_lr_ratio)
            set_lr(optimizer, lr)
            x, y = local_batch(data.train, step=step, dp_rank=strategy.dp_rank, dp=strategy.dp_size, **batch_args)
            x, y = strategy.take_columns(x, y)  # cp: this rank's columns of each sequence
            x, y = x.to(device), y.to(device)
            strategy.begin_step(x, y, t.micro_batches, autocast)
            loss = strategy.runner.forward_backward(x, y, t.micro_batches, autocast)
            strategy.reduce_gradients(model)
            grad_norm = strategy.clip_grad_norm_(model, t.grad_clip)
            strategy.optimizer_step(optimizer)
            hook_figures = strategy.end_step()  # MoE: global load, aux losses, the router bias update
            if step == start_step or (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                state_bytes = strategy.model_state_bytes(model, optimizer)  # grads still live here
            strategy.zero_grad(model, optimizer)
            runner_figures = strategy.runner.step_metrics() if hasattr(strategy.runner, "step_metrics") else {}
            mean_loss, (peak, gnorm, *runner_max) = global_mean(
                loss, strategy.loss_weight(), peak_memory_bytes(device), float(grad_norm), *runner_figures.values()
            )
            step_time = time.perf_counter() - t0
            losses.append(mean_loss)
            done = step + 1
            record = {
                "step": done,
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": gnorm,
                "tokens": done * tokens_per_step,
                "tokens_per_s": tokens_per_step / step_time,
                "step_time_s": step_time,
                "peak_mem_bytes": int(peak),
                "model_state_bytes": state_bytes,
                "comm": comm.ledger.take_step(),
                **dict(zip(runner_figures, runner_max)),  # the runner's own figures, max over ranks (pp_wait_s)
                **hook_figures,  # already global (the same on every rank)
            }
            if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
                record["val_loss"] = val_losses[done] = evaluate()
            logger.log(record)
            if on_step is not None:
                on_step(record)
            log.info("step %d loss %.6f", done, mean_loss)
            if t.ckpt_every and (done % t.ckpt_every == 0 or done == t.steps):
                meta = {"strategy": strategy.name, "world_size": world, "mesh": mesh.degrees, "seed": cfg.seed}
                path = checkpoint.save(run_dir, done, strategy, model, optimizer, meta, barrier, keep=t.ckpt_keep)
                logger.print(f"checkpoint: {path}")
        if t.trace and getattr(strategy.runner, "trace", None) is not None:
            logger.print(f"trace: {write_trace(run_dir, rank, world, strategy.runner.trace, barrier)}")
    finally:
        logger.close(comm.ledger.summary_rows())
    if losses:
        logger.print(f"done: {len(losses)} steps, final loss {losses[-1]:.4f}, peak memory {human_bytes(peak)}")
    params = strategy.full_parameters(model) if return_params else None
    return RunResult(losses, val_losses, run_dir, start_step, params)


# -- command line -------------------------------------------------------------


def _fail(message: str, code: int) -> None:
    rank = os.environ.get("RANK", "0")
    print(f"[rank {rank}] xtrain: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@hydra.main(config_path=config_search_path(), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as e:
        _fail(f"invalid configuration:\n{e}", 2)
    except (CollectiveTimeout, CommError) as e:
        _fail(str(e), 1)


def main() -> None:
    """``python -m xtrain.train [overrides]``. Composes once before Hydra does, so a
    wrong type, an unknown key or group option ends in one message and exit 2 on
    every rank (Hydra would print its own error and exit 1)."""
    from xtrain.config import compose

    args = sys.argv[1:]
    # Command lines with Hydra's flags (--cfg, --multirun, --help) are left to Hydra.
    if not any(a.startswith("-") for a in args):
        try:
            compose(args)
        except ConfigError as e:
            _fail(f"invalid configuration:\n{e}", 2)
    _hydra_main()


if __name__ == "__main__":
    main()
