"""Pieces of a step, each against the authors' way, in one run: WPG, padding-aware encoders, the data loader.

    python benchmarks/components.py                      # base model, micro batch 16 (CPU: a few minutes)
    python benchmarks/components.py --model tiny --micro_batch 8 --reps 2 --out c.json   # quick

1. WPG: ``objectives.wpg.wpg_loss`` (batched, no host sync) vs ``authors_baseline.wpg_loss_per_sample``
   (a Python loop over pairs), forward + backward on the same cross-modal outputs; the losses must agree.
2. Encoders: the backbone forward + backward of mvptr_ds (unpadded position-wise work, packed cross-modal
   input) vs ``kernels="eager"`` on the batch padded to the authors' fixed 40 + 20 + 50 positions.
3. WPG negatives: a whole training step (forward + backward of every stage-2 objective) with WPG's
   negatives scored on the joint cross-modal encoding (``wpg_negative_encoding="joint"``; one extra cross-modal pass
   over B pairs), on one sequence holding caption i with both images' regions (``"shared"``; one extra pass over
   B sequences of Lt + 2 Lr positions), and on the two positive encodings (``"separate"``, the release and
   default), same weights and batch.
4. Loader: batches/s of the full data path (sampling, corruption, collation) at the chosen micro batch with
   0 and 2 workers, at realistic lengths (``benchmarks/realistic.py``).
Prints one JSON object (and writes it with ``--out``); every ratio is from this one process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from authors_baseline import fixed_lengths, pad_fixed, wpg_loss_per_sample  # noqa: E402
from realistic import realistic_loader  # noqa: E402

from mvptr_ds import assembly  # noqa: E402
from mvptr_ds.config import DataConfig, RunConfig, TrainConfig, model_config_from  # noqa: E402
from mvptr_ds.objectives.wpg import wpg_loss  # noqa: E402
from mvptr_ds.training import distributed  # noqa: E402


def best_time(fn, reps: int) -> float:
    """Fastest of ``reps`` calls after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_wpg(backbone, batch, reps: int) -> dict:
    with torch.no_grad():
        cross = backbone(batch).cross
    leaf = cross.detach().requires_grad_()
    holder = type("Outputs", (), {"cross": leaf})()  # WPG reads only the cross-modal outputs

    def run(fn):
        def go():
            leaf.grad = None
            out = fn(holder, batch)
            out.loss.backward()
            return out
        return go

    ours, theirs = run(wpg_loss)(), run(wpg_loss_per_sample)()
    diff = abs(float(ours.loss.detach()) - float(theirs.loss.detach()))
    t_ours, t_loop = best_time(run(wpg_loss), reps), best_time(run(wpg_loss_per_sample), reps)
    return {"vectorised_ms": 1e3 * t_ours, "per_sample_loop_ms": 1e3 * t_loop, "speedup": t_loop / t_ours,
            "pairs": float(ours.metrics["pairs"]), "loss_abs_diff": diff}


def bench_encoders(cfg: RunConfig, parts, batch, reps: int) -> dict:
    eager_cfg = dataclasses.replace(cfg.model, kernels="eager", skip_padding=False)
    eager = type(parts.module.backbone)(eager_cfg)
    eager.load_state_dict(parts.module.backbone.state_dict())
    ours = parts.module.backbone
    padded = pad_fixed(batch, *fixed_lengths(cfg))

    def step(model, b):
        def go():
            model.zero_grad(set_to_none=True)
            out = model(b)
            (out.cross.float().pow(2).mean() + out.text_embed.sum() + out.visual_embed.sum()).backward()
        return go

    t_ours, t_eager = best_time(step(ours, batch), reps), best_time(step(eager, padded), reps)
    real = int(batch.text_mask.sum() + batch.tag_mask.sum() + batch.region_mask.sum())
    return {"packed_ms": 1e3 * t_ours, "fixed_padding_eager_ms": 1e3 * t_eager, "speedup": t_eager / t_ours,
            "real_positions": real, "padded_positions": padded.size * sum(fixed_lengths(cfg))}


def bench_wpg_negatives(parts, batch, reps: int) -> dict:
    module = parts.module

    def variant(mode):  # the same backbone and heads (weights), another WPG negative mode
        m = type(module)(module.backbone, module.objectives,
                         dataclasses.replace(module.objective_cfg, wpg_negative_encoding=mode), gather=module.gather)
        m.heads = module.heads
        return m

    joint, separate, shared = variant("joint"), variant("separate"), variant("shared")

    def step(m):
        def go():
            torch.manual_seed(0)  # the same ITM draws for both (random/sampled negatives)
            m.zero_grad(set_to_none=True)
            m(batch).loss.backward()
        return go

    t_joint, t_separate, t_shared = (best_time(step(m), reps) for m in (joint, separate, shared))
    return {"joint_step_ms": 1e3 * t_joint, "separate_step_ms": 1e3 * t_separate, "shared_step_ms": 1e3 * t_shared,
            "joint_over_separate": t_joint / t_separate, "shared_over_separate": t_shared / t_separate,
            "objectives": ",".join(module.objectives)}


def bench_loader(parts, cfg, info, batches: int) -> dict:
    out = {}
    for workers in (0, 2):
        run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
        loader = realistic_loader(parts, run_cfg, info)
        it = iter(loader)
        next(it)  # start-up (workers fork) not counted
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        out[f"workers_{workers}_batches_per_s"] = batches / (time.perf_counter() - start)
        del it
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base")
    p.add_argument("--micro_batch", type=int, default=16)
    p.add_argument("--loader_micro_batch", type=int, default=64)
    p.add_argument("--loader_batches", type=int, default=30)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    info = distributed.setup()
    cfg = RunConfig(model=model_config_from(args.model),
                    data=DataConfig(source="synthetic:images=512,held_out=0,regions=10-50"),
                    train=TrainConfig(micro_batch=args.micro_batch, seed=args.seed, wandb="disabled")).validate()
    parts = assembly.build(cfg, info)
    cfg = parts.config
    batch = next(iter(realistic_loader(parts, cfg, info)))
    parts.module.train()
    result = {
        "bench": "components", "model": args.model, "micro_batch": args.micro_batch, "reps": args.reps,
        "wpg": bench_wpg(parts.module.backbone, batch, args.reps),
        "encoders": bench_encoders(cfg, parts, batch, args.reps),
        "wpg_negatives": bench_wpg_negatives(parts, batch, args.reps),
        "loader": bench_loader(parts, dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, micro_batch=args.loader_micro_batch)), info,
            args.loader_batches),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/components.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
