"""The ``xtrain`` launcher (xtrain/launcher.py) at 2 ranks, as a user runs it.

One uninterrupted 2-rank run (a module fixture) is the good run and the
reference for the restart test, which kills rank 1 with SIGKILL mid-run under
``--max-restarts 1`` and expects the same final loss and each step logged once.
The others: a bad config (exit 2, one message, no rank started), a rank that
dies (its name, its exit code, one summary), the in-process single rank, and
the summary's parsing on canned stderr.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xtrain.launcher import first_error_line, summarize

RUN = [
    "strategy=zero2", "model=tiny", "train.seq_len=32", "train.global_batch_size=8", "train.steps=30",
    "train.ckpt_every=5", "train.resume=auto", "train.eval_every=0", "train.progress=false", "comm=torch",
]
# The launcher chooses the thread count itself unless OMP_NUM_THREADS is set.
ENV = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def xtrain(*args, cwd, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "xtrain", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def failure_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.match(r"xtrain: .*failed", line)]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    t0 = time.monotonic()
    proc = xtrain("--nproc", "2", *RUN, f"train.out_dir={out}", cwd=out)
    return proc, out, time.monotonic() - t0


def test_two_ranks_train_to_the_end(good_run):
    proc, out, seconds = good_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in records(out)] == list(range(1, 31))
    assert sorted(p.name for p in out.glob("rank*.log")) == ["rank0.log", "rank1.log"]
    assert "done: 30 steps" in proc.stdout and "world=2" in proc.stdout
    assert "OMP_NUM_THREADS" not in proc.stderr  # torchrun's banner
    assert "Traceback" not in proc.stderr and "failed" not in proc.stderr
    print(f"2-rank run: {seconds:.1f} s")


def _rank_process(launcher_pid: int, rank: int) -> tuple[int, dict[str, str]] | None:
    """The launcher's child that runs xtrain.train as ``rank``, with its environment."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid or b"xtrain.train" not in (entry / "cmdline").read_bytes():
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode().split("\0") if "=" in v)
        except (OSError, ValueError):
            continue  # exited meanwhile
        if env.get("RANK") == str(rank):
            return int(entry.name), env
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank through /proc")
def test_a_killed_rank_restarts_and_ends_like_the_uninterrupted_run(good_run, tmp_path):
    ref_proc, ref_out, _ = good_run
    assert ref_proc.returncode == 0, ref_proc.stderr[-3000:]
    out = tmp_path / "run"
    t0 = time.monotonic()
    job = subprocess.Popen(
        [sys.executable, "-m", "xtrain", "--nproc", "2", "--max-restarts", "1", *RUN, f"train.out_dir={out}"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Past the checkpoint at step 10, before the end (a step takes ~30 ms here).
        metrics, found = out / "metrics.jsonl", None
        while found is None:
            assert job.poll() is None and time.monotonic() - t0 < 120, "the job ended before rank 1 could be killed"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 12:
                found = _rank_process(job.pid, rank=1)
            time.sleep(0.02)
        pid, env = found
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 0, stderr[-3000:]
    assert "xtrain: a rank failed; restarting all ranks (restart 1 of 1)" in stderr
    resumed = re.search(r"resumed from .*step_0*(\d+) at step (\d+)", stdout)
    assert resumed and 10 <= int(resumed.group(2)) < 30, stdout[-2000:]
    rows, ref = records(out), records(ref_out)
    assert [r["step"] for r in rows] == list(range(1, 31))  # each step once, the failed attempt's rows replaced
    assert rows[-1]["loss"] == ref[-1]["loss"]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]  # steps after the resume too, exactly
    print(f"kill -9 and restart: {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["strategy=dp", "train.global_batch_size=7"], "train.global_batch_size=7 is not divisible"),
        (["strategy=nope"], "strategy/nope"),
    ],
    ids=["check", "composition"],
)
def test_a_bad_config_stops_before_any_rank_with_one_message(tmp_path, overrides, says):
    proc = xtrain("--nproc", "2", "model=tiny", *overrides, f"train.out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("xtrain: invalid configuration:\n") and proc.stderr.count("invalid configuration") == 1
    assert says in proc.stderr
    for noise in ("Traceback", "ChildFailedError", "[rank"):
        assert noise not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()  # no rank started


DIE_ON_RANK_1 = """
import os, sys, torch
from xtrain.train import main
if os.environ["RANK"] == "1":
    calls = []
    original = torch.optim.AdamW.step
    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            print("simulated crash on rank 1", file=sys.stderr, flush=True)
            os._exit(3)  # no Python clean-up
        return original(self, *a, **k)
    torch.optim.AdamW.step = step
sys.argv = ["xtrain"] + sys.argv[1:]
main()
"""


def test_a_dying_rank_is_named_in_one_summary_with_its_exit_code(tmp_path):
    script = tmp_path / "die.py"
    script.write_text(DIE_ON_RANK_1)
    t0 = time.monotonic()
    proc = xtrain("--nproc", "2", "--script", str(script), "strategy=dp", "model=tiny", "train.steps=50",
                  "train.seq_len=32", "train.global_batch_size=8", "comm=torch", "dist_timeout_s=30",
                  f"train.out_dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    summary = failure_lines(proc.stderr)
    assert len(summary) == 1, proc.stderr[-3000:]
    assert "rank 1 exited with code 3: simulated crash on rank 1" in proc.stderr[proc.stderr.index(summary[0]):]
    assert "[rank1]:simulated crash on rank 1" in proc.stderr  # the rank's own stderr reached the console
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr
    print(f"dying rank: {time.monotonic() - t0:.1f} s")


def test_one_rank_runs_in_process_and_the_console_script_is_the_launcher(tmp_path):
    proc = xtrain("model=tiny", "train.steps=2", "train.seq_len=32", "train.global_batch_size=4", "train.eval_every=0",
                  "train.progress=false", f"train.out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2] and "world=1" in proc.stdout
    script = Path(sys.executable).with_name("xtrain")
    if not script.is_file():
        pytest.skip("no xtrain console script next to this interpreter (not pip-installed)")
    help_ = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--nproc" in help_.stdout and "--max-restarts" in help_.stdout


# -- the summary, on canned failures --------------------------------------------------------


HYDRA_TRACEBACK = """\
[W init.cpp:1] some torch warning
Error executing job with overrides: ['strategy=dp']
Traceback (most recent call last):
  File "/x/train.py", line 243, in _hydra_main
    run(cfg)
RuntimeError: boom in the optimizer
second line of the message

Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.
"""


def test_first_error_line():
    assert first_error_line(HYDRA_TRACEBACK) == "RuntimeError: boom in the optimizer"
    assert first_error_line("noise\n[rank 1] xtrain: all_gather on group 'dp' timed out after 30 s\n") == (
        "all_gather on group 'dp' timed out after 30 s"
    )
    assert first_error_line("[rank 0] xtrain: invalid configuration:\n  - data.path=x: no such file\n") == (
        "invalid configuration: - data.path=x: no such file"
    )
    assert first_error_line("terminate called after throwing\n  what():  bad\n") == "what():  bad"
    assert first_error_line("\n") is None


def test_summary_groups_ranks_leads_with_the_first_failure_and_skips_the_stopped(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    texts = {0: "", 1: "RuntimeError: x\n", 2: "[rank 2] xtrain: reduce_scatter failed: peer gone\n",
             3: "[rank 3] xtrain: reduce_scatter failed: peer gone\n", 4: ""}
    for local_rank, text in texts.items():
        (tmp_path / str(local_rank)).mkdir()
        (tmp_path / str(local_rank) / "stderr.log").write_text(text)
    now = time.time()
    for local_rank, age in {0: 1, 1: 9, 2: 2, 3: 2, 4: 5}.items():  # rank 1's stderr is the oldest
        os.utime(tmp_path / str(local_rank) / "stderr.log", (now - age, now - age))

    def failure(local_rank, code):
        return ProcessFailure(local_rank=local_rank, pid=100 + local_rank, exitcode=code, error_file="<N/A>")

    failures = {0: failure(0, -signal.SIGTERM), 1: failure(1, -signal.SIGKILL), 2: failure(2, 1),
                3: failure(3, 1), 4: failure(4, 7)}
    message, code = summarize(failures, 8, tmp_path)
    assert code == 128 + signal.SIGKILL
    assert message.splitlines() == [
        "xtrain: 4 of 8 ranks failed:",
        "  rank 1 killed by SIGKILL: RuntimeError: x",
        "  ranks 2, 3 exited with code 1: reduce_scatter failed: peer gone",
        "  rank 4 exited with code 7: no error message",
    ]
    message, code = summarize({1: failure(4, 7)}, 2, tmp_path)
    assert (message, code) == ("xtrain: 1 of 2 ranks failed: rank 1 exited with code 7: no error message", 7)
