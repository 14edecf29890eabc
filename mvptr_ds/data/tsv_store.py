"""The slow path: the :class:`~mvptr_ds.data.feature_store.FeatureStore` interface read directly from a VinVL
``features.tsv`` (base64 rows), for data that was not converted (``convert_features``)."""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

from .readers import (DataError, IdIndex, MissingImageError, decode_feature_row, read_feature_ids,
                      read_json_no_dup, read_lineidx, scan_line_offsets, write_lineidx)


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
