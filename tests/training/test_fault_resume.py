"""Kill -9 anywhere (between steps, during saves), resume, and end bit-identical to an uninterrupted run.

Ranks are forked from a pre-imported server (``test_fault_harness``) so each run costs 1-3 s, at torch's default
thread count. CPU fp32 with dropout on: restored RNG states, loader position, optimizer and schedule, and
deterministic kernels (``train.deterministic``, on by default on CPU) make the runs bit-identical.
"""
import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from test_fault_harness import launch, metrics

pytestmark = [pytest.mark.fault, pytest.mark.slow]

DATA = "synthetic:seed=3,images=24,captions_per_image=1"
STEPS = 6


def args(out, *extra):
    return ["--model", "tiny", "--data", DATA, "--output_dir", str(out), "--max_steps", str(STEPS),
            "--micro_batch", "2", "--save_every", "2", "--keep_last", "2", "--log_every", "1", "--lr", "1e-3",
            "--warmup_steps", "1", "--seed", "5", "--wandb", "disabled"] + list(extra)


def kill_points(seed: int):
    """A kill point drawn with ``seed``: after a random step, or before / in the middle of / after the
    files of a random save (the kinds take turns so that ten seeds cover all four)."""
    rng = random.Random(seed)
    kind = ("step", "before", "mid", "after")[seed % 4]
    if kind == "step":
        return f"step:{rng.randrange(1, STEPS)}"
    return f"save:{rng.choice([2, 4, 6])}:{kind}"


def distinct_seeds(n: int, point):
    """The seeds of ``range(n)`` whose kill point ``point(seed)`` no earlier seed drew: a repeated point
    re-tests nothing (seeds 4 and 8 both draw step:2 for one rank)."""
    seen, seeds = set(), []
    for seed in range(n):
        if point(seed) not in seen:
            seen.add(point(seed))
            seeds.append(seed)
    return seeds


def weights(run_dir):
    return load_file(os.path.join(str(run_dir), "final", "model.safetensors"))


def assert_identical(ref_dir, got_dir):
    a, b = weights(ref_dir), weights(got_dir)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    ref, got = metrics(ref_dir), metrics(got_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert ref[step]["loss"] == got[step]["loss"], step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    launch(args(out), log_dir=str(out)).ok()
    return out


@pytest.mark.parametrize("seed", distinct_seeds(10, kill_points))
def test_kill_and_resume_is_bit_exact(tmp_path, reference, seed):
    point = kill_points(seed)
    out = tmp_path / "run"
    killed = launch(args(out), env={"MVPTR_FAULT_INJECT": f"kill={point}"}, log_dir=str(tmp_path))
    assert killed.codes == [-signal.SIGKILL], (point, killed.log())
    assert not (out / "final").exists()
    resumed = launch(args(out), log_dir=str(tmp_path)).ok()
    kind, k = point.split(":")[:2]
    saved_before = [s for s in (2, 4, 6) if s < int(k)]  # complete checkpoints the killed run left
    expected = f"resumed from {out / 'checkpoints' / f'step{saved_before[-1]}'}" if saved_before else None
    assert (expected in resumed.logs[0]) if expected else ("resumed from" not in resumed.logs[0]), (point, resumed.log())
    assert_identical(reference, out)
    # keep_last=2: only the newest two complete checkpoints remain, no leftovers of the killed save
    names = sorted(n for n in os.listdir(out / "checkpoints") if n.startswith("step") or n.startswith(".removing"))
    assert names == ["step4", "step6"], names


@pytest.fixture(scope="module")
def reference_two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference2")
    launch(args(out), world_size=2, log_dir=str(out)).ok()
    return out


@pytest.mark.parametrize("seed", distinct_seeds(10, lambda seed: (kill_points(seed + 100), seed % 2)))
def test_two_ranks_kill_and_resume_is_bit_exact(tmp_path, reference_two_ranks, seed):
    """SIGKILL of one rank (alternating) at a random point, then --resume auto on 2 ranks: same final weights."""
    point = kill_points(seed + 100)
    out = tmp_path / "run"
    killed = launch(args(out), world_size=2, timeout=60, log_dir=str(tmp_path),
                    env={"MVPTR_FAULT_INJECT": f"kill={point};kill_rank={seed % 2}"})
    assert killed.codes[seed % 2] == -signal.SIGKILL, (point, killed.log())
    assert not (out / "final").exists()
    launch(args(out), world_size=2, log_dir=str(tmp_path)).ok()
    assert_identical(reference_two_ranks, out)


def test_two_ranks_killed_during_save_resume_exactly(tmp_path, reference_two_ranks):
    """Rank 1 dies while writing its optimizer shard; rank 0 fails (no hang); the resume matches a clean run
    (the module's 2-rank reference: the same arguments, run once)."""
    out = tmp_path / "run2"
    killed = launch(args(out), world_size=2, log_dir=str(tmp_path), timeout=60,
                    env={"MVPTR_FAULT_INJECT": "kill=save:4:mid;kill_rank=1"})
    assert killed.codes[1] == -signal.SIGKILL and killed.codes[0] != 0, killed.log()
    assert not (out / "checkpoints" / "step4" / "COMPLETE").exists()
    launch(args(out), world_size=2, log_dir=str(tmp_path)).ok()
    assert_identical(reference_two_ranks, out)


def test_sigterm_on_one_rank_stops_all_with_a_checkpoint(tmp_path):
    """SIGTERM to rank 1 only: both ranks agree at the next step boundary, save, and exit 0."""
    out = tmp_path / "sig"

    def term_after_two_steps(procs):
        deadline = time.time() + 60
        path = out / "metrics.jsonl"
        while time.time() < deadline and not (path.exists() and len(path.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGTERM)

    run = launch(args(out, "--max_steps", "10000", "--save_every", "10000"), world_size=2, log_dir=str(tmp_path),
                 on_start=term_after_two_steps)
    assert run.codes == [0, 0], run.log()
    assert "received a stop signal on another rank" in run.logs[0] or "received SIGTERM" in run.logs[0], run.log()
    done = sorted(int(n[4:]) for n in os.listdir(out / "checkpoints")
                  if n.startswith("step") and (out / "checkpoints" / n / "COMPLETE").exists())
    assert len(done) == 1 and done[0] >= 2
    assert "resume with --resume auto" in run.logs[0]
    # and it continues from there
    cont = launch(args(out, "--max_steps", str(done[0] + 1)), world_size=2, log_dir=str(tmp_path)).ok()
    assert f"at step {done[0]}" in cont.logs[0]
    assert sorted(metrics(out)) == list(range(1, done[0] + 2))


def test_sigint_single_process(tmp_path):
    out = tmp_path / "int"

    def interrupt(procs):
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.05)
        os.kill(procs[0].pid, signal.SIGINT)

    run = launch(args(out, "--max_steps", "10000"), log_dir=str(tmp_path), on_start=interrupt)
    assert run.codes == [0], run.log()
    assert "received SIGINT" in run.logs[0] and "stopped by SIGINT" in run.logs[0]


def test_metrics_have_no_duplicate_steps_after_resume(tmp_path):
    """Records written after the resumed checkpoint (steps 3, 4 of a killed run) are replaced, not repeated."""
    out = tmp_path / "m"
    killed = launch(args(out), env={"MVPTR_FAULT_INJECT": "kill=step:5"}, log_dir=str(tmp_path))
    assert killed.codes == [-signal.SIGKILL]
    assert sorted(metrics(out)) == [1, 2, 3, 4, 5]
    launch(args(out), log_dir=str(tmp_path)).ok()
    assert sorted(metrics(out)) == list(range(1, STEPS + 1))  # metrics() raises on a duplicate step


def test_secrets_never_written(tmp_path):
    """A W&B API key in the environment appears in no file of the run (offline W&B on)."""
    out = tmp_path / "s"
    secret = "wandbkey0123456789abcdef0123456789abcdef"
    run = launch(args(out, "--max_steps", "2", "--wandb", "offline"), log_dir=str(tmp_path),
                 env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline", "MY_TOKEN": "tok-" + secret})
    run.ok()
    assert secret not in run.logs[0]
    for root, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert secret.encode() not in f.read(), os.path.join(root, name)
