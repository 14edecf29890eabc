"""Region features keyed by image id: a memory-mapped store, the TSV slow path, and the converter.

Store layout (``convert_features(tsv, out)`` writes it, :class:`FeatureStore` reads it)::

    out/
      shard_00000.bin ...   raw little-endian fp16 (default) or fp32, rows of 2054 values,
                            the regions of consecutive images back to back
      shard_00000.idx.npz   per shard: ids (bytes), start/count (regions), row (TSV row, 0-based)
      progress.json         the converter's manifest (committed atomically after each shard)
      index_ids.npy         all image ids, sorted (bytes)              } written last, from the shard
      index_loc.npy         int64 [num_images, 4]: shard, start, count, row  } indices
      meta.json             {"format", "dtype", "dim", "num_images", "num_regions", "shards"}: its
                            presence marks a complete store

The converter streams the TSV (one row in memory), writes each shard to ``*.tmp`` and renames it when
complete, then commits ``progress.json`` (byte offset and row where the next shard starts). Killed at
any point and re-run with the same arguments, it resumes after the last committed shard.

:class:`FeatureStore` opens shards with ``np.memmap`` on first access in each process, so memory does
not grow with the corpus, ranks only touch pages they read, and it works after ``fork`` (DataLoader
workers) and after pickling (spawn).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, List, Optional, Union

import numpy as np

from .readers import (FEATURE_DIM, DataError, IdIndex, MissingImageError, decode_feature_row,
                      iter_feature_rows, read_feature_ids, read_json_no_dup, read_lineidx,
                      scan_line_offsets, write_lineidx)

FORMAT = "mvptr_ds.feature_store.v1"
DTYPES = {"float16": "<f2", "fp16": "<f2", "float32": "<f4", "fp32": "<f4"}


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def convert_features(tsv: str, out: str, dtype: str = "float16", shard_size: int = 4096,
                     progress: bool = True) -> dict:
    """Convert a VinVL ``features.tsv`` into a memory-mapped store in ``out`` (layout: module docstring).

    Args:
        tsv: ``features.tsv`` path (``image_id \\t num_boxes \\t base64 float32[num_boxes x 2054]``).
        out: output directory (created; a re-run resumes an interrupted conversion into it).
        dtype: ``float16`` (default) or ``float32`` (exact).
        shard_size: images per shard file.
        progress: show a tqdm bar over the TSV bytes.
    Returns:
        summary dict: ``num_images``, ``num_regions``, ``shards``, ``dtype``, ``resumed_from_row``, ``out``.
    Raises:
        DataError: malformed row (file, row, field), duplicate image id, or ``out`` holding a conversion
        of another file or with other settings.
    """
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise DataError(out, f"dtype {dtype!r}: expected one of float16, float32", field="dtype")
    if shard_size < 1:
        raise DataError(out, f"shard_size must be >= 1, got {shard_size}", field="shard_size")
    np_dtype = np.dtype(DTYPES[dtype])
    if not os.path.isfile(tsv):
        raise DataError(tsv, "file not found" if not os.path.exists(tsv) else "not a file", field="tsv")
    tsv_size = os.path.getsize(tsv)
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    settings = {"format": FORMAT, "source": os.path.abspath(tsv), "source_size": tsv_size,
                "dtype": np_dtype.str, "shard_size": int(shard_size)}
    manifest_path = os.path.join(out, "progress.json")
    if os.path.exists(manifest_path):
        manifest = read_json_no_dup(manifest_path)
        if {k: manifest.get(k) for k in settings} != settings:
            raise DataError(manifest_path, f"{out} holds a conversion with other settings "
                            f"({ {k: manifest.get(k) for k in settings} }); use another --out or delete it",
                            field="settings")
    else:
        manifest = dict(settings, shards=[], next_offset=0, next_row=0, done=False)
        _atomic_json(manifest_path, manifest)
    resumed_from = int(manifest["next_row"])

    if not manifest["done"]:
        shard_k = len(manifest["shards"])
        buf_ids, buf_start, buf_count, buf_row = [], [], [], []
        fh, regions_in_shard = None, 0

        def commit(next_offset: int, next_row: int) -> None:
            nonlocal fh, buf_ids, buf_start, buf_count, buf_row, shard_k, regions_in_shard
            name = _shard_name(shard_k)
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            fh = None
            np.savez(os.path.join(out, name + ".idx.tmp.npz"),
                     ids=np.array([i.encode("utf-8") for i in buf_ids], dtype=bytes),
                     start=np.asarray(buf_start, np.int64), count=np.asarray(buf_count, np.int64),
                     row=np.asarray(buf_row, np.int64))
            os.replace(os.path.join(out, name + ".idx.tmp.npz"), os.path.join(out, name + ".idx.npz"))
            os.replace(os.path.join(out, name + ".bin.tmp"), os.path.join(out, name + ".bin"))
            manifest["shards"].append({"name": name, "num_images": len(buf_ids),
                                       "num_regions": regions_in_shard})
            manifest["next_offset"], manifest["next_row"] = next_offset, next_row
            _atomic_json(manifest_path, manifest)
            shard_k += 1
            buf_ids, buf_start, buf_count, buf_row, regions_in_shard = [], [], [], [], 0

        start = int(manifest["next_offset"])
        undo = _undo_on_error(out, manifest, created, lambda: fh and fh.close())
        with tqdm(total=tsv_size, initial=start, unit="B", unit_scale=True, disable=not progress,
                  desc=f"converting {os.path.basename(tsv)}") as bar, undo:
            for row, _, end, image_id, feats in iter_feature_rows(tsv, start, resumed_from):
                stored = _storable(feats, np_dtype, tsv, row, image_id)
                if fh is None:
                    fh = open(os.path.join(out, _shard_name(shard_k) + ".bin.tmp"), "wb")
                fh.write(stored.tobytes())
                buf_ids.append(image_id)
                buf_start.append(regions_in_shard)
                buf_count.append(feats.shape[0])
                buf_row.append(row)
                regions_in_shard += feats.shape[0]
                bar.update(end - bar.n)
                if len(buf_ids) == shard_size:
                    commit(end, row + 1)
            if fh is not None:
                commit(tsv_size, row + 1)
        _finalize(out, manifest, np_dtype)
        manifest["done"] = True
        _atomic_json(manifest_path, manifest)
    meta = read_json_no_dup(os.path.join(out, "meta.json"))
    return {"out": out, "num_images": meta["num_images"], "num_regions": meta["num_regions"],
            "shards": len(meta["shards"]), "dtype": dtype, "resumed_from_row": resumed_from}


@contextlib.contextmanager
def _undo_on_error(out: str, manifest: dict, created: bool, close):
    """On a bad row, close (``close()``) and remove the uncommitted shard; when no shard was committed, also the
    manifest (and ``out`` if this call created it), so that converting the corrected file (or with another
    dtype) starts clean."""
    try:
        yield
    except DataError:
        close()
        for name in os.listdir(out):
            if name.endswith(".tmp") or (not manifest["shards"] and name == "progress.json"):
                os.remove(os.path.join(out, name))
        if created and not os.listdir(out):
            os.rmdir(out)
        raise


def _storable(feats: np.ndarray, np_dtype: np.dtype, tsv: str, row: int, image_id: str) -> np.ndarray:
    """``feats`` (float32 ``[num_boxes, 2054]`` of 0-based ``row``) cast to ``np_dtype``; DataError naming the
    row when a value is not finite, or (fp16) lies beyond the dtype's range and would be stored as inf."""
    bad = ~np.isfinite(feats)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(tsv, f"image {image_id!r}: non-finite value {float(feats[r, c])} at region {r}, column {c}",
                        row + 1, "features")
    with np.errstate(over="ignore"):
        stored = feats.astype(np_dtype)
    bad = ~np.isfinite(stored)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(tsv, f"image {image_id!r}: value {float(feats[r, c]):g} at region {r}, column {c} is beyond "
                        f"the {np_dtype.name} range (largest {float(np.finfo(np_dtype).max):g}) and would be stored "
                        f"as inf; convert with --dtype float32", row + 1, "features")
    return stored


def _finalize(out: str, manifest: dict, np_dtype: np.dtype) -> None:
    """Merge the shard indices into the sorted global index and write ``meta.json`` (completion mark)."""
    ids, loc = [], []
    for k, sh in enumerate(manifest["shards"]):
        with np.load(os.path.join(out, sh["name"] + ".idx.npz")) as z:
            ids.extend(x.decode("utf-8") for x in z["ids"])
            loc.append(np.stack([np.full(len(z["ids"]), k, np.int64), z["start"], z["count"], z["row"]], 1))
    loc = np.concatenate(loc) if loc else np.zeros((0, 4), np.int64)     # [num_images, 4]
    index = IdIndex(ids, loc[:, 3], manifest["source"])                  # raises on duplicate ids
    order = np.argsort(np.array([i.encode("utf-8") for i in ids], dtype=bytes) if ids
                       else np.zeros(0, "S1"), kind="stable")
    np.save(os.path.join(out, "index_ids.tmp.npy"), index.keys)
    np.save(os.path.join(out, "index_loc.tmp.npy"), loc[order])
    os.replace(os.path.join(out, "index_ids.tmp.npy"), os.path.join(out, "index_ids.npy"))
    os.replace(os.path.join(out, "index_loc.tmp.npy"), os.path.join(out, "index_loc.npy"))
    _atomic_json(os.path.join(out, "meta.json"), {
        "format": FORMAT, "dtype": np_dtype.str, "dim": FEATURE_DIM, "num_images": len(ids),
        "num_regions": int(loc[:, 2].sum()), "shards": [s["name"] for s in manifest["shards"]],
        "source": manifest["source"]})


class FeatureStore:
    """Read-only memory-mapped region features: ``store[image_id] -> float32 [num_boxes, 2054]``.

    ``len(store)``, ``image_id in store`` and ``store.ids()`` (sorted) work as for a mapping. Only
    ``meta.json`` is read at construction; the index is memory-mapped and shards are mapped lazily.
    """

    def __init__(self, path: str):
        self.path = str(path)
        meta_path = os.path.join(self.path, "meta.json")
        if not os.path.exists(meta_path):
            raise DataError(self.path, "no meta.json: not a converted feature store, or the conversion did "
                            "not finish (re-run convert_features)", field="meta.json")
        self.meta = read_json_no_dup(meta_path)
        if self.meta.get("format") != FORMAT:
            raise DataError(meta_path, f"unknown store format {self.meta.get('format')!r}", field="format")
        self.dtype = np.dtype(self.meta["dtype"])
        self._keys = self._loc = None
        self._maps: Dict[int, np.ndarray] = {}
        self._pid = None

    def _index(self):
        if self._keys is None:
            self._keys = np.load(os.path.join(self.path, "index_ids.npy"), mmap_mode="r")
            self._loc = np.load(os.path.join(self.path, "index_loc.npy"), mmap_mode="r")
        return self._keys, self._loc

    def _find(self, image_id: str) -> int:
        keys, _ = self._index()
        key = str(image_id).encode("utf-8")
        pos = int(np.searchsorted(keys, key))
        return pos if pos < len(keys) and keys[pos] == key else -1

    def _shard(self, k: int) -> np.ndarray:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        if k not in self._maps:
            fn = os.path.join(self.path, self.meta["shards"][k] + ".bin")
            n = os.path.getsize(fn) // (self.dtype.itemsize * FEATURE_DIM)
            self._maps[k] = (np.memmap(fn, dtype=self.dtype, mode="r", shape=(n, FEATURE_DIM))
                             if n else np.zeros((0, FEATURE_DIM), self.dtype))
        return self._maps[k]

    def __len__(self) -> int:
        return int(self.meta["num_images"])

    def __contains__(self, image_id) -> bool:
        return self._find(image_id) >= 0

    def ids(self) -> List[str]:
        """All image ids, sorted."""
        return [k.decode("utf-8") for k in self._index()[0]]

    def num_boxes(self, image_id: str) -> int:
        pos = self._find(image_id)
        if pos < 0:
            raise MissingImageError(self.path, f"image id {image_id!r} is not in the store", field="image_id")
        return int(self._index()[1][pos, 2])

    def raw(self, image_id: str) -> np.ndarray:
        """``[num_boxes, 2054]`` in the stored dtype (fp16 by default): a copy, no conversion, for loaders
        that convert on the device."""
        pos = self._find(image_id)
        if pos < 0:
            raise MissingImageError(self.path, f"image id {image_id!r} is not in the store", field="image_id")
        shard, start, count, _ = (int(x) for x in self._index()[1][pos])
        return np.array(self._shard(shard)[start:start + count])                   # [count, 2054]

    def __getitem__(self, image_id: str) -> np.ndarray:
        return self.raw(image_id).astype(np.float32, copy=False)                     # [count, 2054]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_keys=None, _loc=None, _maps={}, _pid=None)
        return state


class TsvFeatureStore:
    """The slow path: the :class:`FeatureStore` interface directly on ``features.tsv``.

    Uses ``features.lineidx`` next to the TSV (built with a progress bar and written there when
    missing) and ``imageid2idx.json`` when present; otherwise reads each row's id once. Each access
    seeks to the row and base64-decodes it.
    """

    def __init__(self, tsv_path: str, lineidx: Optional[str] = None, imageid2idx: Optional[str] = None,
                 progress: bool = True):
        self.path = str(tsv_path)
        if not os.path.isfile(self.path):
            raise DataError(self.path, "feature TSV not found", field="path")
        base = os.path.splitext(self.path)[0]
        lineidx = lineidx or base + ".lineidx"
        if os.path.exists(lineidx):
            self.offsets = read_lineidx(lineidx, self.path)
            with open(self.path, "rb") as f:                 # a stale index would drop the rows after it
                f.seek(int(self.offsets[-1]) if len(self.offsets) else 0)
                f.readline() if len(self.offsets) else None
                if f.read().strip():
                    raise DataError(lineidx, f"lists {len(self.offsets)} rows but {self.path} has more (stale "
                                    "lineidx? delete it to rebuild)", len(self.offsets), "offset", "line")
        else:
            self.offsets = scan_line_offsets(self.path, progress=progress)
            try:
                write_lineidx(lineidx, self.offsets)
            except OSError:
                pass  # read-only data directory: keep the index in memory only
        if imageid2idx is None:
            cand = os.path.join(os.path.dirname(self.path), "imageid2idx.json")
            imageid2idx = cand if os.path.exists(cand) else None
        if imageid2idx:
            table = read_json_no_dup(imageid2idx)
            ids, rows = [], []
            for k, v in table.items():
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(self.offsets):
                    raise DataError(imageid2idx, f"row {v!r} is not a row of {self.path} "
                                    f"({len(self.offsets)} rows)", field=k)
                ids.append(str(k))
                rows.append(v)
            if len(ids) != len(self.offsets):
                raise DataError(imageid2idx, f"{len(ids)} ids for {len(self.offsets)} rows of {self.path}",
                                field="json")
            if len(set(rows)) != len(rows):
                raise DataError(imageid2idx, "two image ids point at the same row", field="json")
            self.index = IdIndex(ids, np.asarray(rows), imageid2idx, "entry")
        else:
            ids = read_feature_ids(self.path, self.offsets)
            self.index = IdIndex(ids, np.arange(len(ids)), self.path)
        self._fh, self._pid = None, None

    def __len__(self) -> int:
        return len(self.offsets)

    def __contains__(self, image_id) -> bool:
        return self.index.find(str(image_id)) >= 0

    def ids(self) -> List[str]:
        return self.index.ids()

    def _row(self, image_id: str):
        row = self.index.find(str(image_id))
        if row < 0:
            raise MissingImageError(self.path, f"image id {image_id!r} is not in the file", field="image_id")
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        off = int(self.offsets[row])
        if off > 0:
            self._fh.seek(off - 1)
            if self._fh.read(1) != b"\n":
                raise DataError(self.path, f"lineidx offset {off} is not the start of a line", row + 1, "offset")
        self._fh.seek(off)
        got, feats = decode_feature_row(self._fh.readline(), self.path, row + 1)
        if got != str(image_id):
            raise DataError(self.path, f"row holds image {got!r}, the index says {image_id!r}", row + 1,
                            "image_id")
        return feats

    def num_boxes(self, image_id: str) -> int:
        return int(self._row(image_id).shape[0])

    def __getitem__(self, image_id: str) -> np.ndarray:
        return np.array(self._row(image_id), dtype=np.float32)  # [num_boxes, 2054]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"] = None
        return state


def open_feature_store(path: str, progress: bool = True) -> Union[FeatureStore, TsvFeatureStore]:
    """A converted store directory (has ``meta.json``), a ``.tsv`` file, or a directory holding
    ``features/`` (converted) or ``features.tsv``."""
    path = str(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "meta.json")):
            return FeatureStore(path)
        if os.path.exists(os.path.join(path, "features", "meta.json")):
            return FeatureStore(os.path.join(path, "features"))
        if os.path.isfile(os.path.join(path, "features.tsv")):
            return TsvFeatureStore(os.path.join(path, "features.tsv"), progress=progress)
        raise DataError(path, "no converted store (meta.json, features/meta.json) and no features.tsv",
                        field="features")
    if os.path.isfile(path):
        return TsvFeatureStore(path, progress=progress)
    raise DataError(path, "no such file or directory", field="features")
