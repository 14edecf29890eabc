"""Where a run starts: from scratch, or from a checkpoint of the output folder (``--resume``).

:func:`plan` decides before the engine exists (it may change the engine's config: the checkpoint's ZeRO stage,
a universal checkpoint for another world size, ``elastic``); :func:`restore` then loads the engine state, the
loader position and this rank's RNG state into the built engine and returns where the loop continues.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from mvptr_ds.training import checkpoint, elastic
from mvptr_ds.training.ds_config import offloads_optimizer, set_zero_stage, zero_stage


@dataclass
class Start:
    path: Optional[str] = None                  # the checkpoint continued from; None: a fresh start
    plan: Optional[elastic.ResumePlan] = None
    events: List[str] = field(default_factory=list)  # lines for the run log

    @property
    def resumed(self) -> bool:
        return self.path is not None


def plan(train_cfg, ds_cfg: Dict[str, Any], rank: int, world_size: int) -> Start:
    """The checkpoint to continue (``train_cfg.resume``), verified; ``ds_cfg`` adjusted to load it.

    Call under the output folder's lock (no other run adds or prunes checkpoints then); collective.
    """
    path = checkpoint.resolve_resume(train_cfg.resume, train_cfg.output_dir)
    if path is None:
        return Start()
    start = Start(path)
    meta = checkpoint.verify(path)
    stage = elastic.resume_stage(meta, zero_stage(ds_cfg), offloads_optimizer(ds_cfg))
    if stage != zero_stage(ds_cfg):
        start.events.append(f"the checkpoint was written at ZeRO stage {stage}: continuing at stage {stage} "
                            f"(DeepSpeed converts between ZeRO stages >= 1 only)")
        set_zero_stage(ds_cfg, stage)
    start.plan = elastic.plan_resume(path, meta, world_size, zero_stage(ds_cfg))
    if start.plan.universal:
        elastic.ensure_universal(path, rank)
        ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
    note = start.plan.describe(world_size, zero_stage(ds_cfg))
    if note:
        start.events.append(note)
    return start


def dropout_seed(seed: int, rank: int, step: int = 0) -> int:
    """The torch seed of ``rank`` for a fresh start (``step`` 0) or a rank new to a resumed run: dropout
    differs per rank."""
    return seed + 1000 + rank + 7919 * step


def restore(start: Start, engine, loader, seed: int, rank: int) -> Tuple[int, int]:
    """Seed this rank, then load ``start``'s checkpoint into ``engine`` and ``loader`` (RNG state included).

    Returns ``(step, skipped_batches)`` to continue from; ``(0, 0)`` for a fresh start.
    """
    torch.manual_seed(dropout_seed(seed, rank))
    if not start.resumed:
        return 0, 0
    state = checkpoint.load(engine, start.path, tag=elastic.UNIVERSAL if start.plan.universal else None)
    step, skipped_batches = checkpoint.restore_train_state(state, start.path, loader)
    rng = elastic.rank_rng_state(state["rng"], rank)
    if rng is not None:
        checkpoint.set_rng_state(rng)
    else:
        torch.manual_seed(dropout_seed(seed, rank, step))
        start.events.append(f"rank {rank} is new (the checkpoint had {start.plan.saved_world_size} ranks): "
                            f"fresh dropout seed")
    start.events.append(f"resumed from {start.path} at step {step}")
    return step, skipped_batches
