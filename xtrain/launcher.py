"""The ``xtrain`` command: ``xtrain --nproc 4 strategy=zero3 [overrides]``.

It composes and validates the config once (a bad config ends here with one
message and exit code 2, before any rank starts), then starts the ranks
through torch's elastic agent, the machinery behind torchrun, so rendezvous,
multi-node and restarts (``--max-restarts``) behave exactly as under torchrun.
Each rank runs the normal entry point, ``python -u -m xtrain.train OVERRIDES``.

What it adds over torchrun: a thread count per rank (cores / local ranks,
unless ``OMP_NUM_THREADS`` is set), one run directory stamp for every attempt
of a single-node job (so ``train.resume=auto`` finds the failed attempt's
checkpoints), and one failure summary instead of torchrun's report: which
ranks failed, the first line of each distinct error, and the first failing
rank's own exit code. Rank stderr still reaches the console (tee'd, prefixed
``[rankN]:``) and is read back from elastic's log files for the summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path

# What a rank that died without a word gets in the summary.
NO_MESSAGE = "no error message"


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: prefixes are how `torchrun --nproc` breaks (README), and
    # an override such as `--n` must fail loudly rather than pick an option.
    p = argparse.ArgumentParser(
        prog="xtrain",
        allow_abbrev=False,
        description="Validate the config once, then run xtrain on N local ranks (per node) through torch's elastic agent.",
        epilog="Everything else is a Hydra override, as for python -m xtrain.train. See launch/README.md.",
    )
    p.add_argument("--nproc", "--nproc-per-node", "--nproc_per_node", type=int, default=1, metavar="N",
                   help="ranks on this node (default 1: one process, no agent)")
    p.add_argument("--nnodes", default="1", metavar="N|MIN:MAX", help="nodes in the job (default 1)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="restart all ranks up to K times after a failure (pair with train.resume=auto)")
    p.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                   help="c10d rendezvous on one node that all nodes reach (multi-node)")
    p.add_argument("--rdzv-id", default="xtrain", help="job id, the same on every node (default: xtrain)")
    p.add_argument("--rdzv-backend", default="c10d", help="rendezvous backend (default c10d; static with --master-addr)")
    p.add_argument("--master-addr", default=None, metavar="HOST",
                   help="static rendezvous at HOST:--master-port with fixed --node-rank (Slurm/MPI style)")
    p.add_argument("--master-port", type=int, default=29500, metavar="PORT")
    p.add_argument("--node-rank", type=int, default=None, metavar="R", help="this node's rank (static rendezvous only)")
    p.add_argument("--script", default=None, metavar="PATH",
                   help="run PATH OVERRIDES on each rank instead of -m xtrain.train (a wrapper around xtrain.train.main)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=zero3 model=tiny train.steps=50")
    return p


def parse_nnodes(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        nodes = int(lo), int(hi or lo)
    except ValueError:
        nodes = (0, 0)
    if not 0 < nodes[0] <= nodes[1]:
        raise ValueError(f"--nnodes must be N or MIN:MAX with 0 < MIN <= MAX, got {text!r}")
    return nodes


# -- validation -----------------------------------------------------------------


def validate_once(overrides: list[str], nproc: int, nodes: tuple[int, int]) -> str | None:
    """None if the config runs at every world size the job may have, else the message."""
    from xtrain.config import ConfigError, check_config, compose

    try:
        cfg = compose(overrides)
    except ConfigError as e:  # what compose recognises (a CompositionError), one line per problem
        return str(e)
    except Exception as e:  # noqa: BLE001
        # Anything else Hydra or OmegaConf raised while composing: its own text,
        # without the traceback (xtrain.config.composition_problem could word it).
        return f"  - {str(e).strip()}"
    from xtrain.train import validate  # imports torch: only once composition worked

    worlds = [n * nproc for n in range(nodes[0], nodes[1] + 1)]
    try:
        data = validate(cfg, worlds[0])
        for world in worlds[1:]:  # an elastic job: every size it may run at
            if problems := check_config(cfg, world, data_vocab=data.vocab_size):
                raise ConfigError([f"at {world} ranks: {p}" for p in problems])
    except ConfigError as e:
        return str(e)
    return None


# -- the failure summary -----------------------------------------------------------

_XTRAIN_MESSAGE = re.compile(r"^\[rank \d+\] xtrain: (.*)$")  # xtrain.train._fail


def first_error_line(stderr: str) -> str | None:
    """The first line of the error a rank printed: an xtrain message, else the
    exception line of its last traceback, else its last line of stderr."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if m := _XTRAIN_MESSAGE.match(line):
            text = m.group(1)
            if text.endswith(":") and i + 1 < len(lines):  # "invalid configuration:" + its first problem
                text += " " + lines[i + 1].strip()
            return text
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        # Frames are indented; the exception line is the first one that is not.
        return next((line for line in lines[starts[-1] + 1:] if not line[0].isspace()), lines[-1])
    return lines[-1].strip() if lines else None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _shorten(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def last_attempt_dir(log_dir: str | Path) -> Path | None:
    """Elastic's ``<log_dir>/<run id>_*/attempt_<k>`` of the attempt that ran last."""
    attempts = list(Path(log_dir).glob("*/attempt_*"))
    return max(attempts, key=lambda p: int(p.name.rpartition("_")[2])) if attempts else None


def describe_failure(failure, stderr: Path | None) -> str:
    """'exited with code 3: <first line>' or 'killed by SIGKILL: <first line>' for one ProcessFailure."""
    line = None
    if os.path.isfile(failure.error_file):  # a script decorated with elastic's @record wrote one
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        line = str(message).strip().splitlines()[0] if str(message).strip() else None
    if line is None and stderr is not None and stderr.is_file():
        line = first_error_line(stderr.read_text(errors="replace"))
    how = f"killed by {_signal_name(-failure.exitcode)}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    return f"{how}: {_shorten(line or NO_MESSAGE)}"


def summarize(failures: dict, world: int | None, attempt_dir: Path | None) -> tuple[str, int]:
    """(one message for all failed ranks, the job's exit code).

    Ranks that failed the same way are grouped. The first to fail (the one whose
    stderr was last written earliest: its peers fail later, reporting it) leads
    and gives the exit code. Ranks that elastic itself stopped with SIGTERM once
    another had failed are not failures.
    """
    def stderr_of(failure):
        return attempt_dir / str(failure.local_rank) / "stderr.log" if attempt_dir else None

    def written_at(item):
        path = stderr_of(item[1])
        return path.stat().st_mtime if path is not None and path.is_file() else float("inf")

    failed = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    first_rank, first = min(sorted(failed.items()), key=written_at)
    groups: dict[str, list[int]] = {describe_failure(first, stderr_of(first)): [first_rank]}
    for rank, failure in sorted(failed.items()):
        if rank != first_rank:
            groups.setdefault(describe_failure(failure, stderr_of(failure)), []).append(rank)

    def who(ranks):
        return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))

    head = f"xtrain: {len(failed)}{f' of {world}' if world else ''} rank{'s' if (world or len(failed)) > 1 else ''} failed"
    lines = [f"{who(ranks)} {what}" for what, ranks in groups.items()]
    message = f"{head}: {lines[0]}" if len(lines) == 1 else head + ":\n" + "\n".join(f"  {line}" for line in lines)
    return message, exit_code_of(first)


def exit_code_of(failure) -> int:
    """The rank's own code; a signal becomes 128 + its number, as in a shell."""
    return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode


class _ElasticLog(logging.Handler):
    """Stands in for torch elastic's log output. Its per-process lines (a rank
    failed, SIGTERM sent to the others) are what the summary replaces; a restart
    becomes one line; any other warning (a rendezvous in trouble) is shown."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "will restart worker group" in message:
            left = re.search(r"(\d+)/(\d+) attempts left", message)
            which = f" (restart {int(left.group(2)) - int(left.group(1)) + 1} of {left.group(2)})" if left else ""
            print(f"xtrain: a rank failed; restarting all ranks{which}", file=sys.stderr, flush=True)
        elif record.levelno >= logging.WARNING and not record.name.startswith("torch.distributed.elastic.multiprocessing"):
            print(f"xtrain: torch elastic: {message}", file=sys.stderr, flush=True)


def _quiet_elastic() -> None:
    if os.environ.get("LOGLEVEL"):  # the user asked for torch's own logs
        return
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [_ElasticLog()]
        logger.propagate = False
    # The restart notice is an INFO record of the agent.
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.INFO)


# -- launching ------------------------------------------------------------------------


def rendezvous(args, nodes: tuple[int, int]) -> tuple[str, str, str, dict]:
    """(backend, endpoint, run id, configs) as torchrun would choose them."""
    if args.master_addr or args.rdzv_backend == "static":
        if nodes[0] != nodes[1]:
            raise ValueError("a static rendezvous (--master-addr) needs a fixed --nnodes")
        if nodes[1] > 1 and args.node_rank is None:
            raise ValueError("a static rendezvous over several nodes needs --node-rank")
        return "static", f"{args.master_addr or 'localhost'}:{args.master_port}", args.rdzv_id, {"rank": args.node_rank or 0}
    if args.rdzv_endpoint:
        return args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id, {}
    if nodes[1] > 1:
        raise ValueError("several nodes need --rdzv-endpoint HOST:PORT (or --master-addr and --node-rank)")
    # torchrun --standalone: a c10d store on a free local port, a fresh id.
    return "c10d", "localhost:0", str(uuid.uuid4()), {}


def threads_per_rank(nproc: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc)


def launch(args, overrides: list[str], nodes: tuple[int, int], rdzv: tuple[str, str, str, dict]) -> int:
    """Start the ranks through torch's elastic agent; the job's exit code."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    backend, endpoint, run_id, rdzv_configs = rdzv
    # Ranks inherit the environment; torchrun would print a banner and set 1.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(args.nproc)))
    if args.max_restarts > 0 or nodes[0] != nodes[1]:
        # Ranks that start again (a restart, a node joining) must not share the
        # agent's store (torch >= 2.5): they read the dead attempt's gloo/NCCL
        # addresses from it and fail to connect (3 restarts of 4 here; pytorch#135712).
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    log_dir = tempfile.mkdtemp(prefix="xtrain-launch-")
    config = LaunchConfig(
        min_nodes=nodes[0],
        max_nodes=nodes[1],
        nproc_per_node=args.nproc,
        run_id=run_id,
        role="xtrain",
        rdzv_endpoint=endpoint,
        rdzv_backend=backend,
        rdzv_configs=rdzv_configs,
        max_restarts=args.max_restarts,
        monitor_interval=0.5,
        # stderr is tee'd: on the console as it comes, and in log_dir for the summary.
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, tee=Std.ERR),
        log_line_prefix_template="[rank${rank}]:",
    )
    target = [args.script] if args.script else ["-m", "xtrain.train"]
    world = args.nproc * nodes[0] if nodes[0] == nodes[1] else None
    _quiet_elastic()
    try:
        elastic_launch(config, sys.executable)("-u", *target, *overrides)
        return 0
    except ChildFailedError as e:
        message, code = summarize(e.failures, world, last_attempt_dir(log_dir))
        print(message, file=sys.stderr, flush=True)
        return code
    except SignalException as e:  # Ctrl-C or a scheduler's SIGTERM: elastic has stopped the ranks
        print(f"xtrain: stopped by {_signal_name(int(e.sigval))}; ranks terminated", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except Exception as e:  # noqa: BLE001 - a rendezvous that never formed, a port in use...
        print(f"xtrain: launch failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def run_in_process(script: str | None, overrides: list[str]) -> None:
    """One rank, no agent: the entry point itself, in this process."""
    sys.argv = [script or "xtrain", *overrides]
    if script:
        import runpy

        runpy.run_path(script, run_name="__main__")
    else:
        from xtrain.train import main

        main()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        nodes = parse_nnodes(args.nnodes)
        if args.nproc < 1 or args.max_restarts < 0:
            raise ValueError("--nproc must be >= 1 and --max-restarts >= 0")
        rdzv = rendezvous(args, nodes)
    except ValueError as e:
        parser.error(str(e))
    overrides = list(args.overrides)

    # Every attempt of a one-node job writes one run directory (default out_dir),
    # so a restart resumes there. Across nodes, name train.out_dir (launch/README.md).
    if nodes[1] == 1 and not os.environ.get("XTRAIN_RUN_STAMP"):
        from xtrain.config import run_stamp

        os.environ["XTRAIN_RUN_STAMP"] = run_stamp()

    problem = validate_once(overrides, args.nproc, nodes)
    if problem is not None:
        print(f"xtrain: invalid configuration:\n{problem}", file=sys.stderr, flush=True)
        sys.exit(2)

    if args.nproc == 1 and nodes == (1, 1) and args.max_restarts == 0:
        run_in_process(args.script, overrides)
        return
    sys.exit(launch(args, overrides, nodes, rdzv))


if __name__ == "__main__":
    main()
