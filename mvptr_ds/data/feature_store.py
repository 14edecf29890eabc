"""Region features keyed by image id: a memory-mapped store, its writers, and the choice of reader.

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

``write_store(pairs, out)`` writes the same layout from ``(image_id, features)`` pairs of any origin.
The converter streams the TSV (one row in memory), writes each shard to ``*.tmp`` and renames it when
complete, then commits ``progress.json`` (byte offset and row where the next shard starts). Killed at
any point and re-run with the same arguments, it resumes after the last committed shard.

:class:`FeatureStore` opens shards with ``np.memmap`` on first access in each process, so memory does
not grow with the corpus, ranks only touch pages they read, and it works after ``fork`` (DataLoader
workers) and after pickling (spawn). The TSV slow path (:class:`TsvFeatureStore`) is in ``tsv_store``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from mvptr_ds.files import atomic_write_json

from .readers import (FEATURE_DIM, DataError, IdIndex, MissingImageError, iter_feature_rows,
                      read_json_no_dup, read_store_meta)
from .tsv_store import TsvFeatureStore

FORMAT = "mvptr_ds.feature_store.v1"
DTYPES = {"float16": "<f2", "fp16": "<f2", "float32": "<f4", "fp32": "<f4"}


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
        atomic_write_json(manifest_path, manifest, indent=None, sort_keys=False)
    resumed_from = int(manifest["next_row"])

    if not manifest["done"]:
        shard: Optional[_ShardWriter] = None

        def commit(next_offset: int, next_row: int) -> None:
            nonlocal shard
            manifest["shards"].append(shard.commit())
            manifest["next_offset"], manifest["next_row"] = next_offset, next_row
            atomic_write_json(manifest_path, manifest, indent=None, sort_keys=False)
            shard = None

        start = int(manifest["next_offset"])
        undo = _undo_on_error(out, manifest, created, lambda: shard and shard.close())
        with tqdm(total=tsv_size, initial=start, unit="B", unit_scale=True, disable=not progress,
                  desc=f"converting {os.path.basename(tsv)}") as bar, undo:
            for row, _, end, image_id, feats in iter_feature_rows(tsv, start, resumed_from):
                stored = _storable(feats, np_dtype, tsv, row, image_id)
                if shard is None:
                    shard = _ShardWriter(out, len(manifest["shards"]))
                shard.add(image_id, stored, row)
                bar.update(end - bar.n)
                if len(shard) == shard_size:
                    commit(end, row + 1)
            if shard is not None:
                commit(tsv_size, row + 1)
        _finalize(out, manifest, np_dtype)
        manifest["done"] = True
        atomic_write_json(manifest_path, manifest, indent=None, sort_keys=False)
    meta = read_json_no_dup(os.path.join(out, "meta.json"))
    return {"out": out, "num_images": meta["num_images"], "num_regions": meta["num_regions"],
            "shards": len(meta["shards"]), "dtype": dtype, "resumed_from_row": resumed_from}


def write_store(images: Iterable[Tuple[str, np.ndarray]], out: str, dtype: str = "float16",
                shard_size: int = 4096, source: str = "generated") -> dict:
    """Write a store into the new folder ``out`` from ``(image_id, [num_boxes, 2054])`` pairs of any origin
    (another extractor's files, generated data): the layout and checks of :func:`convert_features`, whose
    resume it lacks (an interrupted call leaves no ``meta.json``; delete ``out`` and call again).

    ``source`` names the origin in errors and ``meta.json``. Returns the summary of :func:`convert_features`.
    """
    if dtype not in DTYPES:
        raise DataError(out, f"dtype {dtype!r}: expected one of float16, float32", field="dtype")
    if shard_size < 1:
        raise DataError(out, f"shard_size must be >= 1, got {shard_size}", field="shard_size")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(out, "exists and is not an empty folder", field="out")
    os.makedirs(out, exist_ok=True)
    np_dtype = np.dtype(DTYPES[dtype])
    manifest = {"format": FORMAT, "source": source, "dtype": np_dtype.str, "shard_size": int(shard_size),
                "shards": [], "done": False}
    shard: Optional[_ShardWriter] = None
    for row, (image_id, feats) in enumerate(images):
        stored = _storable(np.asarray(feats, np.float32), np_dtype, source, row, str(image_id))
        shard = shard or _ShardWriter(out, len(manifest["shards"]))
        shard.add(str(image_id), stored, row)
        if len(shard) == shard_size:
            manifest["shards"].append(shard.commit())
            shard = None
    if shard is not None:
        manifest["shards"].append(shard.commit())
    _finalize(out, manifest, np_dtype)
    manifest["done"] = True
    atomic_write_json(os.path.join(out, "progress.json"), manifest, indent=None, sort_keys=False)
    meta = read_json_no_dup(os.path.join(out, "meta.json"))
    return {"out": out, "num_images": meta["num_images"], "num_regions": meta["num_regions"],
            "shards": len(meta["shards"]), "dtype": dtype, "resumed_from_row": 0}


class _ShardWriter:
    """Shard ``k`` of a store being written: regions streamed into ``.bin.tmp`` image by image; ``commit()``
    writes its index and renames both into place, so a shard file exists only complete."""

    def __init__(self, out: str, k: int):
        self.out, self.name = out, _shard_name(k)
        self.fh = open(os.path.join(out, self.name + ".bin.tmp"), "wb")
        self.ids: List[str] = []
        self.start: List[int] = []
        self.count: List[int] = []
        self.rows: List[int] = []
        self.regions = 0

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, image_id: str, stored: np.ndarray, row: int) -> None:
        self.fh.write(stored.tobytes())
        self.ids.append(image_id)
        self.start.append(self.regions)
        self.count.append(stored.shape[0])
        self.rows.append(row)
        self.regions += stored.shape[0]

    def close(self) -> None:
        self.fh.close()

    def commit(self) -> dict:
        """Finish the shard; returns its manifest entry."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        path = os.path.join(self.out, self.name)
        np.savez(path + ".idx.tmp.npz", ids=np.array([i.encode("utf-8") for i in self.ids], dtype=bytes),
                 start=np.asarray(self.start, np.int64), count=np.asarray(self.count, np.int64),
                 row=np.asarray(self.rows, np.int64))
        os.replace(path + ".idx.tmp.npz", path + ".idx.npz")
        os.replace(path + ".bin.tmp", path + ".bin")
        return {"name": self.name, "num_images": len(self.ids), "num_regions": self.regions}


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
    atomic_write_json(os.path.join(out, "meta.json"), {
        "format": FORMAT, "dtype": np_dtype.str, "dim": FEATURE_DIM, "num_images": len(ids),
        "num_regions": int(loc[:, 2].sum()), "shards": [s["name"] for s in manifest["shards"]],
        "source": manifest["source"]}, indent=None, sort_keys=False)


class FeatureStore:
    """Read-only memory-mapped region features: ``store[image_id] -> float32 [num_boxes, 2054]``.

    ``len(store)``, ``image_id in store`` and ``store.ids()`` (sorted) work as for a mapping. Only
    ``meta.json`` is read at construction; the index is memory-mapped and shards are mapped lazily.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self.meta = read_store_meta(self.path, FORMAT, "feature store", "no meta.json: not a converted feature "
                                    "store, or the conversion did not finish (re-run convert_features)")
        self.dtype = np.dtype(self.meta["dtype"])
        self._keys = self._loc = None
        self._maps: Dict[int, np.ndarray] = {}
        self._pid = None

    def _index(self):
        if self._keys is None:
            # plain ndarray views of the maps: np.memmap's own __getitem__ costs ~10 us per lookup
            self._keys = np.load(os.path.join(self.path, "index_ids.npy"), mmap_mode="r").view(np.ndarray)
            self._loc = np.load(os.path.join(self.path, "index_loc.npy"), mmap_mode="r").view(np.ndarray)
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
            self._maps[k] = (np.memmap(fn, dtype=self.dtype, mode="r", shape=(n, FEATURE_DIM)).view(np.ndarray)
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

    def locate(self, image_ids: np.ndarray) -> np.ndarray:
        """Position of each image id (``[n]`` bytes, UTF-8) in the store's index, -1 where absent; for
        :meth:`view_at`. One array search for all of them."""
        keys, _ = self._index()
        ids = np.asarray(image_ids, dtype=bytes)
        width = max(keys.dtype.itemsize, ids.dtype.itemsize, 1)
        keys, ids = keys.astype(f"S{width}"), ids.astype(f"S{width}")
        if len(keys) == 0:
            return np.full(len(ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
        return np.where(keys[pos] == ids, pos, -1).astype(np.int64)

    def view_at(self, pos: int) -> np.ndarray:
        """The regions of the image at index position ``pos`` (:meth:`locate`) as stored, read-only, without a copy:
        ``[num_boxes, 2054]`` (the collator copies them into the batch, once)."""
        shard, start, count, _ = self._index()[1][pos].tolist()
        return self._shard(shard)[start:start + count]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_keys=None, _loc=None, _maps={}, _pid=None)
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
