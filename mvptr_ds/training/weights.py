"""The project's portable checkpoint: ``<dir>/model.safetensors`` + ``<dir>/config.json``.

This is what ``final/`` holds after training, what ``convert_original`` writes and what evaluation and
fine-tuning read. (Resumable training state lives in DeepSpeed checkpoints; see ``checkpoint.py``.)
Both files are written atomically, so a crash never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Dict, Tuple

import torch
from safetensors.torch import load_file, save_file

from mvptr_ds.config import PROVENANCE_KEY, ConfigError, RunConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_weights(directory: str, state_dict: Dict[str, torch.Tensor], config: RunConfig) -> None:
    """``model.safetensors`` and ``config.json`` (the config, plus :func:`provenance` under ``"mvptr_ds"``)."""
    from mvptr_ds.files import atomic_write_json

    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tmp = os.path.join(directory, f".{WEIGHTS_NAME}.tmp{os.getpid()}")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its file 0600; every other file follows the umask
    os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
    atomic_write_json(os.path.join(directory, CONFIG_NAME), {**config.to_dict(), PROVENANCE_KEY: provenance()})


def save_final(directory: str, state_dict: Dict[str, torch.Tensor], config: RunConfig) -> None:
    """A self-contained model folder (``<run>/final``): :func:`save_weights` plus the tokenizer and concept
    vocabulary of the training data (``tokenizer/``, ``id2phrase.json``); ``mvptr_ds.from_pretrained`` reads it."""
    from mvptr_ds.data.export import write_vocabulary

    save_weights(directory, state_dict, config)
    write_vocabulary(directory, config.data)


def provenance() -> Dict[str, Any]:
    """What wrote a model folder: ``version``, and in a git checkout ``git_commit`` and ``git_dirty``."""
    import subprocess

    from mvptr_ds.version import __version__

    out: Dict[str, Any] = {"version": __version__}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above mvptr_ds/
    if os.path.exists(os.path.join(root, ".git")):  # this package's own checkout, not a folder around an install
        try:
            git = ["git", "-C", root]
            out["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                               check=True, timeout=30).stdout.strip()
            out["git_dirty"] = bool(subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                                   capture_output=True, text=True, check=True, timeout=30).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass  # no git on this machine: the version alone
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def read_model_weights(path: str, option: str) -> Tuple[Dict[str, torch.Tensor], RunConfig, str]:
    """(fp32 state dict, config, the directory read) of any model the project wrote: the one reading path.

    ``path``: a portable export (``model.safetensors`` + ``config.json``), a run directory with a ``final/``
    one, or a DeepSpeed training checkpoint (a ``step<N>`` directory, or a run / ``checkpoints`` directory:
    its newest complete one). A training checkpoint is verified first (manifest sizes and SHA-256, every
    file safe-loaded; collective when a process group exists) and consolidated to fp32 with every
    ``torch.load`` forced to weights-only. ``option`` names the flag in errors (``--init_from``, ...).
    """
    from mvptr_ds.training import checkpoint
    from mvptr_ds.training.safe_load import refusal

    if not os.path.isdir(path):
        raise ConfigError(f"{option} {path}: no such directory")
    for candidate in (path, os.path.join(path, "final")):
        if os.path.isfile(os.path.join(candidate, WEIGHTS_NAME)):
            state, cfg = load_weights(candidate)
            return state, cfg, candidate
    try:
        step_dir = checkpoint.resolve_resume(path, path)
    except ConfigError as e:
        raise ConfigError(f"{option} {path}: neither a {WEIGHTS_NAME} export nor a training checkpoint "
                          f"({e})") from None
    if step_dir is None:
        raise ConfigError(f"{option} {path}: no {WEIGHTS_NAME} and no complete training checkpoint there")
    meta = checkpoint.verify(step_dir)
    cfg = RunConfig.load(os.path.join(step_dir, CONFIG_NAME))
    if not glob.glob(os.path.join(step_dir, "*optim_states.pt")):  # ZeRO stage 0 (e.g. one process)
        return _stage0_weights(step_dir, meta), cfg, step_dir
    try:
        state = checkpoint.zero_fp32_state_dict(step_dir)
    except Exception as e:
        refused = refusal(step_dir, e)
        if refused is not None:
            raise refused from None
        raise ConfigError(f"{option} {step_dir}: cannot be consolidated ({type(e).__name__}: {e})") from None
    return state, cfg, step_dir


def _stage0_weights(step_dir: str, meta: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO stage-0 checkpoint (verified first): the module state in its model-states file.

    fp32 runs keep the weights themselves in fp32 there; a bf16/fp16 stage-0 run is refused (its fp32 master
    copy lives in the optimizer state, which this reader does not unpack).
    """
    from mvptr_ds.training.safe_load import safe_torch_load

    file = os.path.join(step_dir, "mp_rank_00_model_states.pt")
    module = safe_torch_load(file).get("module")
    if not isinstance(module, dict) or not module:
        raise ConfigError(f"{file}: no module weights in this checkpoint")
    low = sorted({str(v.dtype) for v in module.values() if isinstance(v, torch.Tensor) and v.dtype != torch.float32})
    if low:
        raise ConfigError(f"{file}: weights stored in {', '.join(low)} at ZeRO stage 0 (the fp32 master copy is in "
                          f"the optimizer state); read the run's final/ export instead")
    return {k: v for k, v in module.items() if isinstance(v, torch.Tensor)}
