"""End-to-end training through the CLI: one process, the deepspeed launcher with 2 ranks, resume, init_from.

Each run is a real subprocess on the CPU (gloo); losses are compared in fp32 with dropout off.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

DATA = "synthetic:seed=11,images=48,captions_per_image=2"
TINY_NO_DROPOUT = {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512, "text_layers": 2,
                   "visual_layers": 2, "cross_layers": 2, "max_position_embeddings": 128,
                   "hidden_dropout": 0.0, "attention_dropout": 0.0}


@pytest.fixture(scope="module")
def model_json(tmp_path_factory):
    p = tmp_path_factory.mktemp("model") / "tiny_nodrop.json"
    p.write_text(json.dumps(TINY_NO_DROPOUT))
    return str(p)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def common(out, model, *extra):
    return ["--model", model, "--data", DATA, "--output_dir", str(out), "--wandb", "disabled",
            "--log_every", "1", "--lr", "1e-3", "--warmup_steps", "1", "--seed", "5"] + list(extra)


def test_stage1_then_stage2_single_process(tmp_path):
    s1 = tmp_path / "s1"
    run_cli(["--stage", "1", "--model", "tiny", "--data", DATA, "--output_dir", str(s1), "--max_steps", "6",
             "--micro_batch", "4", "--log_every", "1", "--lr", "2e-3", "--wandb", "offline"])
    weights = load_file(str(s1 / "final" / "model.safetensors"))
    assert not any("cross_encoder" in k for k in weights), "stage 1 must not build the cross-modal encoder"
    assert any(k.startswith("heads.mcr.") for k in weights)
    cfg = json.loads((s1 / "final" / "config.json").read_text())
    assert cfg["train"]["stage"] == 1 and cfg["model"]["vocab_size"] > 0
    m = metrics(s1)
    assert sorted(m) == list(range(1, 7)) and all("loss/mcr" in r for r in m.values())
    for key in ("loss", "lr", "samples_per_s", "tokens_per_s", "grad_norm"):
        assert key in m[6]
    assert list((s1 / "wandb").glob("offline-run-*")), "an offline W&B run is written under the run folder"

    s2 = tmp_path / "s2"
    proc = run_cli(["--stage", "2", "--model", "tiny", "--data", DATA, "--output_dir", str(s2), "--max_steps", "2",
                    "--micro_batch", "4", "--init_from", str(s1 / "final"), "--wandb", "disabled"])
    report = json.loads((s2 / "init_report.json").read_text())
    assert any(k.startswith("backbone.cross_encoder.") for k in report["newly_initialised"])
    assert any(k.startswith("heads.itm.") for k in report["newly_initialised"])
    assert "backbone.embeddings.word_embeddings.weight" in report["loaded"]
    assert "newly initialised" in proc.stdout + proc.stderr
    s2_weights = load_file(str(s2 / "final" / "model.safetensors"))
    assert any("cross_encoder" in k for k in s2_weights)


def test_joined_pairs_resume_exactly_across_an_epoch_boundary(tmp_path):
    """--join_pairs in a contrastive stage 1: stopped and resumed, the run sees the same joined pairs (their draw
    is a function of seed, epoch and index) on a world of 10 training pairs, where micro batches of 3 span two
    epochs (that joining changes the batches: tests/data/test_pair_joining.py)."""
    world = "synthetic:seed=11,images=6,held_out=1,captions_per_image=2"
    args = ["--model", "tiny", "--data", world, "--wandb", "disabled", "--log_every", "1", "--lr", "1e-3",
            "--warmup_steps", "1", "--seed", "5", "--stage", "1", "--objectives", "mcr,vsc", "--max_steps", "6",
            "--micro_batch", "3", "--save_every", "2", "--join_pairs", "0.5"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_cli(args + ["--output_dir", str(full)])
    run_cli(args + ["--output_dir", str(part), "--stop_after", "4"])
    run_cli(args + ["--output_dir", str(part), "--resume", "auto"])
    ref, got = metrics(full), metrics(part)
    assert json.loads((part / "config.json").read_text())["data"]["join_pairs"] == 0.5
    assert sorted(got) == list(range(1, 7))
    for step in ref:
        assert ref[step]["loss"] == got[step]["loss"], step
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, model_json):
    """One process, micro batch 2 x accumulation 2: the same global batch as 2 ranks x micro batch 2."""
    out = tmp_path_factory.mktemp("ref")
    run_cli(common(out, model_json, "--stage", "2", "--max_steps", "4", "--micro_batch", "2", "--grad_accum", "2",
                   "--ds_config", "ds_configs/zero2.json"))
    return out


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_two_ranks_match_one_process(tmp_path, model_json, reference_run, zero):
    out = tmp_path / f"z{zero}"
    proc = run_cli(common(out, model_json, "--stage", "2", "--max_steps", "4", "--micro_batch", "2",
                          "--ds_config", f"ds_configs/zero{zero}.json"), launcher_procs=2, timeout=420)
    # the launcher's output (no terminal): one line per record, from rank 0 only; the final message once;
    # DeepSpeed's prints while the ZeRO checkpoint is consolidated for final/ kept out
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == [f"step {k}/4" for k in range(1, 5)], proc.stdout[-3000:]
    assert proc.stdout.count("trained 4 steps; final weights in") == 1, proc.stdout[-3000:]
    assert "Processing zero checkpoint" not in proc.stdout + proc.stderr
    ref, got = metrics(reference_run), metrics(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in ref:
        for key in [k for k in ref[step] if k.startswith("loss")]:
            assert abs(ref[step][key] - got[step][key]) <= 1e-4, (zero, step, key, ref[step][key], got[step][key])
    a = load_file(str(reference_run / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        # Adam turns reduction-order noise in near-zero gradients into updates of size ~lr: allow 1e-4.
        assert torch.allclose(a[k], b[k], atol=1e-4), (k, (a[k] - b[k]).abs().max().item())


def test_stop_and_resume_is_exact(tmp_path):
    """With dropout on: the restored RNG, loader position, optimizer and schedule make the runs bit-identical."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--stage", "2", "--max_steps", "6", "--micro_batch", "3", "--save_every", "2"]
    run_cli(common(full, "tiny", *args))
    run_cli(common(part, "tiny", *args, "--stop_after", "3"))
    assert not (part / "final").exists()
    run_cli(common(part, "tiny", *args, "--resume", "auto"))
    ref, got = metrics(full), metrics(part)
    assert sorted(got) == list(range(1, 7))
    for step in ref:
        assert ref[step]["loss"] == got[step]["loss"], step
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(part / "final" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
