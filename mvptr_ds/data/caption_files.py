"""Readers for the text-side files (MVPTR.md section 5): captions and the concept vocabulary.

* captions: a JSON list or JSONL of ``{"image_id", "caption", "phrases": [[elem, ...], ...]}``
  (``phrases`` optional: SPICE-style tuples of 1 to 3 elements).
* ``id2phrase.json``: ``{"id": [element, ...]}``; ids are kept exactly as released.

As in :mod:`mvptr_ds.data.readers` (the feature and detector files), every malformed row raises
:class:`DataError` naming the file, the line and the field; image ids are strings everywhere.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mvptr_ds.files import atomic_write_json

from .readers import DataError, open_data_file, read_json_no_dup


# ---------------------------------------------------------------- captions

def validate_caption(rec, path, line: int) -> Tuple[str, str, Optional[List[Tuple[str, ...]]]]:
    """Check one caption record; returns ``(image_id, caption, phrases or None)``."""
    if not isinstance(rec, dict):
        raise DataError(path, "a caption record must be a JSON object", line, "record", "line")
    if "image_id" not in rec or isinstance(rec["image_id"], (bool, list, dict)) or rec["image_id"] is None:
        raise DataError(path, "missing or invalid image id", line, "image_id", "line")
    image_id = str(rec["image_id"]).strip()
    if not image_id:
        raise DataError(path, "empty image id", line, "image_id", "line")
    cap = rec.get("caption")
    if not isinstance(cap, str):
        raise DataError(path, "missing caption text", line, "caption", "line")
    if not cap.strip():
        raise DataError(path, "empty caption", line, "caption", "line")
    phrases = rec.get("phrases")
    if phrases is None:
        return image_id, cap, None
    if not isinstance(phrases, list):
        raise DataError(path, "'phrases' must be a list of tuples", line, "phrases", "line")
    out = []
    for k, t in enumerate(phrases):
        if (not isinstance(t, list) or not 1 <= len(t) <= 3
                or not all(isinstance(e, str) and e.strip() for e in t)):
            raise DataError(path, f"tuple {t!r} is not a list of 1 to 3 non-empty strings", line,
                            f"phrases[{k}]", "line")
        out.append(tuple(e.strip().lower() for e in t))
    return image_id, cap, out


def example_image_ids(keys: Sequence[str]) -> np.ndarray:
    """``Example.image_id`` of each (sorted, distinct) image id of the files: the integer itself when every id is
    a decimal integer (COCO, Flickr30k), else the id's rank; int64 ``[len(keys)]``."""
    numeric = all(k.isdigit() for k in keys)
    return np.asarray([int(k) for k in keys] if numeric else range(len(keys)), dtype=np.int64)


class CaptionIndex:
    """Captions as a compact index: one byte offset and one image id per caption.

    JSONL (one record per line) is read lazily: ``index[i]`` seeks to the line and parses it. A JSON list
    file is parsed once and kept in memory (convert it to JSONL for large corpora). Every record is
    validated when the index is built (malformed JSON, missing fields, empty captions raise
    :class:`DataError` with file and line); ``check(line, image_id, caption, phrases)``, when given, is
    called on each record then (e.g. to count tuples missing from a vocabulary).
    """

    def __init__(self, path: str, check: Optional[Callable] = None):
        self.path = str(path)
        self._records: Optional[list] = None
        self._fh, self._pid = None, None
        with open_data_file(self.path) as f:
            first = f.read(4096).lstrip()
        if first.startswith(b"["):
            data = read_json_no_dup(self.path)
            self._records = [validate_caption(r, self.path, i + 1) for i, r in enumerate(data)]
            for i, r in enumerate(self._records if check else []):
                check(i + 1, *r)
            self.offsets = np.arange(len(data), dtype=np.int64)
            self.lines = np.arange(1, len(data) + 1, dtype=np.int64)
            ids = [r[0] for r in self._records]
        else:
            offsets, lines, ids = [], [], []
            pos = 0
            with open(self.path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    if raw.strip():
                        rec = validate_caption(self._parse(raw, n), self.path, n)
                        if check:
                            check(n, *rec)
                        ids.append(rec[0])
                        offsets.append(pos)
                        lines.append(n)
                    pos += len(raw)
            self.offsets = np.asarray(offsets, dtype=np.int64)
            self.lines = np.asarray(lines, dtype=np.int64)
        uniq, inverse = np.unique(np.array([i.encode("utf-8") for i in ids], dtype=bytes)
                                  if ids else np.zeros(0, "S1"), return_inverse=True)
        self.image_keys = uniq                           # sorted distinct image ids (bytes)
        self.image_of = inverse.astype(np.int64)         # [num_captions] index into image_keys

    def _parse(self, raw: bytes, line: int):
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise DataError(self.path, f"malformed JSON: {msg}", line, "json", "line") from None

    def __len__(self) -> int:
        return len(self.offsets)

    def image_id(self, i: int) -> str:
        return self.image_keys[self.image_of[i]].decode("utf-8")

    def __getitem__(self, i: int) -> Tuple[str, str, Optional[List[Tuple[str, ...]]]]:
        """``(image_id, caption, phrases or None)`` of caption ``i`` (0-based)."""
        if self._records is not None:
            return self._records[i]
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(int(self.offsets[i]))
        line = int(self.lines[i])
        return validate_caption(self._parse(self._fh.readline(), line), self.path, line)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"] = None
        return state


# ---------------------------------------------------------------- id2phrase.json

@dataclass
class ConceptVocab:
    """A concept vocabulary: ids and tuples exactly as in the file, and the reverse lookup
    (tuple elements stripped and lower-cased) -> id."""

    path: str
    id_to_tuple: Dict[int, Tuple[str, ...]]
    tuple_to_id: Dict[Tuple[str, ...], int] = field(default_factory=dict)

    def __post_init__(self):
        if not self.tuple_to_id:
            self.tuple_to_id = {tuple(e.strip().lower() for e in t): i for i, t in self.id_to_tuple.items()}

    def __len__(self) -> int:
        return len(self.id_to_tuple)

    def lookup(self, tup: Sequence[str]) -> Optional[int]:
        """Id of a tuple (elements compared lower-cased and stripped), or None."""
        return self.tuple_to_id.get(tuple(e.strip().lower() for e in tup))

    def max_id(self) -> int:
        return max(self.id_to_tuple) if self.id_to_tuple else -1


def read_id2phrase(path: str) -> ConceptVocab:
    """Read ``id2phrase.json`` (``{"id": [element, ...]}``) into a :class:`ConceptVocab`.

    Ids must be non-negative integers (kept as released); tuples 1 to 3 non-empty strings, each
    appearing once (a tuple listed under two ids is an error naming both).
    """
    data = read_json_no_dup(str(path))
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object {id: [element, ...]}", field="json")
    id_to_tuple: Dict[int, Tuple[str, ...]] = {}
    tuple_to_id: Dict[Tuple[str, ...], int] = {}
    for k, v in data.items():
        try:
            cid = int(k)
        except ValueError:
            raise DataError(path, f"concept id {k!r} is not an integer", field=k) from None
        if cid < 0:
            raise DataError(path, f"negative concept id {cid}", field=k)
        if (not isinstance(v, list) or not 1 <= len(v) <= 3
                or not all(isinstance(e, str) and e.strip() for e in v)):
            raise DataError(path, f"{v!r} is not a list of 1 to 3 non-empty strings", field=k)
        tup = tuple(e.strip().lower() for e in v)
        if tup in tuple_to_id:
            raise DataError(path, f"tuple {list(tup)} already has id {tuple_to_id[tup]}", field=k)
        id_to_tuple[cid] = tuple(v)      # exactly as released
        tuple_to_id[tup] = cid
    return ConceptVocab(str(path), id_to_tuple, tuple_to_id)


def write_id2phrase(path: str, id_to_tuple: Dict[int, Sequence[str]]) -> None:
    """Write ``{"id": [element, ...]}`` sorted by id, atomically."""
    atomic_write_json(path, {str(i): list(id_to_tuple[i]) for i in sorted(id_to_tuple)}, indent=None, sort_keys=False)
