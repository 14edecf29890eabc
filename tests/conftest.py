"""Shared test helpers: the repository root, ../shared/data, and running the CLI in a subprocess."""
import glob
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# tests/ mirrors the package (tests/model, tests/training, ...); shared helpers (test_fault_harness, kernel_parity,
# objective_fixtures, ...) are imported by module name from any of these folders.
for _folder in sorted(Path(__file__).resolve().parent.iterdir()):
    if _folder.is_dir() and not _folder.name.startswith((".", "__")) and str(_folder) not in sys.path:
        sys.path.append(str(_folder))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

# The host-memory policy (training/host_memory.py) is process-wide and permanent; in-process tests that build an
# engine would switch it on for the rest of the pytest process. Mark it applied here so the test process keeps
# glibc's defaults; runs in subprocesses apply it as users get it, and tests/training/test_host_memory.py checks
# the policy itself in subprocesses.
from mvptr_ds.training import host_memory  # noqa: E402

host_memory._applied = True


_DS_OPS_BUILT = False


def prebuild_deepspeed_ops() -> None:
    """JIT-build DeepSpeed's shm_comm op (every process group on CPU loads it; ~50 s the first time, then cached
    in TORCH_EXTENSIONS_DIR) once, here, so no launch deadline in a test pays for the compiler."""
    global _DS_OPS_BUILT
    if not _DS_OPS_BUILT:
        from deepspeed.comm.torch import build_shm_op
        build_shm_op()
        _DS_OPS_BUILT = True


def clear_stale_build_lock() -> None:
    """Remove the JIT build lock of DeepSpeed's shm op when it is left over.

    Every process that loads the op takes ``<TORCH_EXTENSIONS_DIR>/deepspeed_shm_comm/lock`` for a moment,
    even when the op is built; a rank that a test SIGKILLs inside that moment leaves the file behind, and every
    later load then waits on it forever. Tests start processes one launch at a time after
    :func:`prebuild_deepspeed_ops` has built the op, so a lock present between launches is such a leftover.
    """
    if not _DS_OPS_BUILT:
        return
    for lock in glob.glob(os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "deepspeed_shm_comm*", "lock")):
        os.remove(lock)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """The environment for a child run: no launcher variables inherited, CPU accelerator, W&B offline.

    ``extra`` sets more variables; a value of None removes one (``OMP_NUM_THREADS=None``: torch's default).
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def run_cli(args, timeout=300, launcher_procs=None, cwd=None, check=True, env=None):
    """Run ``python -m mvptr_ds.run ARGS`` (or through ``deepspeed --num_gpus N``); return the CompletedProcess.

    ``env``: more variables for :func:`clean_env`."""
    prebuild_deepspeed_ops()
    clear_stale_build_lock()
    if launcher_procs:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(launcher_procs),
               "--master_port", str(free_port()), str(REPO / "mvptr_ds" / "run.py")] + list(args)
    else:
        cmd = [sys.executable, "-m", "mvptr_ds.run"] + list(args)
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=clean_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data {SHARED_DATA} not present (it ships with the project's CI, not with a clone)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_stale_build_lock():
    """Before every test: a build lock left by a process an earlier test killed (see clear_stale_build_lock)."""
    clear_stale_build_lock()
    yield


@pytest.fixture
def no_process_group(monkeypatch):
    """Rank 0 of 1 without torch.distributed; reaching the DeepSpeed engine fails (validation must stop first)."""
    import torch

    from mvptr_ds.training import distributed, trainer
    monkeypatch.setattr(distributed, "setup", lambda *a, **k: distributed.DistInfo(0, 0, 1, torch.device("cpu")))

    def engine(*a, **k):
        raise AssertionError("bad input reached the DeepSpeed engine")
    monkeypatch.setattr(trainer, "build_engine", engine)


def main_one_error(capsys, argv, *must_contain, out=None) -> str:
    """``mvptr_ds.run.main(argv)`` in this process returns 2 with exactly one ``error:`` line holding each string
    and no traceback; ``out`` (a folder), when given, stays empty. Returns the line."""
    from mvptr_ds.run import main
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for text in must_contain:
        assert str(text) in lines[0], (text, lines[0])
    if out is not None:
        assert not os.path.exists(out) or not os.listdir(out), sorted(os.listdir(out))
    return lines[0]

