"""Corrupted checkpoints give one ``error:`` line naming the file and the problem (exit 2); NaN batches and
NaN gradients are skipped on every rank without touching the weights, and a streak stops the run cleanly.
"""
import json
import os

import pytest
import torch

from mvptr_ds.training.safe_load import manifest_entry
from test_fault_harness import copy_run, launch, metrics, one_error, small_run_args, stopped_after_two

pytestmark = [pytest.mark.fault, pytest.mark.slow]

args = small_run_args


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after step 2 with one complete checkpoint (copied by each test)."""
    return stopped_after_two(tmp_path_factory.mktemp("stopped") / "run")


def test_truncated_shard(stopped_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    shard = run_dir / "checkpoints" / "step2" / "mp_rank_00_model_states.pt"  # one process: stage 0, all in one
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    one_error(launch(args(run_dir), log_dir=str(tmp_path)), str(shard), "truncated")


@pytest.mark.parametrize("marker,says", [("2\n", "not a JSON object"), ('{"step": 2}', "no file manifest")])
def test_marker_without_a_manifest_is_refused(stopped_run, tmp_path, marker, says):
    """A marker that cannot vouch for the files (not JSON, or no size + SHA-256 per file) is refused, naming it:
    a stripped marker must not downgrade the check."""
    run_dir = copy_run(stopped_run, tmp_path)
    step = run_dir / "checkpoints" / "step2"
    (step / "COMPLETE").write_text(marker)
    one_error(launch(args(run_dir), log_dir=str(tmp_path)), str(step / "COMPLETE"), says)


def test_missing_latest_is_not_needed(stopped_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    os.remove(run_dir / "checkpoints" / "latest")
    run = launch(args(run_dir), log_dir=str(tmp_path)).ok()
    assert "at step 2" in run.logs[0]


def test_missing_latest_and_no_complete_checkpoint(stopped_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    root = run_dir / "checkpoints"
    os.remove(root / "latest")
    os.remove(root / "step2" / "COMPLETE")
    one_error(launch(args(tmp_path / "other", "--resume", str(root)), log_dir=str(tmp_path)),
              str(root / "latest"), "missing")
    one_error(launch(args(tmp_path / "other", "--resume", str(root / "step2")), log_dir=str(tmp_path)),
              str(root / "step2" / "COMPLETE"), "incomplete")


def test_wrong_model_config(stopped_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    model = tmp_path / "small.json"
    model.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
                                 "text_layers": 2, "visual_layers": 2, "cross_layers": 2,
                                 "max_position_embeddings": 128}))
    line = one_error(launch(args(run_dir, "--model", str(model)), log_dir=str(tmp_path)),
                     str(run_dir / "checkpoints" / "step2" / "config.json"), "model.hidden_size=128")
    assert "64" in line


def test_corrupt_config_json(stopped_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    cfg = run_dir / "checkpoints" / "step2" / "config.json"
    cfg.write_text("{not json")
    one_error(launch(args(run_dir), log_dir=str(tmp_path)), str(cfg), "truncated or modified")
    marker = run_dir / "checkpoints" / "step2" / "COMPLETE"  # edited by hand, manifest updated too
    meta = json.loads(marker.read_text())
    meta["files"]["config.json"] = manifest_entry(str(cfg))
    marker.write_text(json.dumps(meta))
    one_error(launch(args(run_dir), log_dir=str(tmp_path)), str(cfg), "not valid JSON")


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickled_code_is_refused(stopped_run, tmp_path):
    """A model-states file replaced by one that runs a command when unpickled (manifest updated to match)."""
    run_dir = copy_run(stopped_run, tmp_path)
    step = run_dir / "checkpoints" / "step2"
    model = step / "mp_rank_00_model_states.pt"
    marker = tmp_path / "pwned"
    state = torch.load(model, weights_only=False)
    state["train_state"]["evil"] = _Exploit(str(marker))
    torch.save(state, model, _use_new_zipfile_serialization=False)
    meta = json.loads((step / "COMPLETE").read_text())
    meta["files"]["mp_rank_00_model_states.pt"] = manifest_entry(str(model))
    (step / "COMPLETE").write_text(json.dumps(meta))
    one_error(launch(args(run_dir), log_dir=str(tmp_path)), str(model), "refusing to load", "posix.system")
    assert not marker.exists(), "the pickled command ran"


def test_nan_loss_on_one_rank_skips_on_all(tmp_path):
    """Rank 1's micro batch of step 3 has NaN features: both ranks skip that micro batch and continue."""
    out = tmp_path / "nan"
    run = launch(args(out, "--max_steps", "4"), world_size=2, log_dir=str(tmp_path),
                 env={"MVPTR_FAULT_INJECT": "nan_loss=3;nan_rank=1"}).ok()
    skip = [line for line in run.logs[0].splitlines() if "non-finite loss" in line]
    assert len(skip) == 1 and skip[0].startswith("step 3:") and "samples by rank [[" in skip[0], run.log()
    m = metrics(out)
    assert sorted(m) == [1, 2, 3, 4] and m[4]["skipped_batches"] == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m.values())


def _module_weights(step_dir):
    """fp32 weights of a checkpoint (ZeRO-3 keeps them partitioned in the optimizer shards)."""
    if not os.path.exists(os.path.join(step_dir, "mp_rank_00_model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        root, tag = os.path.split(str(step_dir))
        return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    from mvptr_ds.training.safe_load import safe_torch_load
    return safe_torch_load(os.path.join(step_dir, "mp_rank_00_model_states.pt"))["module"]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_nan_gradient_never_changes_weights(tmp_path, stage):
    """NaN gradients at two tries of step 2 (finite loss): skipped before the optimizer applies them; after
    --max_bad_steps 2 the run stops (exit 2, one line) with a checkpoint whose weights equal step 1's."""
    ds = tmp_path / f"zero{stage}.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    clean, bad = tmp_path / "clean", tmp_path / "bad"
    common = ["--ds_config", str(ds), "--save_every", "100", "--max_bad_steps", "2"]
    world = 2 if stage == 2 else 1  # one process runs a ZeRO-2 template at stage 0: two ranks keep ZeRO-2's guard
    launch(args(clean, *common, "--stop_after", "1"), world_size=world, log_dir=str(tmp_path)).ok()
    run = launch(args(bad, *common), world_size=world, log_dir=str(tmp_path),
                 env={"MVPTR_FAULT_INJECT": "nan_grad=2*2"})
    one_error(run, "2 consecutive steps had a non-finite gradient", str(bad / "checkpoints" / "step1"))
    grad_lines = [line for line in run.logs[0].splitlines() if "non-finite gradient; optimizer step skipped" in line]
    assert len(grad_lines) == 2 and "samples by rank [[" in grad_lines[0], run.log()
    a, b = _module_weights(clean / "checkpoints" / "step1"), _module_weights(bad / "checkpoints" / "step1")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
