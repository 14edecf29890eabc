"""What a run reports, end to end: one W&B run across a stop and ``--resume auto``; one console line per
record without a terminal; DeepSpeed's own features (wall-clock breakdown, flops profiler, CSV monitor) working
beside the project's logging. Unit tests of the log window and the console line."""
import json

import pytest
import torch

from conftest import run_cli
from wandb_offline import offline_runs

from mvptr_ds.training.logging import LogWindow, duration, progress_line

DATA = "synthetic:seed=11,images=24,captions_per_image=2"


def test_window_record_averages_its_steps():
    window = LogWindow()
    for loss in (1.0, 2.0, 6.0):
        window.count(4, 40)
        window.add_step({"loss": torch.tensor(loss), "loss/mcr": torch.tensor(loss / 2)})
    record = window.record(torch.device("cpu"), world_size=1, step=3)
    assert record["loss"] == pytest.approx(3.0) and record["loss/mcr"] == pytest.approx(1.5)
    assert record["step"] == 3 and record["samples_per_s"] > 0 and record["tokens_per_s"] == pytest.approx(
        10 * record["samples_per_s"])
    assert window.steps == 0 and window.sums == {} and window.samples == 0  # a new window


def test_progress_line():
    record = {"step": 20, "loss": 4.12345, "loss/mcr": 2.0, "loss/mlm": 2.12345, "lr": 1e-4, "samples_per_s": 123.45}
    assert progress_line(record, 600, 200.0) == (
        "step 20/600 | loss 4.1235 (mcr 2.0000, mlm 2.1235) | lr 1.00e-04 | 123.5 samples/s | ETA 3m20s")
    assert [duration(s) for s in (42, 200, 10920)] == ["42s", "3m20s", "3h02m"]


@pytest.mark.slow
def test_stop_and_resume_continue_one_wandb_run_beside_deepspeed_monitors(tmp_path):
    """Stop after step 2, continue with --resume auto: one W&B run id (both offline sessions, as ``wandb sync``
    joins them), steps 1-4 each logged once and equal to metrics.jsonl; the template's wall-clock breakdown,
    flops profiler and CSV monitor work (they used to fail in backward: "timer is not started")."""
    out = tmp_path / "run"
    template = tmp_path / "features.json"
    template.write_text(json.dumps({
        "zero_optimization": {"stage": 2}, "wall_clock_breakdown": True, "csv_monitor": {"enabled": True},
        "flops_profiler": {"enabled": True, "profile_step": 1, "output_file": str(tmp_path / "flops.txt")}}))
    args = ["--stage", "2", "--max_steps", "4", "--micro_batch", "4", "--data", DATA, "--output_dir", str(out),
            "--log_every", "1", "--ds_config", str(template), "--wandb", "offline", "--wandb_project", "p1",
            "--wandb_group", "g1", "--run_name", "n1"]
    first = run_cli(args + ["--stop_after", "2"])
    second = run_cli(args + ["--resume", "auto"])

    sessions = offline_runs(str(out))
    assert len(sessions) == 2 and len({s["id"] for s in sessions}) == 1, sessions
    assert sessions[0]["id"] == (out / "wandb" / "run_id").read_text().strip()
    assert {(s["project"], s["group"], s["name"]) for s in sessions} == {("p1", "g1", "n1")}
    assert [sorted(s["history"]) for s in sessions] == [[1, 2], [3, 4]]
    metrics = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(metrics) == [1, 2, 3, 4]
    for s in sessions:
        for step, logged in s["history"].items():
            assert logged["loss"] == pytest.approx(metrics[step]["loss"], rel=1e-7)

    # no terminal: one line per record, on rank 0, with the losses, lr, throughput and time left
    for proc, steps in ((first, (1, 2)), (second, (3, 4))):
        lines = [l for l in proc.stdout.splitlines() if l.startswith("step ")]
        assert [l.split(" | ")[0] for l in lines] == [f"step {k}/4" for k in steps], proc.stdout[-3000:]
        assert all("loss " in l and "mlm " in l and "lr " in l and "samples/s" in l and "ETA " in l for l in lines)
    assert second.stdout.count("trained 4 steps; final weights in") == 1

    assert (tmp_path / "flops.txt").stat().st_size > 0
    assert list((out / "monitor").glob("*/*.csv")), "csv_monitor writes under <output_dir>/monitor"
    assert "fwd_microstep" in first.stdout + first.stderr  # the wall-clock breakdown ran
