"""Reading checkpoint files without executing pickled code from them.

DeepSpeed 0.19.8 reads its own checkpoint files with ``torch.load(..., weights_only=False)`` (its
``TorchCheckpointEngine.load``, ``zero_to_fp32`` and the universal-checkpoint code), which runs any code a
crafted file contains. Before any of those readers sees a file, :func:`verify_checkpoint_files` loads every
``.pt`` file of the checkpoint with ``weights_only=True``: only tensors, containers, numbers, strings and the
few DeepSpeed record types listed in :data:`ALLOWED_GLOBALS` may appear. A file that needs anything else is
refused with a one-line error naming it. Our own ``train_state`` (loader position, RNG states) is stored as
plain tensors, lists and numbers, so it passes this check (numpy's RNG state as a numpy array would not).

Checkpoints written by mvptr_ds also carry a manifest (file name -> size) in their ``COMPLETE`` marker; a
truncated or missing file is reported from it before anything is unpickled.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

import torch

from mvptr_ds.config import ConfigError


def allowed_globals() -> List[type]:
    """DeepSpeed record types that its ZeRO optimizer state files hold (plain data, no code on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_GLOBAL = re.compile(r"GLOBAL ([\w\.]+)")


def safe_torch_load(path: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with :func:`allowed_globals`; ConfigError naming the file."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except Exception as e:  # UnpicklingError for disallowed globals, RuntimeError/EOFError for truncated files
        text = str(e)
        found = _GLOBAL.search(text)
        if found or "weights_only" in text.lower() or "WeightsUnpickler" in text:
            what = found.group(1) if found else "an object type outside the allow list"
            raise ConfigError(f"{path}: refusing to load: the file holds pickled {what}, which could run code "
                              f"(only tensors and plain data are accepted)") from None
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {first_line(text)}); the file is "
                          f"truncated or corrupted") from None


def first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


def check_manifest(path: str, manifest: Optional[Dict[str, int]]) -> None:
    """Every file listed in ``manifest`` (name -> size in bytes) exists in ``path`` with that size."""
    for name, size in sorted((manifest or {}).items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ConfigError(f"{file}: missing (listed in the checkpoint's {os.path.basename(path)}/COMPLETE manifest)")
        actual = os.path.getsize(file)
        if actual != size:
            raise ConfigError(f"{file}: truncated or modified ({actual} bytes, {size} when the checkpoint was saved)")


def checkpoint_files(path: str) -> List[str]:
    """The ``.pt`` files of one checkpoint directory (top level and the ``universal/zero`` tree), sorted."""
    out = []
    for dirpath, _, names in os.walk(path):
        out += [os.path.join(dirpath, n) for n in names if n.endswith(".pt")]
    return sorted(out)


def verify_checkpoint_files(path: str, manifest: Optional[Dict[str, int]], shard: int = 0, num_shards: int = 1) -> None:
    """Check sizes against ``manifest`` and safe-load this caller's share of the ``.pt`` files.

    ``shard``/``num_shards`` split the files between ranks (each file is read by one rank); every rank must
    then agree on the outcome (see ``checkpoint.verify``). Raises ConfigError naming the first bad file.
    """
    check_manifest(path, manifest)
    files = checkpoint_files(path)
    if not files:
        raise ConfigError(f"{path}: no checkpoint files (*.pt) in this directory")
    for file in files[shard::num_shards]:
        safe_torch_load(file)
