"""Resumable, crash-safe training checkpoints on top of DeepSpeed's engine checkpointing.

Layout: ``<output_dir>/checkpoints/step<N>/`` written by ``engine.save_checkpoint`` on every rank (model,
optimizer shards, scheduler), plus our ``train_state`` (step, data-loader position, every rank's RNG
states, the resolved config) in the engine's ``client_state``. After every rank has finished writing (and
fsynced, ``writes``), rank 0 writes ``step<N>/config.json``, then ``step<N>/COMPLETE`` atomically (write, fsync,
rename), then ``latest``. ``COMPLETE`` is a JSON manifest: step, world size, ZeRO stage and the size and
SHA-256 of every file. Only checkpoints with that marker are ever resumed from, so a process killed at any
moment (in the middle of a save included) leaves the previous checkpoint as the newest usable one. Pruning
renames a directory out of the ``step<N>`` name space before deleting it, so a kill during pruning never
leaves a half-deleted "complete" checkpoint.

Loading verifies the manifest (sizes, hashes) and reads every file with ``weights_only=True`` first
(``safe_load``), checks that the checkpoint's model matches this run's, and only then lets DeepSpeed read
it, with every ``torch.load`` forced to weights-only (``safe_load.weights_only_loads``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from mvptr_ds.config import ConfigError, RunConfig
from mvptr_ds.config_types import read_json
from mvptr_ds.files import atomic_write_json, atomic_write_text
from mvptr_ds.training import distributed, writes
from mvptr_ds.training.safe_load import (first_line, manifest_entry, refusal, verify_checkpoint_files,
                                         weights_only_loads)

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step(\d+)$")
# Model settings that do not change the parameters: may differ between a checkpoint and the resumed run.
_MODEL_KEYS_FREE = ("kernels", "activation_checkpointing", "hidden_dropout", "attention_dropout")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as plain tensors and numbers (loadable with ``weights_only=True``)."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": torch.tensor(py_state, dtype=torch.int64), "python_version": int(version),
             "python_gauss": gauss, "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_gauss": [int(has_gauss), float(cached)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (also accepts the older tuple form)."""
    if isinstance(state["python"], torch.Tensor):
        random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
        has_gauss, cached = state["numpy_gauss"]
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                             int(has_gauss), float(cached)))
    else:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states() -> List[Dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a collective: call on every rank)."""
    mine = rng_state()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def read_marker(path: str) -> Dict[str, Any]:
    """The ``COMPLETE`` marker of a checkpoint directory (a JSON object; anything else is refused)."""
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{os.path.join(path, COMPLETE)}: missing; the checkpoint is incomplete "
                          f"(its save was interrupted)") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise ConfigError(f"{os.path.join(path, COMPLETE)}: not a JSON object (the marker this version writes); "
                          f"refusing to read the checkpoint")
    return meta


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


def check_output_dir(output_dir: str) -> None:
    """ConfigError when ``output_dir`` (the run folder) exists but is not a directory."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir}: exists and is not a directory; give a new or existing run folder")


def resolve_resume(resume: str, output_dir: str) -> Optional[str]:
    """The checkpoint directory (``.../step<N>``) to resume from, or None to start fresh.

    ``auto``: the newest complete checkpoint of this run, if any. ``none``: start fresh. A path: either a
    ``step<N>`` directory or a ``checkpoints`` root / run directory holding some. The ``latest`` file is not
    needed: the ``COMPLETE`` markers decide (a save interrupted before its marker is not a candidate).
    ``output_dir`` is checked first (:func:`check_output_dir`): this runs before anything is written.
    """
    check_output_dir(output_dir)
    if resume in (None, "", "none", "None"):
        found = complete_checkpoints(checkpoint_root(output_dir))
        if found:
            raise ConfigError(f"--resume none, but {checkpoint_root(output_dir)} holds checkpoints of an earlier run "
                              f"(newest step{found[-1][0]}): continue it with --resume auto, or use a new --output_dir")
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
        raise ConfigError(f"{os.path.join(path, COMPLETE)}: missing; the checkpoint is incomplete "
                          f"(its save was interrupted); resume from an older step<N> directory")
    for root in (path, checkpoint_root(path)):
        if os.path.isdir(root) and not os.path.isfile(os.path.join(root, "latest")):
            raise ConfigError(f"{os.path.join(root, 'latest')}: missing, and no complete step<N> checkpoint "
                              f"in {root}: nothing to resume from")
    raise ConfigError(f"--resume {resume}: no complete checkpoint found there (no step<N>/{COMPLETE})")


def save(engine, output_dir: str, step: int, train_state: Dict[str, Any], config: RunConfig, keep_last: int,
         fault_hook=None) -> str:
    """Save on every rank (DeepSpeed requires it), mark complete, then prune to the newest ``keep_last``.

    ``train_state["rng"]`` should hold :func:`all_rng_states` (every rank's). ``fault_hook(stage)`` is the
    test hook of ``faults.FaultPlan`` (``"before"``, ``"after"``), None in normal runs. A write that fails on
    any rank (a full disk, ...) stops every rank with one :class:`writes.CheckpointWriteError` naming the
    problem and the checkpoint that remains usable; the incomplete one is removed (its space freed).
    """
    root = checkpoint_root(output_dir)
    tag = f"step{step}"
    path = os.path.join(root, tag)
    main = engine.global_rank == 0
    if main and os.path.isdir(path):
        _remove(root, path)  # an incomplete leftover of a killed save of the same step
    distributed.barrier()
    if fault_hook is not None:
        fault_hook("before")

    def write_files():
        with writes.deferred_errors(engine):
            # "latest" is written below, once the checkpoint is complete (DeepSpeed's names an unfinished save)
            engine.save_checkpoint(root, tag=tag, client_state={"train_state": train_state}, save_latest=False)

    failure = writes.agree_failure(writes.attempt(write_files))
    if failure is None:
        if fault_hook is not None:
            fault_hook("after")
        failure = writes.agree_failure(writes.attempt(lambda: config.dump(os.path.join(path, "config.json")))
                                       if main else None)
    if failure is None:
        files = _hash_files(path)

        def mark_complete():
            meta = {"step": step, "world_size": engine.world_size, "zero_stage": engine.zero_optimization_stage(),
                    "files": files}
            atomic_write_json(os.path.join(path, COMPLETE), meta, indent=1)
            atomic_write_text(os.path.join(root, "latest"), tag)
            prune(root, keep_last, step)
        failure = writes.agree_failure(writes.attempt(mark_complete) if main else None)
    if failure is not None:
        if main and os.path.isdir(path) and not os.path.isfile(os.path.join(path, COMPLETE)):
            _remove(root, path)
        distributed.barrier()
        raise writes.CheckpointWriteError(_write_failure(root, path, step, failure, engine.world_size))
    distributed.barrier()
    return path


def _write_failure(root: str, path: str, step: int, failure, world_size: int) -> str:
    """The one line for a failed save: what went wrong, and which checkpoint remains usable."""
    if os.path.isfile(os.path.join(path, COMPLETE)):  # only "latest" or pruning failed: the new one is usable
        usable = f"{path} is complete and usable"
    else:
        older = [p for s, p in complete_checkpoints(root) if s < step]
        usable = "the incomplete checkpoint was removed; " + (
            f"{older[-1]} remains the newest complete checkpoint" if older
            else "there is no complete checkpoint yet (a rerun starts from step 0)")
    fix = "free space" if writes.is_full(failure) else "fix that"
    return (f"cannot write checkpoint {path}: {writes.describe(failure, world_size)}; {usable}: {fix}, then "
            f"continue with --resume auto")


def _hash_files(path: str) -> Dict[str, Dict[str, Any]]:
    """Manifest entries (size, SHA-256) of every file in ``path``, hashed in shares by the ranks. Collective."""
    names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)) and not n.startswith("."))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {n: manifest_entry(os.path.join(path, n)) for n in names[rank::world]}
    if world == 1:
        return mine
    shares: List[Any] = [None] * world
    dist.all_gather_object(shares, mine)
    return {n: e for share in shares for n, e in share.items()}


def prune(root: str, keep_last: int, upto: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints up to step ``upto``, and incomplete ones
    older than those (newer ones are never touched)."""
    complete = [(s, p) for s, p in complete_checkpoints(root) if s <= upto]
    drop = {p for _, p in complete[:-keep_last]}
    oldest_kept = complete[-keep_last:][0][0] if complete else -1
    for name in os.listdir(root):
        m = _TAG.match(name)
        path = os.path.join(root, name)
        if m and (path in drop or (int(m.group(1)) < oldest_kept and not os.path.isfile(os.path.join(path, COMPLETE)))):
            _remove(root, path)
    for name in os.listdir(root):  # leftovers of a removal that was killed
        if name.startswith(".removing-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _remove(root: str, path: str) -> None:
    trash = os.path.join(root, f".removing-{os.path.basename(path)}-{os.getpid()}")
    os.replace(path, trash)  # atomic: the step<N> name disappears first
    shutil.rmtree(trash, ignore_errors=True)


def verify(path: str) -> Dict[str, Any]:
    """Check a checkpoint before loading it: manifest sizes and hashes, safe unpickling of every file.

    Collective when a process group exists: the files are split between ranks, and a problem found on any
    rank is raised on every rank (no rank is left waiting in a collective). Returns the ``COMPLETE`` manifest.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    error = None
    meta: Dict[str, Any] = {}
    try:
        meta = read_marker(path)
        verify_checkpoint_files(path, meta.get("files"), shard=rank, num_shards=world)
    except ConfigError as e:
        error = str(e)
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    for e in errors:
        if e is not None:
            raise ConfigError(e)
    return meta


def check_compatible(path: str, cfg: RunConfig) -> None:
    """The checkpoint's model (``step<N>/config.json``) has the same parameters as this run's, else ConfigError."""
    file = os.path.join(path, "config.json")
    saved = read_json(file, file, " (every mvptr_ds checkpoint has one)")
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ConfigError(f"{file}: no model section; not an mvptr_ds checkpoint config")
    now = cfg.to_dict()
    for key, value in sorted(now["model"].items()):
        if key not in _MODEL_KEYS_FREE and saved["model"].get(key) != value:
            raise ConfigError(f"{file}: model.{key}={saved['model'].get(key)!r} in the checkpoint, {value!r} in this "
                              f"run; resume with the checkpoint's model settings (or start fresh with --init_from)")
    saved_train = saved.get("train", {})
    if saved_train.get("stage", now["train"]["stage"]) != now["train"]["stage"]:
        raise ConfigError(f"{file}: train.stage={saved_train.get('stage')} in the checkpoint, "
                          f"{now['train']['stage']} in this run; use --init_from to change stage")
    saved_names = tuple((saved.get("objectives") or {}).get("names") or ())
    if saved_names and tuple(cfg.objective_names) != saved_names:
        raise ConfigError(f"{file}: objectives {','.join(saved_names)} in the checkpoint, "
                          f"{','.join(cfg.objective_names)} in this run (different heads); use --init_from")
    saved_prior = bool((saved.get("objectives") or {}).get("itm_prior", False))
    if saved_prior != cfg.objectives.itm_prior:  # the ITM head means another score with and without it
        raise ConfigError(f"{file}: objectives.itm_prior={saved_prior} in the checkpoint, {cfg.objectives.itm_prior} "
                          "in this run (the ITM head was trained for the other score); resume with the checkpoint's "
                          "setting or start fresh with --init_from")


def load(engine, path: str, tag: Optional[str] = None) -> Dict[str, Any]:
    """Restore engine (model, optimizer, scheduler) from ``path`` and return our ``train_state``.

    ``tag`` loads ``<path>/<tag>`` instead (the universal form of an elastic resume lives in
    ``step<N>/universal``). Call :func:`verify` first: DeepSpeed itself unpickles without restrictions.
    """
    root, name = (path, tag) if tag else os.path.split(path.rstrip("/"))
    try:
        with weights_only_loads():
            load_path, client_state = engine.load_checkpoint(root, tag=name, load_optimizer_states=True,
                                                             load_lr_scheduler_states=True)
    except Exception as e:  # DeepSpeed raises assorted errors for missing/truncated shards
        refused = refusal(path, e)
        if refused is not None:
            raise refused from None
        raise ConfigError(f"checkpoint {path}: cannot be loaded ({type(e).__name__}: {first_line(str(e))})") from None
    if load_path is None or client_state is None or "train_state" not in client_state:
        raise ConfigError(f"checkpoint {path}: no training state found (not written by mvptr_ds?)")
    return client_state["train_state"]


def _count(value: Any) -> Optional[int]:
    """``value`` as a count (an int >= 0, a 0-d integer tensor included), else None."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        return None
    return int(value)


def restore_train_state(state: Any, path: str, loader) -> Tuple[int, int]:
    """Check the ``train_state`` fields a resume reads, restore ``loader``'s position, return
    ``(step, skipped_batches)``.

    Every problem is one ConfigError naming the checkpoint and the field: ``step`` not a count, a
    ``skipped_batches`` that is not one, a ``loader`` position that is malformed or lies past the end of this
    run's data (the checkpoint was made on other, larger data), ``rng`` not a list of per-rank states.
    """
    where = f"checkpoint {path}: train_state"
    if not isinstance(state, dict):
        raise ConfigError(f"{where} is a {type(state).__name__}, not a mapping (not written by mvptr_ds?)")
    step = _count(state.get("step"))
    if step is None:
        raise ConfigError(f"{where} field 'step' must be an integer >= 0, got {state.get('step')!r:.60}")
    skipped = _count(state.get("skipped_batches", 0))
    if skipped is None:
        raise ConfigError(f"{where} field 'skipped_batches' must be an integer >= 0, got "
                          f"{state.get('skipped_batches')!r:.60}")
    rng = state.get("rng")
    if not (isinstance(rng, (list, tuple)) and rng and all(isinstance(r, dict) for r in rng)):
        raise ConfigError(f"{where} field 'rng' must be a list of per-rank RNG states, got {type(rng).__name__}")
    saved = state.get("loader")
    if not isinstance(saved, dict) or any(_count(saved.get(k)) is None for k in ("epoch", "position")):
        raise ConfigError(f"{where} field 'loader' must be {{'epoch': int >= 0, 'position': int >= 0}}, "
                          f"got {saved!r:.80}")
    try:
        loader.load_state_dict(saved)
    except ValueError as e:
        raise ConfigError(f"{where} field 'loader': {e}") from None
    return step, skipped


def zero_fp32_state_dict(step_dir: str) -> Dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO checkpoint folder (``step<N>``), rebuilt by DeepSpeed's ``zero_to_fp32`` with
    every ``torch.load`` weights-only. Its progress prints ("Processing zero checkpoint", a progress bar, "Detected
    checkpoint of type ...") are kept out of the run's log; a failure is raised as it is."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.split(step_dir.rstrip("/"))
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), weights_only_loads():
        return dict(get_fp32_state_dict_from_zero_checkpoint(root, tag=tag))


def consolidated_state_dict(engine, checkpoint_path: Optional[str]) -> Dict[str, torch.Tensor]:
    """fp32 weights of the whole model, gathered from any ZeRO stage. Call on every rank; result on rank 0.

    With ZeRO the fp32 master weights live in the (sharded) optimizer state, so they are rebuilt from the
    checkpoint just written (:func:`zero_fp32_state_dict`).
    """
    distributed.barrier()
    state: Dict[str, torch.Tensor] = {}
    if engine.global_rank == 0:
        if engine.zero_optimization_stage() > 0 and checkpoint_path is not None:
            state = zero_fp32_state_dict(checkpoint_path)
        else:
            state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    distributed.barrier()
    return state
