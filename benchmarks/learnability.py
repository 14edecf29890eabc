"""Learnability sweeps on the built-in world, in one process (plain torch AdamW, no DeepSpeed, no checkpoints).

    python benchmarks/learnability.py --seed 2026 --objectives vsc,itm,wpg --itm_negatives random \
        --loss_weights wpg=2 --steps 600 --lr 3e-4 --eval_every 200 --out run.json

A fast way to compare objective variants (the diagnosis table of BENCHMARKS.md):
stage 1 (``--stage1_objectives``, MCR by default, ``--stage1_steps`` at ``--stage1_lr``), then stage 2 from
its backbone with the chosen objectives, the release's optimizer (AdamW, no decay on biases/LayerNorm,
linear warm-up/decay, clipping 10) and the tiny model; every ``--eval_every`` steps the held-out images are
evaluated like ``evaluate`` does: coarse R@1, ITM re-ranked R@1 (when ITM is trained) and grounding accuracy
with its chance level (stage 1 too when it trains VSC: ``stage1_history`` of the result).
The README's figures come from the real commands (``make demo``), not from this script; the two differ in
initial weights and data order, not in the model or the losses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvptr_ds.config import MODEL_PRESETS, DataConfig, ObjectiveConfig  # noqa: E402
from mvptr_ds.data.batching import ResumableLoader  # noqa: E402
from mvptr_ds.data.pipeline import build_data  # noqa: E402
from mvptr_ds.data.pair_joining import JoinedPairs  # noqa: E402
from mvptr_ds.evaluation.grounding import evaluate_grounding  # noqa: E402
from mvptr_ds.evaluation.retrieval import eval_collator, evaluate_retrieval, retrieval_set  # noqa: E402
from mvptr_ds.objectives.itm import prior_scale  # noqa: E402
from mvptr_ds.objectives.pretraining import build_pretraining_module, check_objectives, needs_cross  # noqa: E402
from mvptr_ds.config_types import name_values, parse_names  # noqa: E402
from mvptr_ds.training.optim import decay_groups, linear_schedule  # noqa: E402


def evaluate_held_out(module, data, source: str, train_images: int = 0) -> dict:
    """Coarse and (if ITM is trained) re-ranked R@1 both ways, grounding accuracy and chance, in percent.

    With ``train_images``, the same retrieval figures on the first that many *training* images too
    (``train_coarse_tr_r1``, ...): the gap between the two is what the model memorised.
    """
    collator = eval_collator(DataConfig(source=source), data.vocab)
    out = {}
    splits = [("", data.held_out, None)] + ([("train_", data.train, train_images)] if train_images else [])
    for prefix, split, max_images in splits:
        rset = retrieval_set(split, max_images=max_images)
        coarse = evaluate_retrieval(module.backbone, None, rset, collator)
        out.update({f"{prefix}coarse_tr_r1": coarse["tr_r1"], f"{prefix}coarse_ir_r1": coarse["ir_r1"],
                    f"{prefix}r1_chance": coarse["tr_r1_chance"]})
        if "itm" in module.heads:
            fine = evaluate_retrieval(module.backbone, module.heads["itm"], rset, collator,
                                      itm_prior_scale=prior_scale(module.backbone.logit_scale, module.objective_cfg))
            out.update({f"{prefix}itm_tr_r1": fine["tr_r1"], f"{prefix}itm_ir_r1": fine["ir_r1"]})
    if module.backbone.with_cross:
        g = evaluate_grounding(module.backbone, data.held_out, collator)
        out.update(grounding=g["accuracy"], grounding_chance=g["chance"])
    return out


def train_stage(objectives, steps: int, lr: float, warmup: int, args, source: str, objective_cfg: ObjectiveConfig,
                init=None, log=print, stage: int = 2) -> tuple:
    """Train one stage; returns (module, history of {step, losses..., eval...}). ``--mix_pairs`` joins the
    pairs of the stages named by ``--mix_stages``; the held-out evaluation runs when VSC or the cross-modal
    encoder is trained."""
    data = build_data(DataConfig(source=source), objectives)
    model_cfg = dataclasses.replace(MODEL_PRESETS["tiny"], vocab_size=data.vocab.vocab_size,
                                    only_word_size=data.vocab.only_word_size)
    torch.manual_seed(args.init_seed)
    module = build_pretraining_module(model_cfg, objectives, objective_cfg)
    if init is not None:
        module.load_state_dict({k: v for k, v in init.state_dict().items() if k.startswith("backbone.")}, strict=False)
    optimizer = torch.optim.AdamW(decay_groups(module, 0.01), lr=lr)
    schedule = linear_schedule(optimizer, warmup, steps)
    mix = args.mix_pairs if stage in args.mix_stages else 0.0
    train = JoinedPairs(data.train, mix, args.init_seed) if mix else data.train  # the trainer's --join_pairs
    batches = iter(ResumableLoader(train, data.collator, args.micro_batch, rank=0, world_size=1,
                                   seed=args.init_seed))  # the trainer's data order and corruption
    history, running = [], {}
    start = time.time()
    for step in range(1, steps + 1):
        out = module(next(batches))
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        for k, v in {**out.losses, **out.metrics}.items():
            running.setdefault(k, []).append(float(v.detach()))
        if step % args.eval_every == 0 or step == steps:
            row = {"step": step, "seconds": round(time.time() - start, 1),
                   **{k: round(float(np.mean(v)), 4) for k, v in running.items()}}
            running = {}
            if module.backbone.with_cross or "vsc" in objectives:
                row.update({k: round(v, 2) for k, v in
                            evaluate_held_out(module, data, source, args.train_images).items()})
            history.append(row)
            log(json.dumps(row))
    return module, history


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=2026, help="world seed (synthetic:seed=N)")
    p.add_argument("--world", default="",
                   help="more keys of the synthetic source, e.g. images=4096 (default: the demo's world)")
    p.add_argument("--train_images", type=int, default=0,
                   help="also evaluate retrieval on this many training images (train_* figures; 0: off)")
    p.add_argument("--mix_pairs", type=float, default=0.0,
                   help="probability that a training pair is joined with another image's (the trainer's "
                        "--join_pairs; 0: off)")
    p.add_argument("--init_seed", type=int, default=0, help="weights, data order and corruption")
    p.add_argument("--mix_stages", type=lambda v: {int(x) for x in v.split(",")}, default={1, 2},
                   help="the stages whose pairs --mix_pairs joins, e.g. 1 (default: 1,2)")
    p.add_argument("--stage1_objectives", default="mcr", help="stage 1's objectives (uni-modal: mcr, vsc)")
    p.add_argument("--stage1_steps", type=int, default=20)
    p.add_argument("--stage1_warmup", type=int, default=2)
    p.add_argument("--stage1_lr", type=float, default=2e-4)
    p.add_argument("--objectives", default="vsc,itm,wpg")
    p.add_argument("--itm_negatives", default="random", help="default: the demo's choice (the release: hardest)")
    p.add_argument("--wpg_negative_encoding", default="shared",
                   help="default: the demo's choice (the release: separate; also joint)")
    p.add_argument("--wpg_negatives", default="random", help="WPG's negative image (the trainer's --wpg_negatives)")
    p.add_argument("--itm_prior", action="store_true", help="ITM as a correction of the contrastive score (the "
                   "trainer's --itm_prior)")
    p.add_argument("--loss_weights", default="")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--micro_batch", type=int, default=32)
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args(argv)
    if not args.mix_stages <= {1, 2}:
        p.error(f"--mix_stages: stages are 1 and 2, got {','.join(map(str, sorted(args.mix_stages)))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    source = f"synthetic:seed={args.seed}" + (f",{args.world}" if args.world else "")
    objective_cfg = ObjectiveConfig(weights=name_values("--loss_weights", "wpg=3")(args.loss_weights) if args.loss_weights else (),
                                    itm_negatives=args.itm_negatives,
                                    wpg_negative_encoding=args.wpg_negative_encoding,
                                    wpg_negatives=args.wpg_negatives, itm_prior=args.itm_prior)
    objective_cfg.validate()
    stage1, stage1_history = None, []
    if args.stage1_steps:
        stage1_objectives = check_objectives(parse_names(args.stage1_objectives))
        if needs_cross(stage1_objectives):
            p.error(f"--stage1_objectives {args.stage1_objectives}: stage 1 runs the uni-modal encoders only "
                    "(mcr, vsc)")
        stage1, stage1_history = train_stage(stage1_objectives, args.stage1_steps, args.stage1_lr,
                                             min(args.stage1_warmup, args.stage1_steps), args, source, objective_cfg,
                                             stage=1)
    objectives = check_objectives(parse_names(args.objectives))
    _, history = train_stage(objectives, args.steps, args.lr, args.warmup, args, source, objective_cfg, init=stage1)
    result = {"args": {**vars(args), "mix_stages": sorted(args.mix_stages)}, "stage1_history": stage1_history,
              "history": history}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
