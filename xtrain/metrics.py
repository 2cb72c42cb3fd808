"""Per-step metrics: metrics.jsonl, the console, the progress bar and wandb.

Only rank 0 writes or prints; the trainer has already reduced every figure
over ranks (the schema is in docs/metrics.md).
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak. CPU: the process's peak resident set (includes torch itself)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def human_bytes(n: float) -> str:
    """Binary units (1 KiB = 1024 B), as the figures are computed."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, rank: int, start_step: int, console: Console | None = None):
        self.rank, self.cfg = rank, cfg
        self.total_steps = int(cfg.train.steps)  # read once: config access is slow on the hot path
        self.active = rank == 0
        self.log_every = max(int(cfg.train.log_every), 1)
        self.console = console or Console(soft_wrap=True)
        self.file = self.progress = self.task = self.wandb_run = None
        if not self.active:
            return
        self.file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
        show = cfg.train.progress
        if show == "auto":
            show = self.console.is_terminal
        if show:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task("train", total=cfg.train.steps, completed=start_step, info="")
            self.progress.start()
        if cfg.logger == "wandb":
            self.wandb_run = _start_wandb(cfg, run_dir)

    def truncate_after(self, step: int) -> None:
        """Drop the rows past ``step`` (a resumed run replays those steps; a failed
        attempt's rows must not appear twice). Rewritten atomically."""
        if not self.active:
            return
        path = Path(self.file.name)
        self.file.close()
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self.file = open(path, "a", buffering=1)

    def print(self, *args, **kwargs) -> None:
        if self.active:
            self.console.print(*args, **kwargs)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if not isinstance(v, dict)}, step=step)
        line = f"step {step:>6d}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  gnorm {record['grad_norm']:.3f}"
        line += f"  {record['tokens_per_s']:,.0f} tok/s"
        if "val_loss" in record:
            line += f"  val {record['val_loss']:.4f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=f"loss {record['loss']:.4f}")
        if step % self.log_every == 0 or step == self.total_steps or "val_loss" in record:
            self.console.print(line)

    def close(self, ledger_rows=()) -> None:
        if not self.active:
            return
        if self.progress is not None:
            self.progress.stop()
        if ledger_rows:
            self.console.print(comm_table(ledger_rows))
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def chrome_trace_events(steps: list[list[dict]], rank: int) -> list[dict]:
    """One rank's actions as Chrome trace events ("X", microseconds), on a track
    named after the rank; an action reads like ``F3 s1`` (kind, micro-batch, stage)."""
    events = [{"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}}]
    for k, actions in enumerate(steps):
        for a in actions:
            events.append({
                "name": f"{a['kind']}{a['mb']} s{a['stage']}", "cat": a["kind"], "ph": "X", "pid": rank, "tid": 0,
                "ts": a["start"] * 1e6, "dur": (a["end"] - a["start"]) * 1e6,
                "args": {"step": k + 1, "kind": a["kind"], "stage": a["stage"], "mb": a["mb"]},
            })
    return events


def write_trace(run_dir: Path, rank: int, world: int, steps: list[list[dict]], barrier) -> Path:
    """Every rank writes its events; after a barrier rank 0 joins them into
    ``trace.json`` (one track per rank; all ranks of a node share one clock,
    ``time.perf_counter``'s CLOCK_MONOTONIC)."""
    run_dir = Path(run_dir)
    part = run_dir / f".trace_rank{rank}.json"
    part.write_text(json.dumps(chrome_trace_events(steps, rank)))
    barrier()
    out = run_dir / "trace.json"
    if rank == 0:
        events = []
        for r in range(world):
            f = run_dir / f".trace_rank{r}.json"
            events += json.loads(f.read_text())
            f.unlink()
        out.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    barrier()
    return out


def comm_table(rows) -> Table:
    """The ledger's whole-run totals (see docs/metrics.md for the two times)."""
    table = Table(
        title="communication on rank 0 (whole run)",
        caption="in flight: wall time with at least one call outstanding, overlapping calls merged; "
        "blocked: time the caller waited on them",
    )
    for col in ("collective", "group", "calls", "sent", "received", "in flight", "blocked"):
        table.add_column(col, justify="left" if col in ("collective", "group") else "right")
    for op, group, calls, sent, recv, wall, blocked in rows:
        table.add_row(op, group, str(calls), human_bytes(sent), human_bytes(recv), f"{wall:.3f} s", f"{blocked:.3f} s")
    return table


def _start_wandb(cfg, run_dir: Path):
    # Offline unless the user chose otherwise: no test or default run touches the
    # network. The mode goes into the environment before wandb is imported:
    # given only to wandb.init, wandb still resolved one of its hosts (measured).
    mode = os.environ.get("WANDB_MODE") or cfg.wandb.mode
    os.environ["WANDB_MODE"] = mode
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("logger=wandb needs wandb: pip install -e '.[wandb]'") from e
    from omegaconf import OmegaConf

    return wandb.init(
        project=cfg.wandb.project,
        name=cfg.wandb.name,
        dir=str(run_dir),
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
