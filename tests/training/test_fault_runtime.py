"""Issue 17, runtime: one run per output folder, whole metrics lines, ranks that outlive their launcher, shared
memory left behind, non-finite weights offered as "before the problem", Ctrl-C twice, a full disk while
saving, and config.json rewritten by a refused resume.

Runs go through the fault harness (forked, pre-imported CLI processes, ``test_fault_harness.launch``); the
launcher test starts the real ``deepspeed`` launcher.
"""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, clean_env, free_port, prebuild_deepspeed_ops
from mvptr_ds.config import TrainConfig
from mvptr_ds.training import cleanup, distributed, lock, writes
from mvptr_ds.training.launcher import LauncherWatch
from mvptr_ds.training.logging import RunLogger, append_line
from mvptr_ds.training.logging import truncate_metrics
from test_fault_harness import copy_run, launch, metrics, one_error, small_run_args, stopped_after_two

pytestmark = [pytest.mark.fault]

DATA = "synthetic:seed=3,images=16,held_out=2,captions_per_image=1"
SMALLER = "synthetic:seed=3,images=6,held_out=2,captions_per_image=1"


def args(out, *extra):
    return small_run_args(out, "--warmup_steps", "0", *extra, data=DATA, micro_batch=4)


def wait_for(predicate, what, timeout=120.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def complete_steps(out):
    root = out / "checkpoints"
    return sorted(int(n[4:]) for n in os.listdir(root) if n.startswith("step") and (root / n / "COMPLETE").exists())


def snapshot(folder):
    """Every file under ``folder`` with its size, mtime and hash."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def shm_files(port):
    """This machine's DeepSpeed shm buffers of the run on ``port`` (any address)."""
    if not os.path.isdir("/dev/shm"):
        return []
    return sorted(n for n in os.listdir("/dev/shm")
                  if n.startswith(f"deepspeed_allreduce_buffer_{os.getuid()}_") and f"_{port}_" in n)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after step 2 with one complete checkpoint (copied by each test)."""
    return stopped_after_two(tmp_path_factory.mktemp("stopped") / "run", args)


# ------------------------------------------------------------------------------------------------ 1: lock

def test_second_run_on_a_busy_output_dir_is_refused(stopped_run, tmp_path):
    """Run A trains; B (1 and 2 ranks) on the same folder: one error line naming A's pid, exit 2, no file touched
    (A is frozen meanwhile so the folder holds still). A is SIGKILLed: its lock dies with it, a rerun resumes."""
    out = copy_run(stopped_run, tmp_path)
    seen = {}

    def second_run(procs):
        a = procs[0].pid
        wait_for(lambda: len(lines(out / "metrics.jsonl")) >= 3, "run A to train past step 2")
        os.kill(a, signal.SIGSTOP)
        try:
            before = snapshot(out)
            seen["one"] = launch(args(out), log_dir=str(tmp_path), timeout=60)
            seen["two"] = launch(args(out), world_size=2, log_dir=str(tmp_path), timeout=60)
            seen["same"] = snapshot(out) == before
        finally:
            os.kill(a, signal.SIGKILL)
        seen["pid"] = a

    first = launch(args(out, "--max_steps", "1000", "--save_every", "1000"), log_dir=str(tmp_path),
                   on_start=second_run)
    assert first.codes == [-signal.SIGKILL], first.log()
    line = one_error(seen["one"], f"pid {seen['pid']}", "in use by another run", str(out))
    assert "--output_dir" in line
    two = seen["two"]
    assert two.codes == [2, 2], two.log()
    assert [sum(x.startswith("error:") for x in log.splitlines()) for log in two.logs] == [1, 1], two.log()
    assert f"pid {seen['pid']}" in two.logs[1]
    assert seen["same"], "the refused run changed the folder"
    again = launch(args(out, "--max_steps", "3"), log_dir=str(tmp_path)).ok()
    assert f"resumed from {out / 'checkpoints' / 'step2'}" in again.logs[0], again.log()
    assert not (out / lock.NAME).exists()  # released (and removed) at the end


def test_lock_file_left_by_a_dead_run_is_taken_over(tmp_path):
    """A lock file whose holder is gone (no flock held on it) does not block; a held one does, naming its pid."""
    (tmp_path / lock.NAME).write_text("999999 elsewhere\n")
    held = lock.acquire(str(tmp_path))
    assert (tmp_path / lock.NAME).read_text().split()[0] == str(os.getpid())
    pid = os.fork()
    if pid == 0:  # another process: refused while we hold it
        try:
            lock.acquire(str(tmp_path))
            os._exit(1)
        except Exception as e:
            os._exit(0 if f"pid {os.getppid()}" in str(e) else 3)
    assert os.waitpid(pid, 0)[1] == 0
    held.release()
    assert not (tmp_path / lock.NAME).exists()
    lock.acquire(str(tmp_path)).release()


# ------------------------------------------------------------------------------------------------ 2: metrics

def test_metrics_records_are_single_whole_line_writes(tmp_path, monkeypatch):
    """One ``write`` per record; two processes appending at once never tear a line; a write cut short by a full
    disk is taken back off (the file ends with the last whole line)."""
    path = tmp_path / "metrics.jsonl"
    calls = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: calls.append(bytes(data)) or real_write(fd, data))
    log = RunLogger(str(tmp_path), True, 10, 0, TrainConfig(wandb="disabled"), {}, resume=False)
    log.log({"step": 1, "loss": 0.5})
    log.close()
    assert calls == [b'{"loss": 0.5, "step": 1}\n']
    monkeypatch.undo()

    writers = []
    for w in range(2):
        pid = os.fork()
        if pid == 0:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            for i in range(3000):
                append_line(fd, json.dumps({"step": i, "writer": w, "pad": "x" * (i % 700)}))
            os._exit(0)
        writers.append(pid)
    for pid in writers:
        assert os.waitpid(pid, 0)[1] == 0
    records = [json.loads(x) for x in path.read_text().splitlines()]  # raises on a torn line
    assert len(records) == 6001

    size = path.stat().st_size
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    monkeypatch.setattr(os, "write", lambda f, data: real_write(f, data[:len(data) // 2]))
    with pytest.raises(OSError) as e:
        append_line(fd, json.dumps({"step": 99, "loss": 1.0}))
    monkeypatch.undo()
    os.close(fd)
    assert e.value.errno == errno.ENOSPC and path.stat().st_size == size


def test_resume_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    truncate_metrics(str(path), 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


# ------------------------------------------------------------------------------------------------ 3: launcher

def _session_alive(pgid):
    alive = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def test_launcher_watch(monkeypatch):
    """No watch in a plain process (nor once ``distributed.setup`` filled in the variables itself); under a
    launcher, the parent's exit is reported."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert LauncherWatch.from_env() is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed, "_FILLED_IN", True)
    assert LauncherWatch.from_env() is None
    monkeypatch.setattr(distributed, "_FILLED_IN", False)
    assert LauncherWatch.from_env().check() is None
    read, write = os.pipe()
    launcher = os.fork()
    if launcher == 0:  # the "launcher": starts a rank, then exits
        if os.fork() == 0:
            watch = LauncherWatch.from_env()
            os.write(write, b"started\n")
            deadline = time.time() + 30
            while watch.check() is None and time.time() < deadline:
                time.sleep(0.01)
            os.write(write, f"{watch.check()}\n".encode())
            os._exit(0)
        time.sleep(0.5)
        os._exit(0)
    os.close(write)
    os.waitpid(launcher, 0)
    with os.fdopen(read) as f:
        assert f.read().splitlines() == ["started", f"the launcher (pid {launcher}) exited"]


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_launcher_stops_both_ranks_with_a_checkpoint(tmp_path):
    """``kill -TERM <deepspeed>`` ends the launcher at once (it forwards nothing on one node); both ranks notice at
    the next step boundary, save and exit; no shm buffer of the run is left; --resume auto continues."""
    prebuild_deepspeed_ops()
    out, port = tmp_path / "run", free_port()
    log_path = tmp_path / "launcher.log"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(REPO / "mvptr_ds" / "run.py")] + args(out, "--max_steps", "10000", "--save_every", "10000")
    with open(log_path, "w") as log:
        runner = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for(lambda: len(lines(out / "metrics.jsonl")) >= 2 or runner.poll() is not None,
                 "the ranks to train", timeout=400)
        assert runner.poll() is None, log_path.read_text()[-4000:]
        assert shm_files(port) == []  # unlinked right after the process group started (still mapped)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(10) == -signal.SIGTERM
        start = time.time()
        wait_for(lambda: not _session_alive(runner.pid), "the ranks to exit", timeout=120)
        stopped_in = time.time() - start
    finally:
        for pid in _session_alive(runner.pid):
            os.kill(pid, signal.SIGKILL)
    text = log_path.read_text()
    assert f"the deepspeed launcher (pid {runner.pid}) exited: stopped after step" in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    done = complete_steps(out)
    assert len(done) == 1 and done[0] >= 2, (done, text[-3000:])
    assert shm_files(port) == []
    assert stopped_in < 60, stopped_in
    cont = launch(args(out, "--max_steps", str(done[0] + 1)), world_size=2, log_dir=str(tmp_path)).ok()
    assert f"at step {done[0]}" in cont.logs[0]
    assert sorted(metrics(out)) == list(range(1, done[0] + 2))


# ------------------------------------------------------------------------------------------------ 4: leftovers

def test_no_shm_buffers_left_after_a_normal_end_or_sigterm(tmp_path):
    """Two ranks with ``LOCAL_SIZE`` set (as the deepspeed launcher does) map DeepSpeed's shm all-reduce buffers;
    their names are gone while the run trains, and after a normal end or a SIGTERM none is left."""
    port = free_port()
    env = {"LOCAL_SIZE": "2", "MASTER_PORT": str(port)}
    launch(args(tmp_path / "a", "--max_steps", "2"), world_size=2, env=env, log_dir=str(tmp_path)).ok()
    assert shm_files(port) == []

    port = free_port()
    env = {"LOCAL_SIZE": "2", "MASTER_PORT": str(port)}
    out = tmp_path / "b"
    mapped = {}

    def term(procs):
        wait_for(lambda: len(lines(out / "metrics.jsonl")) >= 1, "training")
        with open(f"/proc/{procs[0].pid}/maps") as f:
            mapped["maps"] = [x for x in f.read().splitlines() if f"_{port}_" in x]
        mapped["listed"] = shm_files(port)
        os.kill(procs[0].pid, signal.SIGTERM)

    run = launch(args(out, "--max_steps", "10000", "--save_every", "10000"), world_size=2, env=env,
                 log_dir=str(tmp_path), on_start=term)
    assert run.codes == [0, 0], run.log()
    # the run did create buffers (both ranks' are mapped by rank 0), already unlinked: "(deleted)"
    assert len(mapped["maps"]) >= 2 and all(x.endswith("(deleted)") for x in mapped["maps"]), mapped
    assert mapped["listed"] == [] and shm_files(port) == []


def test_stale_temporaries_are_removed_under_the_lock(tmp_path):
    for name in ("config.json.tmp123", "metrics.jsonl.tmp9", "final/.model.safetensors.tmp77",
                 "checkpoints/step2/COMPLETE.tmp5", "checkpoints/step2/universal.tmp8/x", "keep.tmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    removed = cleanup.remove_stale_temporaries(str(tmp_path))
    assert len(removed) == 5
    left = sorted(os.path.relpath(os.path.join(root, f), tmp_path) for root, _, files in os.walk(tmp_path)
                  for f in files)
    assert left == ["keep.tmp"], left


# ------------------------------------------------------------------------------------------------ 5: non-finite weights

def test_nonfinite_weights_are_not_offered_as_before_the_problem(tmp_path):
    """--lr 1e39: the first update makes the weights inf/NaN (lr * update overflows fp32), every later loss is
    NaN; the stop names that instead of offering a checkpoint of those weights."""
    out = tmp_path / "r"
    run = launch(args(out, "--lr", "1e39", "--max_bad_steps", "2", "--save_every", "100"), log_dir=str(tmp_path))
    line = one_error(run, "2 consecutive steps had a non-finite loss", "weights themselves are not finite",
                     "no checkpoint from before the problem")
    assert "holds the weights of step" not in line
    assert not (out / "checkpoints").exists() or complete_steps(out) == []


# ------------------------------------------------------------------------------------------------ 6: Ctrl-C twice

def test_ctrl_c_twice_is_one_line_and_keeps_the_previous_checkpoint(stopped_run, tmp_path):
    out = copy_run(stopped_run, tmp_path)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()

    def interrupt_twice(procs):
        wait_for(lambda: len(lines(out / "metrics.jsonl")) >= 3, "training past step 2")
        os.kill(procs[0].pid, signal.SIGINT)
        wait_for(lambda: any("fault: pausing in the save" in p.read_text() for p in log_dir.iterdir()),
                 "the final checkpoint to start")
        os.kill(procs[0].pid, signal.SIGINT)

    run = launch(args(out, "--max_steps", "10000", "--save_every", "10000"), log_dir=str(log_dir),
                 env={"MVPTR_FAULT_INJECT": "pause_in_save=30"}, on_start=interrupt_twice)
    assert run.codes == [130], run.log()
    errors = [x for x in run.logs[0].splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.logs[0], run.log()
    assert "interrupted again during the final checkpoint" in errors[0]
    assert f"{out / 'checkpoints' / 'step2'} is intact" in errors[0], errors[0]
    assert complete_steps(out) == [2]
    again = launch(args(out, "--max_steps", "3"), log_dir=str(tmp_path)).ok()
    assert f"resumed from {out / 'checkpoints' / 'step2'}" in again.logs[0], again.log()


# ------------------------------------------------------------------------------------------------ 7: disk full

def test_torch_save_on_a_full_disk_raises_the_os_error():
    """torch.save to a path reports "unexpected pos" on ENOSPC; the checkpoint writer keeps the OSError."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    import torch
    with pytest.raises(OSError) as e:
        writes.save_file({"w": torch.zeros(100000)}, "/dev/full")
    assert e.value.errno == errno.ENOSPC


def test_full_disk_while_saving_is_one_line_naming_the_usable_checkpoint(stopped_run, tmp_path):
    out = copy_run(stopped_run, tmp_path)
    run = launch(args(out), log_dir=str(tmp_path), env={"MVPTR_FAULT_INJECT": "enospc=save:4"})
    step4, step2 = out / "checkpoints" / "step4", out / "checkpoints" / "step2"
    line = one_error(run, "the disk is full", "No space left on device", f"cannot write checkpoint {step4}",
                     f"{step2} remains the newest complete checkpoint", "--resume auto")
    assert "unexpected pos" not in run.logs[0]
    assert not step4.exists() and complete_steps(out) == [2], line
    again = launch(args(out), log_dir=str(tmp_path)).ok()
    assert f"resumed from {step2}" in again.logs[0]
    assert sorted(metrics(out)) == [1, 2, 3, 4]


def test_full_disk_on_one_rank_stops_both_without_a_hang(tmp_path):
    out = tmp_path / "r"
    port = free_port()
    run = launch(args(out), world_size=2, log_dir=str(tmp_path), timeout=90,
                 env={"MVPTR_FAULT_INJECT": "enospc=save:4;enospc_rank=1", "LOCAL_SIZE": "2",
                      "MASTER_PORT": str(port)})
    assert run.codes == [2, 2], run.log()
    for log in run.logs:
        errors = [x for x in log.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in log, run.log()
        assert "the disk is full" in errors[0] and "rank 1" in errors[0], errors[0]
        assert f"{out / 'checkpoints' / 'step2'} remains the newest complete checkpoint" in errors[0]
    assert complete_steps(out) == [2] and not (out / "checkpoints" / "step4").exists()
    assert shm_files(port) == []  # an error end leaves no shm buffer either


# ------------------------------------------------------------------------------------------------ 8: config.json

def test_refused_resume_leaves_config_json_as_it_was(stopped_run, tmp_path):
    out = copy_run(stopped_run, tmp_path)
    before = (out / "config.json").read_bytes()
    one_error(launch(args(out, "--data", SMALLER), log_dir=str(tmp_path)), "position must be in [0, 6)")
    assert (out / "config.json").read_bytes() == before
