"""``finetune``: train a task on the pre-training engine and loop, then evaluate with the task's metric.

The training loop is pre-training's (``training.trainer.train``); only the parts differ: :class:`TaskBuilder`
is its ``build`` seam and returns the task's data, :class:`~mvptr_ds.finetune.tasks.FinetuneModule` and a
resumable loader. Checkpoints, resume, ``--init_from`` (a pre-training run or export: the backbone loads,
the task head is new and reported by name), logging and ``final/`` export are the loop's.

After training, the exported ``final/`` weights are loaded into a fresh module and evaluated on the
evaluation split (each rank scores a strided share; counts are summed over ranks). ``eval.json`` in the run
folder holds the task, its metric, the number of examples, the chance level (the expected metric of a
uniformly random prediction), the checkpoint and the data evaluated.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional

import torch

from mvptr_ds.config import ConfigError, RunConfig
from mvptr_ds.config_types import read_json
from mvptr_ds.finetune.data import TaskData, build_task_data
from mvptr_ds.finetune.metrics import task_scores
from mvptr_ds.finetune.tasks import FinetuneModule
from mvptr_ds.files import atomic_write_json

METRICS = {"vqa": "vqa_soft_accuracy", "snli_ve": "accuracy", "refcoco": "iou50_accuracy"}


def build_module(cfg: RunConfig, data: TaskData) -> FinetuneModule:
    return FinetuneModule(cfg.model, cfg.eval.finetune_task, num_answers=len(data.answers),
                          head_dropout=cfg.eval.head_dropout, ref_layer=cfg.eval.ref_layer,
                          objective_cfg=cfg.objectives)


class TaskBuilder:
    """``build(cfg, dist_info) -> RunParts`` for the training loop; keeps what it built for evaluation."""

    def __init__(self, training: bool = True):
        self.parts = None
        self.training = training  # False (--eval_only): the loader is never iterated, its size is not checked

    def __call__(self, cfg: RunConfig, info):
        import dataclasses

        from mvptr_ds.assembly import fresh_start_notes, resolve_model_config, training_loader
        from mvptr_ds.training.trainer import RunParts

        data = build_task_data(cfg)
        cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, data.vocab, cfg.data))
        if data.answers:
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_answers=len(data.answers)))
        cfg = cfg.validate()
        loader = training_loader(data.train, data.collator, cfg, info,
                                 f"{cfg.data.source} ({cfg.eval.finetune_task}, split train)", check_size=self.training)
        module = build_module(cfg, data).to(info.device)
        self.parts = RunParts(config=cfg, data=data, module=module, loader=loader,
                              fresh_start_notes=fresh_start_notes(cfg))
        return self.parts


def _rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values


@torch.no_grad()
def evaluate_task(module: FinetuneModule, data: TaskData, batch_size: int, device="cpu") -> Dict[str, float]:
    """The task's metric on ``data.eval`` (percent), ``n`` and ``chance`` (see module docstring)."""
    task = module.task
    rank, world = _rank_world()
    was_training = module.training
    module.eval()
    score = chance = 0.0
    mine = list(range(rank, len(data.eval), world))
    try:
        for start in range(0, len(mine), batch_size):
            examples = [data.eval[i] for i in mine[start:start + batch_size]]
            tb = data.collator(examples).to(device)
            scores, chances = task_scores(task, module.predict(tb), tb.answer_scores, tb.labels, tb.region_iou,
                                          tb.batch.region_mask)
            score += float(scores.sum())
            chance += float(chances.sum())
    finally:
        module.train(was_training)
    total = _sum_over_ranks(torch.tensor([score, chance, float(len(mine))], dtype=torch.float64))
    n = max(float(total[2]), 1.0)
    return {METRICS[task]: 100.0 * float(total[0]) / n, "chance": 100.0 * float(total[1]) / n, "n": int(total[2])}


def evaluate_retrieval_task(module: FinetuneModule, data: TaskData, cfg: RunConfig, device="cpu") -> Dict[str, float]:
    """Coarse-to-fine retrieval of ``mvptr_ds.evaluation.retrieval`` with the fine-tuned backbone and ITM head."""
    from mvptr_ds.evaluation.retrieval import eval_collator, evaluate_retrieval, retrieval_set

    from mvptr_ds.objectives.itm import prior_scale

    rank, world = _rank_world()
    return evaluate_retrieval(module.backbone, module.heads["retrieval"], retrieval_set(data.eval_pairs),
                              eval_collator(cfg.data, data.vocab), k_captions=cfg.eval.rerank_captions,
                              k_images=cfg.eval.rerank_images, batch_size=cfg.eval.batch_size, device=device,
                              rank=rank, world_size=world,
                              itm_prior_scale=prior_scale(module.backbone.logit_scale, cfg.objectives))


def evaluate(module: FinetuneModule, data: TaskData, cfg: RunConfig, device="cpu") -> Dict[str, float]:
    if module.task == "retrieval":
        return evaluate_retrieval_task(module, data, cfg, device)
    return evaluate_task(module, data, cfg.eval.batch_size, device)


def load_final(cfg: RunConfig, data: TaskData, weights_dir: str, device) -> FinetuneModule:
    """A fresh task module with the weights of ``weights_dir`` (a ``final/`` export); every key must match."""
    from mvptr_ds.training.weights import load_weights

    state, _ = load_weights(weights_dir)
    module = build_module(cfg, data)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights_dir}: weights do not fit the {cfg.eval.finetune_task} model (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]})")
    return module.to(device)


def write_report(cfg: RunConfig, result: Dict[str, float], data: TaskData, checkpoint: Optional[str]) -> str:
    report = {"task": cfg.eval.finetune_task, cfg.eval.finetune_task: result, "checkpoint": checkpoint, "data": cfg.data.source,
              "eval_data": data.eval_source}
    path = os.path.join(cfg.train.output_dir, "eval.json")
    atomic_write_json(path, report, indent=1)
    return path


def _scored_as_trained(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the ITM score (``objectives.itm_prior``) of the fine-tuned retrieval model ``--init_from`` names,
    when its config.json says so: ``--eval_only`` then ranks as that model was trained."""
    if cfg.eval.finetune_task != "retrieval":
        return cfg
    path = os.path.join(cfg.train.init_from, "config.json")
    if not os.path.isfile(path):  # a Hugging Face folder or a checkpoint without one: the run's own setting
        return cfg
    saved = read_json(path, path)
    prior = (saved.get("objectives") or {}).get("itm_prior") if isinstance(saved, dict) else None
    if isinstance(prior, bool) and prior != cfg.objectives.itm_prior:
        if _rank_world()[0] == 0:
            print(f"note: {cfg.train.init_from} was trained with itm_prior={prior}: scoring it so")
        cfg = dataclasses.replace(cfg, objectives=dataclasses.replace(cfg.objectives, itm_prior=prior))
    return cfg


def finetune(cfg: RunConfig, eval_only: bool = False) -> Dict[str, object]:
    """Train (unless ``eval_only``) and evaluate; returns the report written to ``<output_dir>/eval.json``."""
    from mvptr_ds.training import checkpoint as checkpoint_lib
    from mvptr_ds.training import distributed
    from mvptr_ds.training.init_from import init_weights
    from mvptr_ds.training.trainer import train

    builder = TaskBuilder(training=not eval_only)
    if eval_only:
        if not cfg.train.init_from:
            raise ConfigError("--eval_only evaluates the weights of --init_from; give it")
        checkpoint_lib.check_output_dir(cfg.train.output_dir)  # eval.json goes there
        cfg = _scored_as_trained(cfg)
        info = distributed.setup()
        parts = builder(cfg, info)
        for line in init_weights(parts.module, cfg.train.init_from):
            if info.is_main:
                print(line)
        module, checkpoint, cfg, device = parts.module, cfg.train.init_from, parts.config, info.device
    else:
        result = train(cfg, build=builder)
        if result.final_dir is None:
            return {"stopped_by": result.stopped_by, "steps": result.steps}
        cfg, checkpoint = builder.parts.config, result.final_dir
        device = next(builder.parts.module.parameters()).device
        module = load_final(cfg, builder.parts.data, checkpoint, device)
    metrics = evaluate(module, builder.parts.data, cfg, device)
    rank, _ = _rank_world()
    report = {"task": cfg.eval.finetune_task, cfg.eval.finetune_task: metrics, "checkpoint": checkpoint}
    if rank == 0:
        report["report"] = write_report(cfg, metrics, builder.parts.data, checkpoint)
    return report
