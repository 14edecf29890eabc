"""Readers for the data formats MVPTR users already have (MVPTR.md section 5).

* ``features.tsv``: rows ``image_id \\t num_boxes \\t base64(float32[num_boxes x 2054])``, with
  ``features.lineidx`` (byte offset of each row, one per line) and optionally ``imageid2idx.json``
  (``{image_id: row}``).
* ``predictions.tsv``: rows ``image_id \\t json{"objects": [{"class", "rect", "conf", ..}], "image_h", "image_w"}``.
* captions and ``id2phrase.json``: :mod:`mvptr_ds.data.caption_files`.

Nothing is silently dropped: every malformed row raises :class:`DataError`, whose message names the
file, the row or line (1-based) and the field. Image ids are strings everywhere.
Indices over large files are compact numpy arrays (byte offsets, sorted ids), so a process can address
millions of rows without holding them as Python objects.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mvptr_ds.files import atomic_write_lines

FEATURE_DIM = 2054


class DataError(ValueError):
    """A data file is malformed; the message names the file, the row/line and the field."""

    def __init__(self, path, message: str, row: Optional[int] = None, field: Optional[str] = None,
                 unit: str = "row"):
        where = str(path)
        if row is not None:
            where += f", {unit} {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.row, self.field = str(path), row, field

    def __str__(self) -> str:  # a subclass that is also a KeyError must not quote the message
        return self.args[0]


class MissingImageError(DataError, KeyError):
    """An image id is not in a feature store or tag file."""


def open_data_file(path):
    """``open(path, "rb")``; a missing or unreadable file is a :class:`DataError` naming it."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as e:
        raise DataError(path, f"cannot be read ({e.strerror or type(e).__name__})") from None


def decode_utf8(raw: bytes, path, line: int = 1, field: Optional[str] = None) -> str:
    """``raw`` (the text of ``path`` from line ``line`` on) decoded as UTF-8; a byte that is not UTF-8 is a
    :class:`DataError` naming its line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line + raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(path, f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {column}", at, field,
                        "line") from None


# ---------------------------------------------------------------- sorted id index

class IdIndex:
    """Compact image-id -> row lookup: sorted byte-string ids and their rows (numpy, no dict).

    ``ids``: image ids in file order; ``rows``: their row numbers (0-based). Raises :class:`DataError`
    on a duplicate id, naming both rows (1-based).
    """

    def __init__(self, ids: Sequence[str], rows: np.ndarray, path, unit: str = "row"):
        keys = np.array([i.encode("utf-8") for i in ids], dtype=bytes) if len(ids) else np.zeros(0, "S1")
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.rows = np.asarray(rows, dtype=np.int64)[order]
        if len(self.keys) > 1:
            dup = np.nonzero(self.keys[1:] == self.keys[:-1])[0]
            if len(dup):
                k = dup[0]
                raise DataError(path, f"duplicate image id {self.keys[k].decode()!r} (also at {unit} "
                                f"{int(self.rows[k]) + 1})", int(self.rows[k + 1]) + 1, "image_id", unit)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, image_id: str) -> int:
        """Row of ``image_id`` or -1."""
        key = image_id.encode("utf-8")
        pos = int(np.searchsorted(self.keys, key))
        if pos < len(self.keys) and self.keys[pos] == key:
            return int(self.rows[pos])
        return -1

    def ids(self) -> List[str]:
        """Image ids, sorted."""
        return [k.decode("utf-8") for k in self.keys]


# ---------------------------------------------------------------- line index

def scan_line_offsets(path: str, progress: bool = False) -> np.ndarray:
    """Byte offset of every line of ``path`` (int64 ``[num_lines]``), streaming the file."""
    from tqdm import tqdm

    offsets = []
    pos = 0
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, disable=not progress,
                                     desc=f"indexing {os.path.basename(path)}") as bar:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
            bar.update(len(line))
    return np.asarray(offsets, dtype=np.int64)


def read_lineidx(path: str, data_path: str) -> np.ndarray:
    """Read a ``.lineidx`` file (one decimal byte offset per line) and check it against ``data_path``.

    Returns int64 ``[num_rows]``. Raises :class:`DataError` for a non-integer line, offsets that do not
    increase, or an offset at or past the end of the data file.
    """
    size = os.path.getsize(data_path)
    out = []
    with open_data_file(path) as f:
        for n, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, n, "offset").strip()
            if not line:
                continue
            try:
                off = int(line)
            except ValueError:
                raise DataError(path, f"{line[:40]!r} is not a byte offset", n, "offset", "line") from None
            if off < 0 or off >= size:
                raise DataError(path, f"offset {off} points past the end of {data_path} ({size} bytes)",
                                n, "offset", "line")
            if out and off <= out[-1]:
                raise DataError(path, f"offset {off} does not increase (previous {out[-1]})", n, "offset",
                                "line")
            out.append(off)
    return np.asarray(out, dtype=np.int64)


def write_lineidx(path: str, offsets: np.ndarray) -> None:
    """Write ``offsets`` (int ``[num_rows]``) as a ``.lineidx`` file, atomically."""
    atomic_write_lines(path, (f"{int(o)}\n" for o in offsets))


def read_json_no_dup(path: str):
    """``json.load`` that raises :class:`DataError` (file + line) on malformed JSON or a duplicate key."""
    def pairs(items):
        seen = {}
        for k, v in items:
            if k in seen:
                raise DataError(path, f"duplicate key {k!r}", field=k)
            seen[k] = v
        return seen
    with open_data_file(path) as f:
        text = decode_utf8(f.read(), path, field="json")
    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", e.lineno, "json", "line") from None


def read_store_meta(folder: str, fmt: str, kind: str, missing: str) -> dict:
    """A converted store's ``<folder>/meta.json``, checked to be of format ``fmt``; :class:`DataError` naming the
    folder (``missing``: what to tell when there is no meta.json) or the file (``kind``: e.g. "text store")."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        raise DataError(folder, missing, field="meta.json")
    meta = read_json_no_dup(meta_path)
    made_as = meta.get("format") if isinstance(meta, dict) else None
    if made_as != fmt:
        raise DataError(meta_path, f"unknown {kind} format {made_as!r} (expected {fmt!r})", field="format")
    return meta


# ---------------------------------------------------------------- features.tsv

def decode_feature_row(line: bytes, path, row: int) -> Tuple[str, np.ndarray]:
    """Parse one ``features.tsv`` row into ``(image_id, float32 [num_boxes, 2054])``.

    ``row`` is 1-based and only used in error messages.
    """
    parts = line.rstrip(b"\r\n").split(b"\t")
    if len(parts) != 3:
        raise DataError(path, f"expected 3 tab-separated fields (image_id, num_boxes, features), got "
                        f"{len(parts)} (truncated row?)", row, "row")
    image_id = parts[0].decode("utf-8", errors="replace").strip()
    if not image_id:
        raise DataError(path, "empty image id", row, "image_id")
    try:
        num_boxes = int(parts[1])
    except ValueError:
        raise DataError(path, f"{parts[1][:20]!r} is not an integer", row, "num_boxes") from None
    if num_boxes < 0:
        raise DataError(path, f"negative box count {num_boxes}", row, "num_boxes")
    try:
        raw = base64.b64decode(parts[2], validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(path, f"not valid base64 ({e}; truncated row?)", row, "features") from None
    if len(raw) % 4:
        raise DataError(path, f"{len(raw)} decoded bytes is not a whole number of float32 values "
                        "(truncated row?)", row, "features")
    n = len(raw) // 4
    if n != num_boxes * FEATURE_DIM:
        width = f"{n / num_boxes:g}" if num_boxes else "n/a"
        raise DataError(path, f"{n} float32 values for num_boxes={num_boxes}: expected "
                        f"{num_boxes} x {FEATURE_DIM} = {num_boxes * FEATURE_DIM} (width {width}, or a "
                        "truncated row)", row, "features")
    feats = np.frombuffer(raw, dtype="<f4").reshape(num_boxes, FEATURE_DIM)  # [num_boxes, 2054]
    return image_id, feats


def encode_feature_row(image_id: str, feats: np.ndarray) -> bytes:
    """One ``features.tsv`` row (with newline) for float ``[num_boxes, 2054]`` features."""
    feats = np.ascontiguousarray(feats, dtype="<f4")
    if feats.ndim != 2 or feats.shape[1] != FEATURE_DIM:
        raise ValueError(f"features of image {image_id!r} have shape {feats.shape}, expected [n, {FEATURE_DIM}]")
    return b"%s\t%d\t%s\n" % (image_id.encode("utf-8"), feats.shape[0], base64.b64encode(feats.tobytes()))


def iter_feature_rows(path: str, start_offset: int = 0, start_row: int = 0
                      ) -> Iterator[Tuple[int, int, int, str, np.ndarray]]:
    """Stream ``features.tsv`` from byte ``start_offset`` (row ``start_row``, 0-based).

    Yields ``(row, offset, end_offset, image_id, float32 [num_boxes, 2054])`` per non-empty row, one row
    in memory at a time.
    """
    row, pos = start_row, start_offset
    with open(path, "rb") as f:
        f.seek(start_offset)
        for line in f:
            end = pos + len(line)
            if line.strip():
                image_id, feats = decode_feature_row(line, path, row + 1)
                yield row, pos, end, image_id, feats
                row += 1
            pos = end


def read_feature_ids(path: str, offsets: np.ndarray) -> List[str]:
    """Image id of each row at ``offsets`` (reads only each row's first field)."""
    ids = []
    with open(path, "rb") as f:
        for r, off in enumerate(offsets):
            f.seek(max(int(off) - 1, 0))
            head = f.read(257)
            if off > 0:
                if head[:1] != b"\n":
                    raise DataError(path, f"lineidx offset {int(off)} is not the start of a line", r + 1, "offset")
                head = head[1:]
            tab = head.find(b"\t")
            if tab <= 0:
                raise DataError(path, f"no image id before a tab at byte {int(off)} (lineidx out of step "
                                "with the file?)", r + 1, "image_id")
            ids.append(head[:tab].decode("utf-8", errors="replace"))
    return ids


# ---------------------------------------------------------------- predictions.tsv

def parse_prediction_row(line: bytes, path, row: int) -> Tuple[str, dict]:
    """Parse one ``predictions.tsv`` row into ``(image_id, record)``; the record has ``objects`` (each with a
    string ``class``) and optionally ``gt_objects`` (ground-truth objects, the same form). ``row`` is 1-based,
    for messages."""
    parts = line.rstrip(b"\r\n").split(b"\t", 1)
    if len(parts) != 2:
        raise DataError(path, "expected 'image_id<TAB>json'", row, "row")
    image_id = parts[0].decode("utf-8", errors="replace").strip()
    if not image_id:
        raise DataError(path, "empty image id", row, "image_id")
    try:
        rec = json.loads(parts[1])
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", row, "json") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text ({e.reason} at byte {e.start} of the JSON)", row, "json") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("objects"), list):
        raise DataError(path, "missing list 'objects'", row, "objects")
    if "gt_objects" in rec and not isinstance(rec["gt_objects"], list):
        raise DataError(path, "'gt_objects' is not a list", row, "gt_objects")
    for key in ("objects", "gt_objects"):
        for k, obj in enumerate(rec.get(key, ())):
            if not isinstance(obj, dict) or not isinstance(obj.get("class"), str) or not obj["class"].strip():
                raise DataError(path, "object without a non-empty string 'class'", row, f"{key}[{k}].class")
    return image_id, rec


def row_classes(line: bytes) -> List[str]:
    """The tags of a ``predictions.tsv`` row already validated (:func:`parse_prediction_row`), as
    :meth:`PredictionsReader.classes` gives them."""
    rec = json.loads(line.split(b"\t", 1)[1])
    objects = rec["gt_objects"] if "gt_objects" in rec else rec["objects"]
    return list(dict.fromkeys(o["class"].strip() for o in objects))


class PredictionsReader:
    """Lazy ``predictions.tsv``: an index of byte offsets and sorted ids; rows parsed on access.

    ``reader[image_id] -> dict`` (the row's JSON), ``reader.classes(image_id) -> List[str]`` (the tags).
    Every row is validated once when the index is built.
    """

    def __init__(self, path: str, progress: bool = False):
        self.path = str(path)
        offsets, ids = [], []
        pos = 0
        with open_data_file(self.path) as f:
            for line in f:
                if line.strip():
                    image_id, _ = parse_prediction_row(line, self.path, len(offsets) + 1)
                    offsets.append(pos)
                    ids.append(image_id)
                pos += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.index = IdIndex(ids, np.arange(len(ids)), self.path)
        self._fh, self._pid = None, None

    def __len__(self) -> int:
        return len(self.offsets)

    def __contains__(self, image_id: str) -> bool:
        return self.index.find(str(image_id)) >= 0

    def ids(self) -> List[str]:
        return self.index.ids()

    def __getitem__(self, image_id: str) -> dict:
        row = self.index.find(str(image_id))
        if row < 0:
            raise MissingImageError(self.path, f"no row for image id {image_id!r}", field="image_id")
        if self._fh is None or self._pid != os.getpid():  # one handle per process (safe after fork)
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(int(self.offsets[row]))
        return parse_prediction_row(self._fh.readline(), self.path, row + 1)[1]

    def classes(self, image_id: str) -> List[str]:
        """The object tags of ``image_id`` as the release takes them: the class names of the ground-truth
        objects (``gt_objects``) when the row has them, else of the detections; each name once, in the order
        of its first occurrence (the release takes a Python set: the same names in an arbitrary order). The row
        was validated when indexed: parsed here without the checks, a third of the time per sample."""
        row = self.index.find(str(image_id))
        if row < 0:
            raise MissingImageError(self.path, f"no row for image id {image_id!r}", field="image_id")
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(int(self.offsets[row]))
        return row_classes(self._fh.readline())

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"] = None
        return state
