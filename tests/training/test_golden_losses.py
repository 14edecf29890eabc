"""Golden losses: the exact per-step losses of a few steps of stage 1, stage 2 and fine-tuning (VQA).

Tiny model, the built-in synthetic world, fixed seeds, one process, one thread (``conftest.clean_env``),
deterministic kernels: the same code on the same CPU gives the same numbers to the last bit. Another CPU's
vectorised kernels sum in another order: the values recorded on an Intel Xeon host came out up to 1.3e-6 apart
(relative) on an AMD EPYC one (2026-12-01, the same code), so the check allows 1e-5 relative; a change to what
is trained (data order, corruption, a loss) moves them by far more. This guards refactors of the loop
(``training/``, ``assembly``): they must not change what is trained. The expected values are the one data
block ``tests/training/golden_losses.json``.

A change that is MEANT to change the losses (data corruption, model or objective fidelity) re-records them, and
says so in its commit message:

    DS_ACCELERATOR=cpu python3 tests/training/test_golden_losses.py --record

The runs take about 20 s together (one subprocess; three trainings in it).
"""
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/conftest.py, also when this file runs as a script (--collect, --record)
from conftest import REPO, clean_env, prebuild_deepspeed_ops  # noqa: E402

pytestmark = pytest.mark.slow

GOLDEN = HERE / "golden_losses.json"
RELATIVE, ABSOLUTE = 1e-5, 1e-6  # on each logged fp32 loss: CPUs of other vendors round differently (docstring)
WORLD = "synthetic:seed=11,images=24,held_out=6,captions_per_image=2"
COMMON = ["--model", "tiny", "--data", WORLD, "--wandb", "disabled", "--log_every", "1", "--seed", "5",
          "--lr", "1e-3", "--warmup_steps", "1", "--resume", "none", "--micro_batch", "4"]
RUNS = {
    "stage1": ["--stage", "1", "--max_steps", "3"],
    "stage2": ["--stage", "2", "--max_steps", "3", "--grad_accum", "2"],
    "finetune_vqa": ["finetune", "--task", "vqa", "--max_steps", "2", "--eval_batch_size", "16"],
}


def _argv(name: str, out: str):
    extra = RUNS[name]
    head, rest = (extra[:1], extra[1:]) if extra[0] == "finetune" else ([], extra)
    return head + COMMON + rest + ["--output_dir", os.path.join(out, name)]


def collect(out: str) -> dict:
    """Run every entry of RUNS in this process; ``{run: {step: {loss name: value}}}``."""
    from mvptr_ds.run import main

    losses = {}
    for name in RUNS:
        code = main(_argv(name, out))
        if code:
            raise SystemExit(f"{name}: exit {code}")
        with open(os.path.join(out, name, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        losses[name] = {str(r["step"]): {k: v for k, v in sorted(r.items()) if k.startswith("loss")}
                        for r in records}
    return losses


def run_collect() -> dict:
    """:func:`collect` in a fresh subprocess (the process group and determinism settings stay out of pytest)."""
    prebuild_deepspeed_ops()
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--collect", out], cwd=REPO,
                              env=clean_env(), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"golden runs failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-5000:]}")
        return json.loads(Path(out, "losses.json").read_text())


def test_losses_match_the_recorded_ones():
    expected = json.loads(GOLDEN.read_text())
    got = run_collect()
    assert sorted(got) == sorted(expected)
    for run, steps in expected.items():
        assert sorted(got[run]) == sorted(steps), run
        for step, values in steps.items():
            assert sorted(got[run][step]) == sorted(values), (run, step)
            for key, want in values.items():
                have = got[run][step][key]
                assert math.isfinite(have) and math.isclose(have, want, rel_tol=RELATIVE, abs_tol=ABSOLUTE), (
                    f"{run} step {step} {key}: {have!r} != recorded {want!r}; if this change is meant to change "
                    f"the losses, re-record (see this file's docstring)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--collect"]:
        result = collect(sys.argv[2])
        Path(sys.argv[2], "losses.json").write_text(json.dumps(result))
    elif sys.argv[1:] == ["--record"]:
        GOLDEN.write_text(json.dumps(run_collect(), indent=1, sort_keys=True) + "\n")
        print(f"recorded {GOLDEN}")
    else:
        raise SystemExit("usage: test_golden_losses.py --record")
