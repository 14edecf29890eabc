"""Small files written whole or not at all. Standard library only (every layer may use it).

A file is written to ``<path>.tmp<pid>``, flushed to disk and renamed over ``path``: a reader sees the old file
or the new one, never half of one, and a writer killed in between leaves only its ``.tmp<pid>`` (which
``training.cleanup`` sweeps from run folders).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically; parent folders are created."""
    atomic_write_lines(path, [text])


def atomic_write_lines(path: str, lines: Iterable[str]) -> None:
    """Replace ``path`` by the concatenation of ``lines`` atomically (streamed; parent folders are created)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj: Any, indent: int = 2, sort_keys: bool = True) -> None:
    """``obj`` as JSON (and a final newline) in ``path``, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
