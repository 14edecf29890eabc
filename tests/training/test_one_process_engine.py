"""The one-process training step: ZeRO stage 0 instead of a partition of one, fused AdamW, no pointless
all-reduce, deterministic kernels on CPU. Each change keeps the update's math; these tests say so."""
import json
import os

import pytest
import torch

from mvptr_ds.config import TrainConfig
from mvptr_ds.training import elastic
from mvptr_ds.training.ds_config import build_ds_config, stage_note, zero_stage
from mvptr_ds.training.optim import build_optimizer, decay_groups

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def template(tmp_path, d):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(d))
    return str(p)


@pytest.mark.parametrize("stage,offload,world,precision,expected", [
    (2, False, 1, "fp32", 0), (1, False, 1, "fp32", 0), (2, False, 2, "fp32", 2), (2, True, 1, "fp32", 2),
    (3, False, 1, "fp32", 3), (0, False, 1, "fp32", 0), (2, False, 1, "bf16", 2)])
def test_one_process_runs_stage_0(tmp_path, stage, offload, world, precision, expected):
    zero = {"stage": stage, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
    path = template(tmp_path, {"zero_optimization": zero})
    cfg = build_ds_config(path, TrainConfig(precision=precision), world_size=world, check_device=False)
    assert zero_stage(cfg) == expected
    note = stage_note(path, cfg)
    assert bool(note) == (expected != stage) and (not note or f"ZeRO stage {stage}" in note)


def test_default_template_on_one_process():
    cfg = build_ds_config(os.path.join(REPO, "ds_configs", "zero2.json"), TrainConfig(), 1, check_device=False)
    assert zero_stage(cfg) == 0


@pytest.mark.parametrize("saved,now,expected", [(0, 2, 0), (2, 0, 2), (2, 3, 3), (1, 2, 2), (None, 0, 0), (0, 0, 0)])
def test_resume_keeps_the_checkpoint_stage_across_stage_0(saved, now, expected):
    assert elastic.resume_stage({"zero_stage": saved} if saved is not None else {}, now) == expected


def test_stage_0_checkpoint_cannot_continue_at_zero3_or_with_offload():
    from mvptr_ds.config import ConfigError

    for now, offload in ((3, False), (2, True)):
        with pytest.raises(ConfigError, match="written at ZeRO stage 0"):
            elastic.resume_stage({"zero_stage": 0}, now, offload)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


def test_fused_adamw_matches_the_reference_update():
    """The fused kernel computes torch's AdamW (decoupled decay, bias correction) with the release's groups:
    after 20 steps every parameter agrees with the per-op implementation to fp32 rounding."""
    train = TrainConfig(lr=1e-2, weight_decay=0.01)
    a, b = _params(), _params()
    fused = build_optimizer(a, train, offload=False)
    assert fused.defaults["fused"]
    reference = torch.optim.AdamW(decay_groups(b, train.weight_decay), lr=train.lr, betas=train.adam_betas,
                                  eps=train.adam_eps, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(4, 16, generator=g)
        for m, opt in ((a, fused), (b, reference)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(p, _params().state_dict()[name])  # it moved


def test_engine_skips_the_all_reduce_on_one_process_and_trains_the_same(tmp_path):
    """One process at stage 0: DeepSpeed's bucketed all-reduce (flatten + copy back) is off; the weights after
    3 steps equal those with it on (dividing by a world size of 1 changes nothing)."""
    from mvptr_ds.training import distributed
    from mvptr_ds.training.trainer import build_engine

    info = distributed.setup()
    train = TrainConfig(lr=1e-2, max_steps=3, warmup_steps=0, micro_batch=4)
    ds_cfg = build_ds_config(os.path.join(REPO, "ds_configs", "zero2.json"), train, 1, check_device=False)
    results = []
    for allreduce in (False, True):
        module = _params()
        engine, _ = build_engine(module, train, dict(ds_cfg), info.device)
        assert engine.enable_backward_allreduce is False
        engine.enable_backward_allreduce = allreduce
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            loss = engine(torch.randn(4, 16, generator=g)).square().mean()
            engine.backward(loss)
            engine.step()
        results.append({k: v.clone() for k, v in module.state_dict().items()})
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_cpu_step_is_deterministic_at_the_default_thread_count():
    """Two backward passes of the same tiny stage-2 batch give identical gradients with ``set_determinism`` on
    (torch's default thread count: without it, index_put's accumulation order varies with the threads)."""
    import dataclasses

    from mvptr_ds import assembly
    from mvptr_ds.config import RunConfig, model_config_from
    from mvptr_ds.data.batching import ResumableLoader
    from mvptr_ds.data.pipeline import build_data
    from mvptr_ds.objectives import build_pretraining_module
    from mvptr_ds.training.trainer import set_determinism

    assert set_determinism(TrainConfig(), torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled()
    try:
        cfg = RunConfig()
        cfg = dataclasses.replace(cfg, model=model_config_from("tiny"),
                                  data=dataclasses.replace(cfg.data, source="synthetic:seed=3"))
        data = build_data(cfg.data, cfg.objective_names)
        cfg = dataclasses.replace(cfg, model=assembly.resolve_model_config(cfg.model, data.vocab)).validate()
        torch.manual_seed(0)
        module = build_pretraining_module(cfg.model, cfg.objective_names, cfg.objectives)
        batch = next(iter(ResumableLoader(data.train, data.collator, micro_batch=16, rank=0, world_size=1, seed=0)))
        grads = []
        for _ in range(4):
            module.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            module(batch).loss.backward()
            grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
        for other in grads[1:]:
            assert [n for n in grads[0] if not torch.equal(grads[0][n], other[n])] == []
    finally:
        torch.use_deterministic_algorithms(False)


def test_guarded_clipping_equals_deepspeeds(tmp_path):
    """Stage 0 fp32: our guarded step clips with one multi-tensor norm; the weights after 3 clipped steps equal
    those of DeepSpeed's own clipping (a plain fused AdamW, ``gradient_clipping`` in the config), and the
    engine reports the pre-clip norm."""
    import deepspeed

    from mvptr_ds.training import distributed
    from mvptr_ds.training.optim import linear_schedule
    from mvptr_ds.training.trainer import build_engine

    info = distributed.setup()
    train = TrainConfig(lr=1e-2, max_steps=3, warmup_steps=0, micro_batch=4, grad_clip=0.05)
    ds_cfg = build_ds_config(os.path.join(REPO, "ds_configs", "zero2.json"), train, 1, check_device=False)
    ours, theirs = _params(), _params()
    engine, _ = build_engine(ours, train, dict(ds_cfg), info.device)
    opt = build_optimizer(theirs, train, offload=False)
    ref, _, _, _ = deepspeed.initialize(model=theirs, optimizer=opt, config=dict(ds_cfg),
                                        lr_scheduler=linear_schedule(opt, 0, 3))
    ref.enable_backward_allreduce = False
    norms = []
    for e in (engine, ref):
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            e.backward(e(torch.randn(4, 16, generator=g)).square().mean())
            e.step()
        norms.append(e.get_global_grad_norm())
    assert norms[0] is not None and norms[0] > train.grad_clip  # clipping was active
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch):
    from mvptr_ds.training.ds_config import precision_warning

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision_warning("bf16", "cpu").startswith("warning: --precision bf16 on a CPU without bf16")
    assert precision_warning("fp32", "cpu") == "" and precision_warning("bf16", "cuda") == ""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert precision_warning("bf16", "cpu") == ""


@pytest.mark.slow
def test_zero3_trains_stage_2(tmp_path):
    """ZeRO-3 gathers a module's parameters around that module's own calls: a forward that used a parameter
    outside its module (the one-lookup embedding once did) fails in backward. Two steps through the CLI."""
    from conftest import run_cli

    out = tmp_path / "run"
    run_cli(["--stage", "2", "--model", "tiny", "--max_steps", "2", "--micro_batch", "4", "--ds_config", "zero3",
             "--output_dir", str(out), "--resume", "none", "--wandb", "disabled"], timeout=600)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
