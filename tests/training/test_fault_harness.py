"""Cheap training processes for the fault suite: forked from a pre-imported server, run under a deadline.

Starting ``python -m mvptr_ds.run`` costs about 9 s of imports (torch, deepspeed, dynamo pulled in by the
optimizer checks) before the first step; a tiny run itself takes 1-3 s. :func:`launch` forks rank processes
from a multiprocessing *forkserver* that has imported all of that once, sets the launcher environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: what torchrun/deepspeed set) and runs the real CLI
entry point ``mvptr_ds.run.main`` in each, at torch's default thread count (nothing is pinned: the fault
tests' exactness claims hold for what users run). They are real processes: SIGKILL and SIGTERM work on them.
Every launch has a deadline: on expiry all its ranks are killed and the test fails (never hangs).

The tests in this file check the harness itself (deadline, exit codes).
"""
import json
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import pytest

from conftest import clear_stale_build_lock, prebuild_deepspeed_ops

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRELOAD = ["torch", "deepspeed", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
           "deepspeed.checkpoint.ds_to_universal", "deepspeed.utils.zero_to_fp32", "torch._dynamo",
           "deepspeed.runtime.zero.muon.original_muon", "mvptr_ds.run", "mvptr_ds.assembly", "mvptr_ds.objectives",
           "mvptr_ds.data.pipeline", "mvptr_ds.data.batching", "mvptr_ds.training.trainer", "safetensors.torch"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
        prebuild_deepspeed_ops()  # outside every launch's deadline
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(argv: List[str], env: Dict[str, str], log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MVPTR_FAULT_INJECT"):
        os.environ.pop(k, None)
    os.environ.update(env)
    os.environ.setdefault("WANDB_MODE", "disabled")
    from mvptr_ds.run import main

    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        rc = 1
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


@dataclass
class Launch:
    codes: List[Optional[int]]   # exit code per rank (-9: SIGKILL)
    logs: List[str]
    seconds: float

    def log(self) -> str:
        return "\n".join(f"--- rank {r} (exit {c}) ---\n{text[-3000:]}" for r, (c, text) in
                         enumerate(zip(self.codes, self.logs)))

    def ok(self) -> "Launch":
        assert all(c == 0 for c in self.codes), self.log()
        return self


def launch(args: List[str], world_size: int = 1, env: Optional[Dict[str, str]] = None, timeout: float = 90,
           log_dir: Optional[str] = None, on_start=None) -> Launch:
    """Run the CLI (``args`` as after ``python -m mvptr_ds.run``) on ``world_size`` forked ranks.

    ``on_start(processes)`` runs after the start (e.g. to send a signal). Raises AssertionError (after
    killing every rank) when the deadline passes.
    """
    ctx = _context()
    clear_stale_build_lock()  # a rank SIGKILLed by an earlier test may have left it
    port = str(_free_port())
    log_dir = log_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mvptr_fault_{os.getpid()}")
    os.makedirs(log_dir, exist_ok=True)
    stamp = f"{time.time_ns()}"
    procs, paths = [], []
    start = time.perf_counter()
    for rank in range(world_size):
        rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DS_ACCELERATOR": "cpu", **(env or {})}
        path = os.path.join(log_dir, f"{stamp}_rank{rank}.log")
        p = ctx.Process(target=_rank_main, args=(list(map(str, args)), rank_env, path), daemon=False)
        p.start()
        procs.append(p)
        paths.append(path)
    if on_start is not None:
        on_start(procs)
    deadline = start + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.perf_counter()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    logs = [open(path, errors="replace").read() if os.path.exists(path) else "" for path in paths]
    result = Launch([p.exitcode for p in procs], logs, time.perf_counter() - start)
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout} s: killed (a hang)\n{result.log()}")
    return result


SMALL_DATA = "synthetic:seed=3,images=16,captions_per_image=1"


def small_run_args(out, *extra, data: str = SMALL_DATA, micro_batch: int = 2) -> List[str]:
    """The fault suites' small run: tiny model, 4 steps, a checkpoint every 2, metrics every step."""
    return ["--model", "tiny", "--data", data, "--output_dir", str(out), "--max_steps", "4", "--micro_batch",
            str(micro_batch), "--save_every", "2", "--log_every", "1", "--seed", "5", "--wandb", "disabled"] \
        + [str(e) for e in extra]


def stopped_after_two(out, args_for=small_run_args):
    """Run ``args_for(out)`` until it stops after step 2 with one complete checkpoint; returns ``out``."""
    launch(args_for(out, "--stop_after", "2"), log_dir=str(out.parent)).ok()
    return out


def one_error(run: Launch, *must_contain: str) -> str:
    """Exactly one ``error:`` line on rank 0, exit 2 on every rank, no traceback; it contains every string given."""
    assert run.codes and all(code == 2 for code in run.codes), run.log()
    lines = [line for line in run.logs[0].splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in run.logs[0], run.log()
    for text in must_contain:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def copy_run(src, tmp_path):
    """A copy of the run folder ``src`` at ``tmp_path/run`` (tests tamper with copies of a shared run)."""
    import shutil

    dst = os.path.join(str(tmp_path), "run")
    shutil.copytree(str(src), dst)
    from pathlib import Path
    return Path(dst)


def metrics(run_dir) -> Dict[int, dict]:
    out = {}
    with open(os.path.join(str(run_dir), "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            assert r["step"] not in out, f"step {r['step']} logged twice in {run_dir}/metrics.jsonl"
            out[r["step"]] = r
    return out


@pytest.mark.fault
def test_deadline_kills_a_hung_launch(tmp_path):
    """A rank waiting forever for a peer that never comes is killed at the deadline and the launch fails."""
    start = time.perf_counter()
    with pytest.raises(AssertionError, match="still running"):
        # world size 2, only rank 0 started: rank 0 waits for rank 1 at rendezvous
        ctx = _context()
        assert ctx is not None
        launch(["--model", "tiny", "--data", "synthetic:images=8", "--output_dir", str(tmp_path / "r"),
                "--max_steps", "1", "--wandb", "disabled"], world_size=1, timeout=3,
               env={"WORLD_SIZE": "2"}, log_dir=str(tmp_path))
    assert time.perf_counter() - start < 30


@pytest.mark.fault
def test_exit_codes(tmp_path):
    bad = launch(["--model", "tiny", "--max_steps", "0", "--output_dir", str(tmp_path / "r")], timeout=60,
                 log_dir=str(tmp_path))
    assert bad.codes == [2] and "error: train.max_steps must be >= 1" in bad.logs[0]

    def kill(procs):
        time.sleep(0.5)
        os.kill(procs[0].pid, signal.SIGKILL)
    killed = launch(["--model", "tiny", "--data", "synthetic:images=8", "--output_dir", str(tmp_path / "k"),
                     "--max_steps", "1000", "--wandb", "disabled"], timeout=60, log_dir=str(tmp_path), on_start=kill)
    assert killed.codes == [-signal.SIGKILL]
