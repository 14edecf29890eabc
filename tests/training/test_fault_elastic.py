"""Elastic resume and lockstep: a 2-rank ZeRO-2 run continues on 1 and on 3 ranks with the same next samples
and the same losses; uneven data, ranks with nothing to score and objectives switched off never hang.
Every launch runs under a deadline (``test_fault_harness.launch``)."""
import json
import os
import shutil

import pytest

from test_fault_harness import launch, metrics

pytestmark = [pytest.mark.fault, pytest.mark.slow]

DATA = "synthetic:seed=4,images=20,captions_per_image=1"
NO_DROPOUT = {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512, "text_layers": 2,
              "visual_layers": 2, "cross_layers": 2, "max_position_embeddings": 128,
              "hidden_dropout": 0.0, "attention_dropout": 0.0}


def args(out, model, grad_accum, *extra):
    """Micro batch 2 everywhere; ``grad_accum`` x world size = 6 keeps the global batch (12) and its micro batches."""
    return ["--model", model, "--data", DATA, "--output_dir", str(out), "--max_steps", "4", "--save_every", "2",
            "--micro_batch", "2", "--grad_accum", str(grad_accum), "--log_every", "1", "--lr", "1e-3", "--warmup_steps", "1",
            "--seed", "5", "--wandb", "disabled", "--ds_config", "ds_configs/zero2.json"] + list(extra)


def stream(trace_dir, steps):
    """Sample ids in global order: per step and micro batch, rank 0's, then rank 1's, ..."""
    rows = []
    for name in sorted(os.listdir(trace_dir)):
        with open(os.path.join(trace_dir, name)) as f:
            rows += [json.loads(line) for line in f]
    out = []
    for step in steps:
        per_rank = {}
        for r in rows:  # each rank's file is in drawing order
            if r["step"] == step:
                per_rank.setdefault(r["rank"], []).append(r["ids"])
        for micro in range(max(map(len, per_rank.values()))):
            for rank in sorted(per_rank):
                out += per_rank[rank][micro]
    return out


@pytest.fixture(scope="module")
def model_json(tmp_path_factory):
    p = tmp_path_factory.mktemp("model") / "nodrop.json"
    p.write_text(json.dumps(NO_DROPOUT))
    return str(p)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, model_json):
    """A 2-rank ZeRO-2 reference (4 steps, global batch 12) and a copy stopped after step 2."""
    base = tmp_path_factory.mktemp("elastic")
    ref, part = base / "ref", base / "part"
    launch(args(ref, model_json, 3), world_size=2, log_dir=str(base),
           env={"MVPTR_FAULT_INJECT": f"trace={base / 'ref_trace'}"}).ok()
    launch(args(part, model_json, 3, "--stop_after", "2"), world_size=2, log_dir=str(base),
           env={"MVPTR_FAULT_INJECT": f"trace={base / 'part_trace'}"}).ok()
    return base


@pytest.mark.parametrize("world_size,grad_accum", [(1, 6), (3, 2)])
def test_zero2_two_ranks_resume_on_other_world_sizes(tmp_path, two_rank_runs, model_json, world_size, grad_accum):
    base = two_rank_runs
    out = tmp_path / "run"
    shutil.copytree(base / "part", out)
    run = launch(args(out, model_json, grad_accum), world_size=world_size, log_dir=str(tmp_path),
                 env={"MVPTR_FAULT_INJECT": f"trace={tmp_path / 'trace'}"}, timeout=120).ok()
    assert f"elastic resume: checkpoint of 2 ranks (ZeRO stage 2) -> {world_size} ranks" in run.logs[0], run.log()
    assert "at step 2" in run.logs[0]
    # the same next samples: the global stream continues exactly where the 2-rank run stopped
    ref_stream = stream(base / "ref_trace", [1, 2, 3, 4])
    assert stream(base / "part_trace", [1, 2]) == ref_stream[:24]
    assert stream(tmp_path / "trace", [3, 4]) == ref_stream[24:48]
    # and the same training: weights, Adam moments and schedule were re-partitioned, not reset
    ref, got = metrics(base / "ref"), metrics(out)
    assert sorted(got) == [1, 2, 3, 4]
    # step 3 runs on the restored weights: equal to 1e-4. Step 4 also reflects the restored Adam moments;
    # 3 ranks reduce gradients in another order, which Adam's early steps amplify (fresh 3-rank runs differ
    # from 2-rank ones by ~8e-3 at step 2 already), so the 3-rank bound there is looser.
    step4_tol = 1e-4 if world_size == 1 else 2e-2
    for step, tol in ((3, 1e-4), (4, step4_tol)):
        assert abs(ref[step]["loss"] - got[step]["loss"]) < tol, (step, ref[step]["loss"], got[step]["loss"])
        assert ref[step]["lr"] == got[step]["lr"]
    assert (out / "final" / "model.safetensors").exists()


def test_uneven_data_empty_ranks_and_objectives_off_stay_in_lockstep(tmp_path, model_json):
    """13 samples over 2 ranks x micro batch 2 (epochs wrap mid-step); rank 1 has nothing to score for MLM/MCR/WPG;
    ZeRO-3. Then a subset of objectives. Both finish within the deadline."""
    data = "synthetic:seed=4,images=13,captions_per_image=1"
    out = tmp_path / "uneven"
    common = ["--data", data, "--ds_config", "ds_configs/zero3.json"]
    run = launch(args(out, model_json, 1, *common, "--max_steps", "5"), world_size=2, log_dir=str(tmp_path),
                 env={"MVPTR_FAULT_INJECT": f"empty=1;trace={tmp_path / 'trace'}"}, timeout=90).ok()
    m = metrics(out)
    assert sorted(m) == [1, 2, 3, 4, 5] and all(r["skipped_batches"] == 0 for r in m.values()), run.log()
    ids = stream(tmp_path / "trace", [1, 2, 3, 4, 5])
    assert len(ids) == 20 and sorted(ids[:13]) == list(range(13)), ids  # one whole epoch, then the next
    out2 = tmp_path / "subset"
    launch(args(out2, model_json, 1, *common, "--objectives", "mlm,itm", "--max_steps", "2"), world_size=2,
           log_dir=str(tmp_path), env={"MVPTR_FAULT_INJECT": "empty=0"}, timeout=90).ok()
    assert sorted(metrics(out2)) == [1, 2]
