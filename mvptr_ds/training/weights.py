"""The project's portable checkpoint: ``<dir>/model.safetensors`` + ``<dir>/config.json``.

This is what ``final/`` holds after training, what ``convert_original`` writes and what evaluation and
fine-tuning read. (Resumable training state lives in DeepSpeed checkpoints; see ``checkpoint.py``.)
Both files are written atomically, so a crash never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file, save_file

from mvptr_ds.config import ConfigError, RunConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_weights(directory: str, state_dict: Dict[str, torch.Tensor], config: RunConfig) -> None:
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tmp = os.path.join(directory, f".{WEIGHTS_NAME}.tmp{os.getpid()}")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
    config.dump(os.path.join(directory, CONFIG_NAME))


def load_weights(directory: str) -> Tuple[Dict[str, torch.Tensor], RunConfig]:
    """Read a portable checkpoint (no pickle is executed). Raises ConfigError naming what is missing."""
    wpath = os.path.join(directory, WEIGHTS_NAME)
    cpath = os.path.join(directory, CONFIG_NAME)
    for p in (wpath, cpath):
        if not os.path.isfile(p):
            raise ConfigError(f"{directory}: not a mvptr_ds checkpoint ({os.path.basename(p)} missing)")
    try:
        state = load_file(wpath)
    except Exception as e:  # safetensors raises its own error types for truncated/invalid files
        raise ConfigError(f"{wpath}: unreadable weights ({e})") from None
    return state, RunConfig.load(cpath)
