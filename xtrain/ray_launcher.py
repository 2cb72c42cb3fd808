"""Run one xtrain job on N Ray workers: ``python launch/ray_launch.py strategy=dp ray.num_workers=4``.

Plain Ray core, no ray[train]. The driver composes and validates the config
once, resolves the run directory, reserves one bundle per worker in a
placement group (gang scheduling: either every worker gets a slot or the
launch fails with the cluster's resources in the message), orders the workers
so that ranks on one node are contiguous, and starts one actor per rank. Each
actor receives the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and calls ``xtrain.train.run``,
which forms the gloo (CPU) or NCCL (GPU, one per worker) process group, so a
Ray run writes the same run directory as torchrun.

Failure is loud and bounded: the first worker to raise or die ends the launch
with a ``LaunchError`` naming its rank, every other actor is killed (they
would otherwise wait on the dead peer until ``dist_timeout_s``), and Ray is
shut down if this launch started it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xtrain.config import ConfigError, compose, run_stamp

# Environment forwarded to the workers (a remote node does not inherit the
# driver's environment; a local one does, which is harmless).
FORWARD_ENV_PREFIXES = ("XTRAIN_", "WANDB_", "NCCL_", "GLOO_", "TORCH_", "HF_")
# How long the cluster may take to find room for every worker before we give up.
DEFAULT_START_TIMEOUT_S = 120.0
# After one rank fails, how long to wait for the others' errors before choosing whom to blame.
FAILURE_GRACE_S = 2.0


class LaunchError(RuntimeError):
    """A worker failed or the workers could not be started; ``rank`` is None when no rank is to blame."""

    def __init__(self, message: str, rank: int | None = None, config_error: bool = False):
        super().__init__(message)
        self.rank = rank
        self.config_error = config_error

    def __reduce__(self):  # keep rank and config_error across Ray's pickling
        return (type(self), (str(self), self.rank, self.config_error))


@dataclass(frozen=True)
class WorkerPlace:
    """Where one rank runs and the torchrun-style coordinates it gets."""

    rank: int
    local_rank: int
    local_world_size: int
    node_rank: int
    node_id: str
    bundle_index: int


def plan_ranks(bundle_nodes: list[str]) -> list[WorkerPlace]:
    """Ranks for the bundles of a placement group, given the node of each bundle.

    Ranks on one node are contiguous (nodes in order of first appearance), so
    LOCAL_RANK is a rank's index among the workers of its node, as under torchrun.
    """
    node_order: list[str] = []
    for node in bundle_nodes:
        if node not in node_order:
            node_order.append(node)
    places, rank = [], 0
    for node_rank, node in enumerate(node_order):
        bundles = [b for b, n in enumerate(bundle_nodes) if n == node]
        for local_rank, bundle in enumerate(bundles):
            places.append(WorkerPlace(rank, local_rank, len(bundles), node_rank, node, bundle))
            rank += 1
    return places


def prepare_config(overrides: list[str] | tuple[str, ...], check: bool = True) -> tuple[DictConfig, DictConfig]:
    """(config for the workers, composed config as Hydra would save it).

    Composes once, makes the device follow ``ray.use_gpu``, resolves every
    interpolation (so all workers agree on the stamp in ``train.out_dir``),
    makes the run dir absolute and, with ``check``, validates for
    ``ray.num_workers`` ranks: a ConfigError here comes before any worker starts.
    """
    cfg = compose(list(overrides))
    composed = cfg.copy()
    r = cfg.ray
    problems = []
    if not isinstance(r.num_workers, int) or r.num_workers < 1:
        problems.append(f"ray.num_workers must be a positive integer, got {r.num_workers!r}")
    if not isinstance(r.cpus_per_worker, (int, float)) or r.cpus_per_worker <= 0:
        problems.append(f"ray.cpus_per_worker must be > 0, got {r.cpus_per_worker!r}")
    # Ray hands GPUs only to workers that ask for them, so the device follows ray.use_gpu.
    if r.use_gpu and cfg.device == "cpu":
        problems.append("ray.use_gpu=true contradicts device=cpu")
    if not r.use_gpu and cfg.device == "cuda":
        problems.append("device=cuda needs ray.use_gpu=true (Ray gives GPUs only to workers that ask for one)")
    if problems:
        raise ConfigError(problems)
    if cfg.device == "auto":
        cfg.device = "cuda" if r.use_gpu else "cpu"

    OmegaConf.resolve(cfg)
    cfg.train.out_dir = os.path.abspath(os.path.expanduser(cfg.train.out_dir))
    if check:
        from xtrain.train import validate  # imports torch: only once the cheap checks passed

        validate(cfg, r.num_workers)
    return cfg, composed


# -- the worker -----------------------------------------------------------------


class TrainWorker:
    """One rank of the job; a Ray actor (wrapped with ray.remote in ``launch``)."""

    def __init__(self, rank: int, world_size: int, env: dict[str, str], cwd: str | None):
        self.rank, self.world_size = rank, world_size
        os.environ.update(env)
        # Relative paths in the config (data.path, a resume checkpoint) mean
        # what they mean for the driver, when that folder exists here.
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)

    def __repr__(self) -> str:  # Ray prefixes every forwarded log line with this
        return f"xtrain rank={self.rank}"

    def address(self) -> tuple[str, int]:
        """This node's IP and a port free on it right now (asked of rank 0 only)."""
        import ray

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def run(self, cfg: DictConfig, place: WorkerPlace, master_addr: str, master_port: int, return_params: bool):
        os.environ.update(
            RANK=str(place.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(place.local_rank),
            LOCAL_WORLD_SIZE=str(place.local_world_size),
            GROUP_RANK=str(place.node_rank),
            NODE_RANK=str(place.node_rank),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        from xtrain.train import run

        run_dir = Path(cfg.train.out_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = _rank_log_handler(run_dir / f"rank{place.rank}.log")
        try:
            return run(cfg, run_dir, return_params=return_params)
        except ConfigError as e:
            # Re-raised as a LaunchError: it survives pickling with its text intact.
            raise LaunchError(f"invalid configuration:\n{e}", rank=place.rank, config_error=True) from None
        finally:
            _remove_handler(handler)
            sys.stdout.flush()
            sys.stderr.flush()


def _rank_log_handler(path: Path) -> logging.Handler:
    """The per-rank log file Hydra's job logging writes under torchrun."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    logging.getLogger("xtrain").setLevel(logging.INFO)
    return handler


def _remove_handler(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


# -- the driver ---------------------------------------------------------------------


def _forwarded_env(stamp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
    env["XTRAIN_RUN_STAMP"] = stamp
    return env


def _start_ray(cfg: DictConfig) -> bool:
    """Join or start Ray as ``cfg.ray`` says; True if this call started it (so we shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    r = cfg.ray
    try:
        if r.address in (None, "", "local"):
            # A private single-node instance: no token auth (nothing else talks to
            # it), no dashboard, and enough logical CPUs for every worker even on a
            # machine with fewer cores (the workers then share the cores).
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            num_cpus = max(os.cpu_count() or 1, math.ceil(r.num_workers * r.cpus_per_worker))
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        else:
            _check_reachable(str(r.address))
            ray.init(address=str(r.address), logging_level=logging.WARNING)
    except LaunchError:
        raise
    except Exception as e:  # noqa: BLE001 - ray raises several types here (ConnectionError, RuntimeError, ...)
        where = "start a local Ray instance" if r.address in (None, "", "local") else f"join the Ray cluster at ray.address={r.address}"
        raise LaunchError(f"could not {where}: {type(e).__name__}: {e}") from None
    return True


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    asked = address
    if address == "auto":
        # Where ray.init(address="auto") looks: RAY_ADDRESS, else the file
        # `ray start` leaves (stale if that head node died without `ray stop`).
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        address = os.environ.get("RAY_ADDRESS") or (current.read_text().strip() if current.is_file() else "auto")
    hostport = address.split("://", 1)[-1]
    if hostport == "auto" or ":" not in hostport:
        return
    host, port = hostport.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise LaunchError(f"could not join the Ray cluster at ray.address={asked}: nothing answers at {hostport} ({e})") from None


def _describe_failure(exc: BaseException) -> tuple[str, bool]:
    """(message, is_config_error) for an exception raised by ray.get on a worker's result."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, LaunchError) and cause.config_error:
            return str(cause), True
        # The RayTaskError's text carries the worker's traceback.
        return str(exc), False
    if isinstance(exc, ray.exceptions.RayActorError):
        return f"the worker process died ({type(exc).__name__}): {exc}", False
    return f"{type(exc).__name__}: {exc}", False


_PEER_SYMPTOMS = ("connection closed by peer", "connection reset", "broken pipe", "collectivetimeout", "commerror", "timed out")


def _launch_error(failures: dict[int, BaseException], n: int) -> LaunchError:
    """One LaunchError for the failed ranks, naming the likeliest culprit."""
    described = {rank: _describe_failure(e) for rank, e in sorted(failures.items())}

    def is_symptom(rank: int) -> bool:
        msg = described[rank][0].lower()
        return any(s in msg for s in _PEER_SYMPTOMS) and "died" not in msg

    rank = next((r for r in described if not is_symptom(r)), next(iter(described)))
    msg, is_config = described[rank]
    others = [r for r in described if r != rank]
    also = f"\n(ranks {others} failed too)" if others else ""
    return LaunchError(f"rank {rank} of {n} failed: {msg}{also}", rank=rank, config_error=is_config)


def _kill(actors) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass


def _run_workers(cfg: DictConfig, timeout_s: float | None, start_timeout_s: float, return_params: bool):
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    r = cfg.ray
    n = int(r.num_workers)
    bundle = {"CPU": float(r.cpus_per_worker)}
    if r.use_gpu:
        bundle["GPU"] = 1.0
    pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
    actors: list = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=start_timeout_s)
        if not ready:
            raise LaunchError(
                f"Ray could not place {n} workers of {bundle} within {start_timeout_s:.0f}s; "
                f"the cluster has {_cpus_gpus(ray.cluster_resources())}, free: {_cpus_gpus(ray.available_resources())}"
            )
        places = plan_ranks(placement_group_table(pg)["bundles_to_node_id"])

        worker_cls = ray.remote(TrainWorker)
        env = _forwarded_env(run_stamp())
        actors = [
            worker_cls.options(
                num_cpus=r.cpus_per_worker,
                num_gpus=1 if r.use_gpu else 0,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=p.bundle_index),
            ).remote(p.rank, n, env, os.getcwd())
            for p in places
        ]
        # Rank 0 chooses the rendezvous address on its own node.
        try:
            master_addr, master_port = ray.get(actors[0].address.remote(), timeout=start_timeout_s)
        except Exception as e:  # noqa: BLE001
            msg, _ = _describe_failure(e)
            raise LaunchError(f"rank 0 of {n} could not start: {msg}", rank=0) from None

        refs = [a.run.remote(cfg, p, master_addr, master_port, return_params) for a, p in zip(actors, places)]
        rank_of = {ref: p.rank for ref, p in zip(refs, places)}
        results: dict[int, object] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            wait_s = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            done, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if not done:
                missing = sorted(rank_of[ref] for ref in pending)
                raise LaunchError(f"the {n}-worker job did not finish within {timeout_s:.0f}s; ranks {missing} were still running")
            ref = done[0]
            try:
                results[rank_of[ref]] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the first failure ends the job
                failures = {rank_of[ref]: e}
                # A dead rank makes its peers fail too (connection closed, collective
                # timeout); wait a moment so the message can blame the rank that started it.
                more, _ = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S) if pending else ([], [])
                for other in more:
                    try:
                        ray.get(other)
                    except Exception as e2:  # noqa: BLE001
                        failures[rank_of[other]] = e2
                raise _launch_error(failures, n) from None
        return [results[i] for i in range(n)]
    finally:
        _kill(actors)
        remove_placement_group(pg)


def _cpus_gpus(resources: dict) -> dict:
    return {k: resources.get(k, 0) for k in ("CPU", "GPU")}


def _write_hydra_files(cfg_unresolved: DictConfig, overrides: list[str], run_dir: Path) -> None:
    """The .hydra/ files Hydra writes under torchrun: the composed config and the overrides."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg_unresolved))
    (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def launch(
    overrides: list[str] | tuple[str, ...] = (),
    *,
    timeout_s: float | None = None,
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    return_params: bool = False,
    check: bool = True,
):
    """Run the job ``python -m xtrain.train OVERRIDES`` on ``ray.num_workers`` Ray workers.

    Returns the ``xtrain.train.RunResult`` of every rank, in rank order.
    Raises ConfigError (from the driver, before any worker starts) or
    LaunchError (a worker failed, could not be placed, or ``timeout_s`` passed).
    ``check=False`` skips the driver's validation, leaving it to the workers.
    Uses the running Ray if ``ray.init`` was already called, else starts or
    joins one as ``ray.address`` says and shuts it down at the end.
    """
    overrides = list(overrides)
    cfg, composed = prepare_config(overrides, check=check)
    _write_hydra_files(composed, overrides, Path(cfg.train.out_dir))

    started = _start_ray(cfg)
    try:
        return _run_workers(cfg, timeout_s, start_timeout_s, return_params)
    finally:
        if started:
            import ray

            time.sleep(0.5)  # let the log monitor forward the workers' last lines
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    """``python launch/ray_launch.py [xtrain overrides]``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\n\n")[0] + "\n\nusage: ray_launch.py [xtrain overrides] ray.num_workers=N [ray.address=auto] [ray.use_gpu=true]")
        return 0
    try:
        results = launch(argv)
    except ConfigError as e:
        print(f"xtrain ray launcher: invalid configuration:\n{e}", file=sys.stderr, flush=True)
        return 2
    except LaunchError as e:
        print(f"xtrain ray launcher: {e}", file=sys.stderr, flush=True)
        return 2 if e.config_error else 1
    res = results[0]
    final = f", final loss {res.losses[-1]:.4f}" if res.losses else ""
    print(f"xtrain ray launcher: {len(results)} workers done{final}; run dir {res.run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
