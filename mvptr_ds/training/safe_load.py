"""Reading checkpoint files without executing pickled code from them, and checking their content first.

Two independent guards, used by every path that reads a ``.pt`` file (resume, ``--init_from``, evaluate,
embed, fine-tuning, elastic conversion, export):

* :func:`weights_only_loads` forces ``torch.load(weights_only=True)`` for every call made inside it, DeepSpeed's
  own included (DeepSpeed 0.19.8 passes ``weights_only=False`` in its checkpoint engine, ``zero_to_fp32`` and
  the universal-checkpoint code; torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that at each call). Only
  tensors, containers, numbers, strings and the DeepSpeed record types of :func:`allowed_globals` unpickle;
  anything else raises before any code runs.
* The ``COMPLETE`` manifest of a checkpoint lists every file with its size and SHA-256. :func:`check_manifest`
  verifies them (names confined to the checkpoint folder, no links) before anything is unpickled, so a
  truncated, flipped or swapped file is one error naming it. :func:`verify_checkpoint_files` then safe-loads
  every ``.pt`` file, so a refused object is reported by name before DeepSpeed opens the checkpoint.

Our own ``train_state`` (loader position, RNG states) is stored as plain tensors, lists and numbers.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch

from mvptr_ds.config import ConfigError

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_GLOBAL = re.compile(r"GLOBAL ([\w\.]+)")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def allowed_globals() -> List[type]:
    """DeepSpeed record types that its ZeRO optimizer state files hold (plain data, no code on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only (whatever its caller passes), with :func:`allowed_globals`."""
    before = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = before


def refusal(path: str, error: BaseException) -> Optional[ConfigError]:
    """The one-line error for a weights-only refusal of ``path``, or None when ``error`` is something else."""
    text = str(error)
    found = _GLOBAL.search(text)
    if found or "weights_only" in text.lower() or "WeightsUnpickler" in text:
        what = found.group(1) if found else "an object type outside the allow list"
        return ConfigError(f"{path}: refusing to load: the file holds pickled {what}, which could run code "
                           f"(only tensors and plain data are accepted)")
    return None


def safe_torch_load(path: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with :func:`allowed_globals`; ConfigError naming the file."""
    try:
        with weights_only_loads():
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except Exception as e:  # UnpicklingError for disallowed globals, RuntimeError/EOFError for truncated files
        refused = refusal(path, e)
        if refused is not None:
            raise refused from None
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {first_line(str(e))}); the file is "
                          f"truncated or corrupted") from None


def first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_entry(path: str) -> Dict[str, Any]:
    """What the ``COMPLETE`` manifest records of one file: ``{"size": bytes, "sha256": hex}``."""
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def _confined(folder: str, name: Any, marker: str) -> str:
    """``folder/name`` for a manifest name that stays inside ``folder`` and is no link; else ConfigError."""
    if (not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name)
            or ".." in name.replace("\\", "/").split("/")):
        raise ConfigError(f"{marker}: file name {name!r} in the manifest leaves the checkpoint folder")
    file = os.path.join(folder, name)
    if os.path.islink(file) or not os.path.realpath(file).startswith(os.path.realpath(folder) + os.sep):
        raise ConfigError(f"{file}: a link or outside the checkpoint folder; refusing to read it")
    return file


def check_manifest(path: str, manifest: Any, shard: int = 0, num_shards: int = 1) -> None:
    """Every file the manifest lists exists in ``path`` with its size, and (this caller's share) its SHA-256.

    ``manifest``: name -> ``{"size", "sha256"}``. Every ``.pt`` file of the checkpoint must be listed. Raises
    ConfigError naming the file (a marker without a manifest, or with sizes only, is refused: nothing could
    tell its files from tampered ones).
    """
    marker = os.path.join(path, "COMPLETE")
    if manifest is None:
        raise ConfigError(f"{marker}: no file manifest (field 'files'): the checkpoint's files cannot be checked; "
                          f"refusing to read it")
    if not isinstance(manifest, Mapping):
        raise ConfigError(f"{marker}: field 'files' must map file names to sizes and hashes, "
                          f"not {type(manifest).__name__}")
    for i, (name, entry) in enumerate(sorted(manifest.items(), key=lambda kv: str(kv[0]))):
        file = _confined(path, name, marker)
        if (isinstance(entry, Mapping) and isinstance(entry.get("size"), int) and not isinstance(entry["size"], bool)
              and isinstance(entry.get("sha256"), str) and _HEX64.match(entry["sha256"])):
            size, digest = entry["size"], entry["sha256"]
        else:
            raise ConfigError(f"{marker}: field 'files'[{name!r}] must be {{\"size\": bytes, \"sha256\": hex}}, "
                              f"got {entry!r:.80}")
        if not os.path.isfile(file):
            raise ConfigError(f"{file}: missing (listed in the checkpoint's {os.path.basename(path)}/COMPLETE manifest)")
        actual = os.path.getsize(file)
        if actual != size:
            raise ConfigError(f"{file}: truncated or modified ({actual} bytes, {size} when the checkpoint was saved)")
        if i % num_shards == shard and sha256_file(file) != digest:
            raise ConfigError(f"{file}: modified since the checkpoint was saved (SHA-256 differs from the "
                              f"COMPLETE manifest's)")
    listed = {os.path.normpath(str(n)) for n in manifest}
    for file in checkpoint_files(path):
        name = os.path.relpath(file, path)
        if name.split(os.sep)[0] != "universal" and name not in listed:
            raise ConfigError(f"{file}: not listed in the checkpoint's COMPLETE manifest; refusing to read it")


def checkpoint_files(path: str) -> List[str]:
    """The ``.pt`` files of one checkpoint directory (top level and the ``universal/zero`` tree), sorted."""
    out = []
    for dirpath, _, names in os.walk(path):
        out += [os.path.join(dirpath, n) for n in names if n.endswith(".pt")]
    return sorted(out)


def verify_checkpoint_files(path: str, manifest: Any, shard: int = 0, num_shards: int = 1) -> None:
    """Check sizes and hashes against ``manifest`` and safe-load this caller's share of the ``.pt`` files.

    ``shard``/``num_shards`` split the hashing and loading between ranks (each file is read by one rank);
    every rank must then agree on the outcome (see ``checkpoint.verify``). Raises ConfigError naming the
    first bad file.
    """
    check_manifest(path, manifest, shard, num_shards)
    files = checkpoint_files(path)
    if not files:
        raise ConfigError(f"{path}: no checkpoint files (*.pt) in this directory")
    for file in files[shard::num_shards]:
        if os.path.islink(file):
            raise ConfigError(f"{file}: a link; refusing to read it")
        safe_torch_load(file)
