"""The benchmark suite: FLOP count vs DeepSpeed's profiler, the authors-style baseline computes the same
losses, and throughput.py / memory.py / report.py end to end at tiny sizes (no timing assertions)."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env, free_port, run_cli

sys.path.insert(0, str(REPO / "benchmarks"))

from authors_baseline import AuthorsStyleModule, pad_fixed  # noqa: E402
from flop_count import FlopCounter  # noqa: E402
from realistic import RealisticLengths  # noqa: E402

from mvptr_ds.config import MODEL_PRESETS, OBJECTIVES, DataConfig, ObjectiveConfig  # noqa: E402
from mvptr_ds.data.batching import BatchContext  # noqa: E402
from mvptr_ds.data.pipeline import build_data  # noqa: E402
from mvptr_ds.objectives import build_pretraining_module  # noqa: E402
from mvptr_ds.pipeline import resolve_model_config  # noqa: E402


@pytest.fixture(scope="module")
def setting():
    data = build_data(DataConfig(source="synthetic:images=16,held_out=0,regions=5-30"), OBJECTIVES)
    cfg = resolve_model_config(MODEL_PRESETS["tiny"], data.vocab)
    dataset = RealisticLengths(data.train, seed=1)
    batch = data.collator([dataset[i] for i in range(8)], BatchContext(seed=3))
    return cfg, batch


def module_for(cfg, kernels):
    torch.manual_seed(0)
    return build_pretraining_module(dataclasses.replace(cfg, kernels=kernels), OBJECTIVES, ObjectiveConfig()).eval()


@pytest.mark.parametrize("kernels", ["torch", "eager"])
def test_flop_count_matches_deepspeed_profiler(setting, kernels):
    from deepspeed.profiling.flops_profiler import FlopsProfiler

    cfg, batch = setting
    module = module_for(cfg, kernels)
    counter = FlopCounter(module.backbone.cfg).attach(module)
    prof = FlopsProfiler(module)
    prof.start_profile()
    with torch.no_grad():
        module(batch)
    profiled = prof.get_total_flops()
    prof.end_profile()
    counted = counter.count(batch)
    # The profiler also counts LayerNorm, GELU and softmax element-wise work, which the analytic count leaves out.
    assert counted.executed_forward == pytest.approx(profiled, rel=0.05)
    assert counted.forward <= counted.executed_forward  # padding only ever adds work
    assert counted.train == pytest.approx(3 * counted.forward, rel=0.05)
    assert counter.calls == []
    assert {"text_encoder", "visual_encoder", "cross_encoder", "wpg", "mlm_head"} <= set(counted.parts)


def test_required_flops_do_not_depend_on_padding(setting):
    cfg, batch = setting
    counts = []
    for kernels, b in (("torch", batch), ("eager", pad_fixed(batch, 40, 20, 50))):
        module = module_for(cfg, kernels)
        counter = FlopCounter(module.backbone.cfg).attach(module)
        with torch.no_grad():
            module(b)
        counts.append(counter.count(b))
    assert counts[0].forward == pytest.approx(counts[1].forward, rel=1e-9)
    assert counts[1].executed_forward > 1.5 * counts[0].executed_forward


def test_authors_style_path_computes_the_same_losses(setting):
    cfg, batch = setting
    ours = module_for(cfg, "torch")
    theirs = AuthorsStyleModule.wrap(module_for(cfg, "eager"))
    theirs.load_state_dict(ours.state_dict())
    padded = pad_fixed(batch, 40, 20, 50)
    assert padded.text_ids.shape[1] == 40 and padded.region_feats.shape[1] == 50
    with torch.no_grad():
        a, b = ours(batch), theirs(padded)
    for name in OBJECTIVES:
        assert float(b.losses[name]) == pytest.approx(float(a.losses[name]), rel=1e-4, abs=1e-6), name
    assert float(b.metrics["wpg/pairs"]) == float(a.metrics["wpg/pairs"]) > 0


def test_realistic_lengths_fall_in_their_ranges(setting):
    data = build_data(DataConfig(source="synthetic:images=16,held_out=0"), OBJECTIVES)
    ds = RealisticLengths(data.train, seed=0)
    for i in range(len(ds)):
        ex = ds[i]
        assert 10 <= len(ex.caption_ids) <= 25 and len(ex.concept_ids) <= 5 and 3 <= len(ex.tag_ids) <= 18
        assert all(w < len(ex.caption_ids) for link in ex.concept_word_links for w in link)
    assert ds[3].caption_ids == ds[3].caption_ids  # seeded per sample id


def test_benchmark_end_to_end_and_report(tmp_path):
    out = tmp_path / "bench"
    proc = run_cli(["bench", "--device", "cpu", "--model", "tiny", "--steps", "2", "--warmup", "0",
                    "--micro_batch", "4", "--measure_peak", "--out", str(out)], timeout=300)
    for word in ("samples/s", "tokens/s", "TFLOP/s", "speed-up", "peak memory"):
        assert word in proc.stdout, proc.stdout
    (path,) = out.glob("throughput_*.json")
    result = json.loads(path.read_text())
    for key in ("samples_per_s", "tokens_per_s", "tflops", "speedup_vs_authors", "peak_memory_bytes", "mfu",
                "mfu_measured_peak", "breakdown_s", "baseline", "command", "torch", "deepspeed", "date"):
        assert key in result, key
    assert result["samples_per_s"] > 0 and result["tflops"] > 0 and result["mfu_measured_peak"] > 0
    assert result["baseline"]["kernels"] == "eager" and result["speedup_vs_authors"] > 0
    # Same data and weights; only the ITM negatives (mined from slightly different weights after the first
    # update: eager vs fused attention, dropout masks) can differ, and with them the cross-encoder lengths.
    assert result["flops_per_sample"] == pytest.approx(result["baseline"]["flops_per_sample"], rel=0.05)
    assert set(result["breakdown_s"]) == {"data_wait", "forward", "backward", "optimizer"}
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    report = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), "--results", str(out),
                             "--out", str(tmp_path / "md"), "--title", "test"], env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "md" / "throughput.md").read_text()
    assert result["name"] in text and "Measured with" in text
    assert (tmp_path / "md" / "throughput_vs_micro_batch.png").stat().st_size > 1000


def test_memory_one_rank_matches_zero_theory(tmp_path):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           str(REPO / "benchmarks" / "memory.py"), "--zero", "2", "--model", "tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "memory_z2_w1.json").read_text())
    (rank,) = result["per_rank"]
    theory = result["theory"]
    for key in ("param_bytes", "optimizer_state_bytes", "master_bytes"):
        assert rank[key] == pytest.approx(theory[key], rel=0.01), key
    assert rank["grad_bytes"] >= 0.99 * theory["grad_bytes"]
    assert rank["rss_peak_bytes"] > rank["param_bytes"]
