"""Runs that never lose work (train/run_guard.py): SIGTERM and SIGINT stop a LoRA run after the current
step with that step's checkpoint, a write that finds no room stops it with one message naming the intact
checkpoint, and --resume then logs the same losses as an uninterrupted run; also --eval_examples=0.

The interrupted runs are `python -m experiments.lora` subprocesses, as a user runs them (or two processes
joined by jax.distributed through launch.single_host), compiling with XLA's backend optimisations off
and sharing a persistent compilation cache. The signals are real: the process sends them to itself
through the test-only hook JAXPEFT_TEST_SIGNAL_AFTER_STEP, so the step is exact. The uninterrupted
reference and the last resume of each story go in this process (`run_entry`).

A run costs ~10-15 s of CPU, mostly imports (transformers and torch, for the tokenizer), so the cases are
one story in one folder, each stage checked by its own test, each resume checked by the losses the next
stage logs:
  1. SIGTERM after step 2;
  2. --resume under a file-size limit below a checkpoint's largest file: the final checkpoint fails, step 2
     stays intact and named;
  3. --resume, SIGTERM after step 3;  4. --resume, SIGINT after step 5;  5. --resume to the end (in this
     process): the losses of the uninterrupted run.
Two processes with only process 1 SIGTERMed (both must stop after the same step) are a story of their own,
marked slow: three more interpreters (the launcher and two workers) for one stage.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxpeft.core.errors import WriteFailedError
from jaxpeft.core.write_errors import writing
from jaxpeft.train.checkpoint import committed_steps
from jaxpeft.train.metrics import read_metrics
from jaxpeft.train.run_guard import TEST_HOOK
from tests.cli import ROOT, run_entry

STEPS = 6
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Runs python with RLIMIT_FSIZE lowered to argv[1] bytes (without preexec_fn, which forks a threaded process).
WITH_FILE_SIZE_LIMIT = ("import os, resource, sys; limit = int(sys.argv[1]); "
                        "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
                        "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


@pytest.fixture(scope="module")
def lora_args(tiny_model_dir, tmp_path_factory):
    """`lora_args(out, *more)`: the flags of every run here (the tiny model, 28 records, STEPS steps, no
    periodic checkpoints, no evaluation)."""
    data = tmp_path_factory.mktemp("data") / "dates.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Write {d} March {1950 + d} as ISO.",
                                        "output": f"{1950 + d}-03-{d:02d}"}) + "\n" for d in range(1, 29)))
    return lambda out, *more: [f"--model={tiny_model_dir}", f"--dataset={data}", "--rank=4", f"--steps={STEPS}",
                               "--batch_size=4", "--seq_len=32", "--eval_examples=0", "--save_every=0",
                               "--warmup_steps=1", "--progress=false", f"--out={out}", *more]


@pytest.fixture(scope="module")
def run_cli(lora_args, tmp_path_factory):
    """`run_cli(out, *more, hook=None, launcher=(), file_size_limit=None)`: `python -m experiments.lora` into
    `out` in a subprocess; `hook` is the test hook's value, `launcher` a command the run goes after
    (launch.single_host), `file_size_limit` the child's RLIMIT_FSIZE in bytes."""
    cache = tmp_path_factory.mktemp("jax_cache")

    def go(out: Path, *more: str, hook: str | None = None, launcher: tuple[str, ...] = (),
           file_size_limit: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": FAST_COMPILE, "JAX_COMPILATION_CACHE_DIR": str(cache),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        env.pop(TEST_HOOK, None)
        if hook:
            env[TEST_HOOK] = hook
        prefix = ["-c", WITH_FILE_SIZE_LIMIT, str(file_size_limit)] if file_size_limit else []
        return subprocess.run([sys.executable, *prefix, *launcher, "-m", "experiments.lora", *lora_args(out, *more)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    return go


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _one_error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """The run exited with `code`, printed no traceback and exactly one `error:` line; returns that line."""
    assert proc.returncode == code, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def _assert_losses_match(got: list[tuple[int, float]], reference: list[tuple[int, float]]) -> None:
    steps = [s for s, _ in got]
    assert steps == [s for s, _ in reference][: len(steps)], steps  # each step once, in order
    np.testing.assert_allclose([v for _, v in got], [v for _, v in reference][: len(got)], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def reference(lora_args, tmp_path_factory) -> dict:
    """The uninterrupted run: its losses, results.json and stdout."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run_entry("experiments.lora", *lora_args(out))
    losses = _losses(out)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert len({v for _, v in losses}) == STEPS  # the loss moves, so a wrong resume would show
    return {"losses": losses, "results": json.loads((out / "results.json").read_text()), "stdout": proc.stdout,
            "out": out}


def _resume_to_the_end(lora_args, out: Path) -> list[tuple[int, float]]:
    run_entry("experiments.lora", *lora_args(out, "--resume"))
    assert json.loads((out / "results.json").read_text())["steps"] == STEPS
    return _losses(out)


@pytest.fixture(scope="module")
def story(run_cli, lora_args, tmp_path_factory) -> dict:
    """The story of the module doc, in one folder; per stage its process and what it left: committed
    checkpoints (ours and orbax's view), logged losses, leftovers in checkpoints/, whether adapter/ exists."""
    import orbax.checkpoint as ocp

    out = tmp_path_factory.mktemp("story") / "run"
    stages = {"out": out}

    def stage(name: str, proc: subprocess.CompletedProcess | None) -> None:
        ckpt = out / "checkpoints"
        assert ckpt.is_dir(), proc.stderr[-4000:] if proc else ckpt
        stages[name] = {"proc": proc, "committed": committed_steps(ckpt), "losses": _losses(out),
                        "leftovers": sorted(p.name for p in ckpt.iterdir() if not p.name.isdigit()),
                        "orbax_latest": ocp.CheckpointManager(ckpt, options=ocp.CheckpointManagerOptions(
                            read_only=True)).latest_step(),
                        "adapter": (out / "adapter").exists()}

    stage("sigterm_first", run_cli(out, hook="2:SIGTERM"))
    stages["limit"] = max(p.stat().st_size for p in (out / "checkpoints" / "2").rglob("*") if p.is_file()) // 2
    stage("failed_write", run_cli(out, "--resume", file_size_limit=stages["limit"]))
    stage("sigterm_one", run_cli(out, "--resume", hook="3:SIGTERM"))
    stage("sigint", run_cli(out, "--resume", hook="5:SIGINT"))
    stages["final_losses"] = _resume_to_the_end(lora_args, out)
    stage("final", None)
    return stages


def test_eval_examples_0_turns_the_evaluation_off(reference):
    results = reference["results"]
    assert results["before"] == {} and results["after"] == {} and results["samples_after"] == []
    assert "skipped" in results["evaluation"] and results["steps"] == STEPS
    assert not any("eval_loss" in r for r in read_metrics(reference["out"] / "metrics.jsonl"))
    assert (reference["out"] / "loss.png").stat().st_size > 0 and (reference["out"] / "adapter").is_dir()
    assert "evaluation skipped" in reference["stdout"]


def test_a_negative_eval_examples_is_refused(tmp_path):
    from jaxpeft.core.errors import ConfigError
    from jaxpeft.train.run_config import RunConfig
    from jaxpeft.train.run_data import prepare_data

    with pytest.raises(ConfigError, match=r"--eval_examples=-1: expected a count .* \(0 turns the evaluation off\)"):
        prepare_data(RunConfig(out=str(tmp_path), eval_examples=-1), tokenizer=None)


def test_sigterm_commits_the_step_it_stopped_after_and_the_resume_matches(story, reference):
    s, out = story["sigterm_first"], story["out"]
    line = _one_error_line(s["proc"], 143)
    assert "stopped by SIGTERM after step 2 of 6" in line and f"saved in {out / 'checkpoints'}" in line, line
    assert s["committed"] == [2] and s["orbax_latest"] == 2  # --save_every=0: the stop wrote it
    _assert_losses_match(s["losses"], reference["losses"][:2])
    # The next run resumed from it, then failed only at its final checkpoint: steps 3..6 as in the
    # uninterrupted run.
    _assert_losses_match(story["failed_write"]["losses"], reference["losses"])
    assert len(story["failed_write"]["losses"]) == STEPS


@pytest.mark.slow  # three more interpreters (launcher and two workers): ~40 s of CPU for one stage
def test_sigterm_to_one_of_two_processes_stops_both_after_the_step_and_resume_matches(
        run_cli, lora_args, reference, tmp_path):
    out = tmp_path / "run"
    launcher = ("-m", "launch.single_host", "--num_processes=2", "--platform=cpu", "--devices_per_process=1",
                "--timeout=400", "--initialization_timeout=60", "--")
    # Only process 1 gets the signal; process 0 must stop after the same step (the per-step allgather).
    proc = run_cli(out, hook="2:SIGTERM:1", launcher=launcher, timeout=450)
    assert proc.returncode == 143, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "a process failed" not in proc.stderr, proc.stderr[-4000:]
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert len(errors) == 2, errors  # one line from each process
    assert "stopped because another process received SIGTERM after step 2 of 6" in errors[0], errors  # process 0
    assert "stopped by SIGTERM after step 2 of 6" in errors[1], errors  # process 1
    assert f"saved in {out / 'checkpoints'}" in errors[1] and "--resume" in errors[1]
    assert committed_steps(out / "checkpoints") == [2]  # --save_every=0: the stop wrote it
    _assert_losses_match(_losses(out), reference["losses"][:2])  # flushed, by process 0 alone (each step once)
    # One process resumes (the checkpoint restored onto its layout): the uninterrupted run's losses.
    final = _resume_to_the_end(lora_args, out)
    _assert_losses_match(final, reference["losses"])
    assert len(final) == STEPS


def test_a_failed_checkpoint_write_names_the_intact_one_and_resume_works(story, reference):
    """Resumed from the step-2 checkpoint under a file-size limit below its largest file: the final
    checkpoint fails with one message naming it and step 2, which stays the newest committed one."""
    s, out, limit = story["failed_write"], story["out"], story["limit"]
    line = _one_error_line(s["proc"], 74)
    assert "Event loop is closed" not in s["proc"].stderr
    assert f"could not write checkpoint step {STEPS} in {out / 'checkpoints'}: File too large" in line, line
    assert f"the file-size limit (ulimit -f) is {limit:,} bytes" in line
    assert f"newest intact checkpoint is step 2 ({out / 'checkpoints' / '2'})" in line and "--resume" in line
    # The failed step is never taken for a committed one, whatever orbax left of it; nothing else written.
    assert s["committed"] == [2] and s["orbax_latest"] == 2 and not s["adapter"]
    # --resume from step 2 worked: the next run dropped steps 3..6 from metrics.jsonl and redid them, and
    # removed whatever the failed save had left.
    _assert_losses_match(story["sigterm_one"]["losses"], reference["losses"])
    assert story["sigterm_one"]["leftovers"] == []


def test_sigterm_saves_the_current_step_and_resume_matches(story, reference):
    s, out = story["sigterm_one"], story["out"]
    line = _one_error_line(s["proc"], 143)
    assert "stopped by SIGTERM after step 3 of 6" in line and f"saved in {out / 'checkpoints'}" in line, line
    assert "--resume (and without --overwrite)" in line
    assert s["committed"] == [2, 3] and [st for st, _ in s["losses"]] == [1, 2, 3]
    _assert_losses_match(story["sigint"]["losses"], reference["losses"])  # the next run resumed from step 3
    assert len(story["sigint"]["losses"]) == 5


def test_sigint_saves_the_current_step_and_resume_matches(story, reference):
    s = story["sigint"]
    line = _one_error_line(s["proc"], 130)
    assert "stopped by SIGINT after step 5 of 6" in line and "KeyboardInterrupt" not in s["proc"].stderr, line
    assert s["committed"] == [3, 5]
    final = story["final"]
    assert final["committed"] == [5, STEPS] and final["adapter"]
    _assert_losses_match(story["final_losses"], reference["losses"])
    assert len(story["final_losses"]) == STEPS


def test_a_second_signal_aborts_at_once_and_the_handlers_are_restored(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from jaxpeft.train.run_guard import RunGuard
        before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        with RunGuard({str(tmp_path)!r}, total_steps=9) as guard:
            assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
            assert not guard.should_stop(1)
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.should_stop(1) and guard.should_stop(2)  # the first signal asks; the answer sticks
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
        print("restored", flush=True)
        with RunGuard({str(tmp_path)!r}, total_steps=9) as guard:
            guard.should_stop(1)
            os.kill(os.getpid(), signal.SIGINT)
            print("first", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            print("still running", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(TEST_HOOK, None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["restored", "first"], (proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == -15  # killed by the second signal's default action, at once
    assert "send it again to abort at once" in proc.stderr


def test_writes_that_find_no_room_become_one_error_naming_the_file(tmp_path):
    with pytest.raises(WriteFailedError, match=r"could not write results\.json: No space left on device "
                                               r"\(writing /data/run/results\.json; .* free there\); free space"):
        with writing("results.json", tmp_path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/results.json")
    with pytest.raises(WriteFailedError, match=r"Disk quota exceeded \(writing /q/x; a write of 5,617 bytes failed; "
                                               r"it needs about 2\.00 GB"):
        with writing("checkpoint step 3", tmp_path, needed=2 * 10**9):  # how tensorstore reports it
            raise ValueError('OUT_OF_RANGE: Failed writing: "/q/x": Failed to write 5617 bytes: Disk quota exceeded')
    with pytest.raises(PermissionError):  # any other failure passes unchanged
        with writing("results.json", tmp_path):
            raise PermissionError(errno.EACCES, "Permission denied")
