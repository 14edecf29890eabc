"""The training loop gives the same losses with ``--kernels triton`` (Triton interpreted on the CPU) as with
``--kernels torch``: stage 2, all five objectives, a tiny model, two optimizer steps through the CLI.

Each run is a subprocess with ``TRITON_INTERPRET=1`` (it must be set before triton is first imported). Dropout is
off in both runs: the fused kernels draw their dropout masks from their own counter-based generator, so with
dropout on the two runs would differ by design. Step 2's losses depend on step 1's gradients of every
parameter, so the comparison covers the kernels' backward passes as well as their forward.
"""
import json
from dataclasses import replace

import pytest

from conftest import run_cli
from mvptr_ds import kernels
from mvptr_ds.kernels import reference
from mvptr_ds.model import MVPTRModel
from test_model import TINY as TINY_MODEL, make_batch

TINY = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "text_layers": 1,
        "visual_layers": 1, "cross_layers": 1, "max_position_embeddings": 64,
        "hidden_dropout": 0.0, "attention_dropout": 0.0}  # head_dim 16, the Triton kernel's smallest


def train(tmp_path, kernels):
    out = tmp_path / kernels
    run_cli(["--stage", "2", "--model", str(tmp_path / "model.json"),
             "--data", "synthetic:seed=11,images=16,captions_per_image=2", "--output_dir", str(out),
             "--max_steps", "2", "--micro_batch", "3", "--log_every", "1", "--lr", "1e-3", "--warmup_steps", "1",
             "--seed", "5", "--save_every", "100", "--wandb", "disabled", "--kernels", kernels], timeout=300)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["kernels"] == kernels, config["model"]
    with open(out / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_triton_kernels_give_the_same_losses_as_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the child runs (conftest.clean_env)
    (tmp_path / "model.json").write_text(json.dumps(TINY))
    ref, got = train(tmp_path, "torch"), train(tmp_path, "triton")
    assert sorted(ref) == sorted(got) == [1, 2]
    for step in ref:
        keys = [k for k in ref[step] if k.startswith("loss")] + ["grad_norm"]
        assert {"loss/mcr", "loss/vsc", "loss/itm", "loss/mlm", "loss/wpg"} <= set(keys), keys
        for key in keys:
            want, have = ref[step][key], got[step][key]
            assert have == pytest.approx(want, rel=1e-5, abs=1e-6), (step, key, want, have)


@pytest.mark.parametrize("impl, fused", [("triton", True), ("auto", False), ("torch", False), ("eager", False)])
def test_model_config_kernels_selects_the_path(impl, fused, monkeypatch):
    """``ModelConfig.kernels`` reaches both seams: the Triton modules are asked for exactly when it says so
    (``auto`` on the CPU: never). A stand-in for them records each call and computes the reference."""
    used = []

    class StandIn:
        def __init__(self, name):
            self.name = name

        def attention(self, q, k, v, mask, p):
            used.append(self.name)
            return reference.attention(q, k, v, mask, p)

        def concept_embedding(self, *args):
            used.append(self.name)
            return reference.concept_embedding(*args)

    monkeypatch.setattr(kernels, "_kernel_module", lambda name, device: StandIn(name))
    cfg = replace(TINY_MODEL, kernels=impl)
    MVPTRModel(cfg)(make_batch())
    if fused:
        n_layers = cfg.text_layers + cfg.visual_layers + cfg.cross_layers
        assert used.count("triton_embedding") == 1 and used.count("triton_attention") == n_layers, used  # words + tags: one
    else:
        assert used == [], used
