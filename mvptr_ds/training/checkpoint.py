"""Resumable training checkpoints on top of DeepSpeed's engine checkpointing.

Layout: ``<output_dir>/checkpoints/step<N>/`` written by ``engine.save_checkpoint`` on every rank (model,
optimizer shards, scheduler), plus our ``train_state`` (step, data-loader position, RNG states, the resolved
config) in the engine's ``client_state``. After every rank has finished writing, rank 0 writes
``step<N>/COMPLETE`` atomically; only checkpoints with that marker are ever resumed from, so a process
killed in the middle of a save leaves the previous checkpoint as the newest usable one.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from mvptr_ds.config import ConfigError, RunConfig
from mvptr_ds.training import distributed

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(root: str) -> List[Tuple[int, str]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _TAG.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, COMPLETE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str, output_dir: str) -> Optional[str]:
    """The checkpoint directory (``.../step<N>``) to resume from, or None to start fresh.

    ``auto``: the newest complete checkpoint of this run, if any. ``none``: start fresh. A path: either a
    ``step<N>`` directory or a ``checkpoints`` root / run directory holding some.
    """
    if resume in (None, "", "none", "None"):
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_root(output_dir))
        return found[-1][1] if found else None
    path = os.path.abspath(resume)
    if not os.path.exists(path):
        raise ConfigError(f"--resume {resume}: no such directory")
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return path
    for root in (path, checkpoint_root(path)):
        found = complete_checkpoints(root)
        if found:
            return found[-1][1]
    if _TAG.match(os.path.basename(path)):
        raise ConfigError(f"--resume {resume}: checkpoint is incomplete (no {COMPLETE} marker: the save was interrupted)")
    raise ConfigError(f"--resume {resume}: no complete checkpoint found there")


def save(engine, output_dir: str, step: int, train_state: Dict[str, Any], config: RunConfig, keep_last: int) -> str:
    """Save on every rank (DeepSpeed requires it), mark complete, then prune to the newest ``keep_last``."""
    root = checkpoint_root(output_dir)
    tag = f"step{step}"
    path = os.path.join(root, tag)
    if engine.global_rank == 0 and os.path.isdir(path):
        shutil.rmtree(path)  # an incomplete leftover of a killed save of the same step
    distributed.barrier()
    engine.save_checkpoint(root, tag=tag, client_state={"train_state": train_state}, save_latest=True)
    distributed.barrier()
    if engine.global_rank == 0:
        config.dump(os.path.join(path, "config.json"))
        tmp = os.path.join(path, f".{COMPLETE}.tmp")
        with open(tmp, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, COMPLETE))
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return path


def load(engine, path: str) -> Dict[str, Any]:
    """Restore engine (model, optimizer, scheduler) from ``path`` and return our ``train_state``."""
    root, tag = os.path.split(path.rstrip("/"))
    try:
        load_path, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
    except Exception as e:  # DeepSpeed raises assorted errors for missing/truncated shards
        raise ConfigError(f"checkpoint {path}: cannot be loaded ({type(e).__name__}: {e})") from None
    if load_path is None or client_state is None or "train_state" not in client_state:
        raise ConfigError(f"checkpoint {path}: no training state found (not written by mvptr_ds?)")
    return client_state["train_state"]


def consolidated_state_dict(engine, checkpoint_path: Optional[str]) -> Dict[str, torch.Tensor]:
    """fp32 weights of the whole model, gathered from any ZeRO stage. Call on every rank; result on rank 0.

    With ZeRO the fp32 master weights live in the (sharded) optimizer state, so they are rebuilt from the
    checkpoint just written with DeepSpeed's ``zero_to_fp32`` utilities.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    distributed.barrier()
    state: Dict[str, torch.Tensor] = {}
    if engine.global_rank == 0:
        if engine.zero_optimization_stage() > 0 and checkpoint_path is not None:
            root, tag = os.path.split(checkpoint_path.rstrip("/"))
            state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
        else:
            state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    distributed.barrier()
    return state
