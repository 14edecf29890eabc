"""Elastic resume: continue a run checkpointed on N ranks (or another ZeRO stage) on M ranks.

ZeRO partitions the fp32 master weights and the Adam moments by rank, so a ZeRO-1/2/3 checkpoint of N
ranks cannot be loaded shard-by-shard on M != N ranks. The documented DeepSpeed path is the *universal
checkpoint*: ``deepspeed.checkpoint.ds_to_universal`` rewrites the shards as one folder per parameter
(fp32 weight, ``exp_avg``, ``exp_avg_sq``, step) and an engine configured with
``"checkpoint": {"load_universal": true}`` re-partitions them for its own world size on load.

``plan_resume`` compares the checkpoint's world size and ZeRO stage (from its ``COMPLETE`` manifest) with
this run's; on a change, rank 0 converts ``step<N>/`` into ``step<N>/universal/`` once (into a temporary
folder renamed at the end, so a kill during the conversion leaves nothing half-written behind) and every rank
loads that. ZeRO stage 0 keeps the whole optimizer state on every rank and needs no conversion.

The data order needs nothing special: the loader state counts global samples. RNG states are restored per
rank where the old run had that rank; new ranks start from fresh seeds derived from (seed, rank, step).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from mvptr_ds.config import ConfigError
from mvptr_ds.training import distributed
from mvptr_ds.training.safe_load import weights_only_loads

UNIVERSAL = "universal"


@dataclass(frozen=True)
class ResumePlan:
    path: str                     # the step<N> checkpoint directory
    universal: bool               # load step<N>/universal with "load_universal"
    saved_world_size: int
    saved_zero_stage: Optional[int]

    def describe(self, world_size: int, zero_stage: int) -> str:
        if not self.universal:
            if self.saved_world_size != world_size:
                return (f"elastic resume: {self.saved_world_size} -> {world_size} ranks (ZeRO stage 0: "
                        f"optimizer state is replicated, loaded as is)")
            return ""
        return (f"elastic resume: checkpoint of {self.saved_world_size} ranks (ZeRO stage {self.saved_zero_stage}) "
                f"-> {world_size} ranks (ZeRO stage {zero_stage}) through the universal checkpoint "
                f"{os.path.join(self.path, UNIVERSAL)}")


def saved_world_size(path: str, meta: Dict[str, Any]) -> int:
    """World size a checkpoint was written with: from its manifest, else from its optimizer shard files."""
    if isinstance(meta.get("world_size"), int):
        return meta["world_size"]
    shards = glob.glob(os.path.join(path, "*zero_pp_rank_*_optim_states.pt"))
    return max(1, len(shards))


def resume_stage(meta: Dict[str, Any], zero_stage: int, offload: bool = False) -> int:
    """The ZeRO stage to resume at: this run's, unless the checkpoint's differs and one of the two is 0.

    DeepSpeed converts between ZeRO stages >= 1 (through the universal checkpoint) but not from or to stage 0,
    whose optimizer state is torch's own, replicated on every rank. Such a resume keeps the checkpoint's stage
    (e.g. a one-process run, stage 0, continued on 4 ranks stays at stage 0).
    """
    saved = meta.get("zero_stage")
    if isinstance(saved, int) and saved != zero_stage and 0 in (saved, zero_stage):
        if saved == 0 and (zero_stage == 3 or offload):
            raise ConfigError(f"the checkpoint was written at ZeRO stage 0 (its optimizer state is torch's own), "
                              f"which ZeRO stage {zero_stage}{' with offload' if offload else ''} cannot continue: "
                              f"resume with a zero1/zero2 template (it then runs at stage 0), or start a new run "
                              f"with --init_from the checkpoint")
        return saved
    return zero_stage


def plan_resume(path: str, meta: Dict[str, Any], world_size: int, zero_stage: int) -> ResumePlan:
    """Whether resuming ``path`` on ``world_size`` ranks with ``zero_stage`` needs the universal form."""
    old_ws = saved_world_size(path, meta)
    old_stage = meta.get("zero_stage")
    if old_stage is None:
        old_stage = zero_stage if old_ws == world_size or not glob.glob(os.path.join(path, "*optim_states.pt")) else None
    changed = old_ws != world_size or (old_stage is not None and old_stage != zero_stage)
    sharded = (old_stage or 0) > 0 or zero_stage > 0
    return ResumePlan(path=path, universal=bool(changed and sharded), saved_world_size=old_ws,
                      saved_zero_stage=old_stage)


def ensure_universal(path: str, rank: int) -> str:
    """Convert ``path`` (a step<N> checkpoint) into ``path/universal`` on rank 0, once. Collective.

    Errors are raised on every rank. Returns the universal folder.
    """
    target = os.path.join(path, UNIVERSAL)
    error = None
    if rank == 0 and not os.path.isfile(os.path.join(target, "mp_rank_00_model_states.pt")):
        try:
            convert_to_universal(path, target)
        except Exception as e:  # the converter raises assorted errors on broken inputs
            error = f"{path}: cannot convert to a universal checkpoint for elastic resume ({type(e).__name__}: {e})"
    errors: List[Optional[str]] = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    for e in errors:
        if e is not None:
            raise ConfigError(e.splitlines()[0])
    distributed.barrier()
    return target


def convert_to_universal(path: str, target: str) -> None:
    """``ds_to_universal`` from ``path`` into ``target`` via a temporary folder renamed at the end."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = f"{target}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=path, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), weights_only_loads():
        ds_to_universal(args)
    shutil.rmtree(os.path.join(tmp, "tmp"), ignore_errors=True)
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.replace(tmp, target)


def rank_rng_state(states: Any, rank: int) -> Optional[Dict[str, Any]]:
    """Rank ``rank``'s saved RNG state out of a checkpoint's ``rng`` entry, or None if it had no such rank."""
    return states[rank] if rank < len(states) else None
