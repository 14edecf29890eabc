"""``evaluate``: a checkpoint on retrieval and phrase grounding, written as one JSON file.

Output (recalls and accuracies in percent)::

    {"checkpoint": DIR, "weights": DIR read, "data": SOURCE, "split": "held_out"|"all",
     "retrieval": {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum", "r_mean", "n_images",
                   "n_captions", "itm_pairs", "tr_r1_chance", "ir_r1_chance", "k_captions", "k_images",
                   "reranked", "seconds"},
     "grounding": {"accuracy", "chance", "n", "seconds"}, "world_size": W}

Without ``tasks``, both; a stage-1 model (no cross-modal encoder) gets retrieval alone (its contrastive ranking)
and ``"skipped": {"grounding": reason}`` in the output; asking it for grounding is an error before any work.

One process by default; launched with several (``deepspeed``/``torchrun``), the ITM re-ranking and the
grounding batches are split over the ranks and rank 0 writes the file.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional, Sequence

from mvptr_ds.config import ConfigError, EvalConfig
from mvptr_ds.files import atomic_write_json

TASKS = ("retrieval", "grounding")


def parse_tasks(tasks) -> tuple:
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = tuple(dict.fromkeys(str(t).strip().lower() for t in items if str(t).strip()))
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ConfigError(f"--tasks {tasks!r}: expected a comma list out of {', '.join(TASKS)}")
    return names


def _dist_context():
    """(rank, world_size, device): set up torch.distributed only when a launcher started several processes."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from mvptr_ds.training.distributed import setup

        info = setup()
        return info.rank, info.world_size, info.device
    return 0, 1, torch.device("cpu")


def evaluate(checkpoint: str, data: Optional[str] = None, tasks: Optional[Sequence[str]] = None,
             output: Optional[str] = None, eval_cfg: EvalConfig = EvalConfig(), max_images: Optional[int] = None,
             show_progress: bool = True) -> Dict[str, object]:
    """Evaluate ``checkpoint`` on ``tasks`` over ``data`` (default: its training source; module doc)."""
    import torch

    from mvptr_ds.evaluation.grounding import evaluate_grounding
    from mvptr_ds.evaluation.loading import load_eval_data, load_model
    from mvptr_ds.evaluation.retrieval import evaluate_retrieval, retrieval_set

    requested = parse_tasks(tasks) if tasks is not None else None
    eval_cfg.validate()
    if output is not None and os.path.isdir(output):
        raise ConfigError(f"--output {output}: is a directory; give a file name such as {output}/eval.json")
    rank, world_size, device = _dist_context()
    main = rank == 0
    torch.manual_seed(0)
    model = load_model(checkpoint, device)
    tasks, skipped = requested or TASKS, {}
    if not model.backbone.with_cross and "grounding" in tasks:
        if requested is not None:
            raise ConfigError(f"{checkpoint}: grounding needs the cross-modal encoder, and this model has none (a "
                              "stage-1 checkpoint); evaluate a stage-2 model or drop 'grounding' from --tasks")
        tasks, skipped = tuple(t for t in tasks if t != "grounding"), {
            "grounding": "a stage-1 model: no cross-modal encoder (retrieval is its contrastive ranking)"}
    bundle, split, split_name = load_eval_data(model, data)
    collator = bundle.collator  # built without objectives: no corruption
    result: Dict[str, object] = {"checkpoint": checkpoint, "weights": model.source,
                                 "data": data or model.config.data.source, "split": split_name,
                                 "world_size": world_size}
    if skipped:
        result["skipped"] = skipped
    if "retrieval" in tasks:
        start = time.perf_counter()
        rset = retrieval_set(split, max_images=max_images)
        prior = model.itm_prior_scale
        ret = evaluate_retrieval(model.backbone, model.itm_head, rset, collator, eval_cfg.rerank_captions,
                                 eval_cfg.rerank_images, eval_cfg.batch_size, device, rank, world_size,
                                 show_progress=show_progress and main, itm_prior_scale=prior)
        ret.update(k_captions=eval_cfg.rerank_captions, k_images=eval_cfg.rerank_images,
                   reranked=model.itm_head is not None, itm_prior_scale=prior,
                   seconds=round(time.perf_counter() - start, 3))
        result["retrieval"] = ret
    if "grounding" in tasks:
        start = time.perf_counter()
        subset = split if max_images is None else _first_images(split, max_images)
        gr = evaluate_grounding(model.backbone, subset, collator, eval_cfg.batch_size, device, rank, world_size,
                                show_progress=show_progress and main)
        gr["seconds"] = round(time.perf_counter() - start, 3)
        result["grounding"] = gr
    if output is not None and main:
        atomic_write_json(output, result)
    return result


class _Subset:
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]


def _first_images(dataset, max_images: int):
    """The pairs of the first ``max_images`` images (as :func:`retrieval_set` keeps them)."""
    seen, keep = set(), []
    for i in range(len(dataset)):
        image_id = dataset[i].image_id
        if image_id not in seen and len(seen) >= max_images:
            continue
        seen.add(image_id)
        keep.append(i)
    return _Subset(dataset, keep)


