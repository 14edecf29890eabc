"""Region-feature reads: the converted memory-mapped store vs. base64 TSV, in the same run.

    python benchmarks/data_store.py                       # 3000 images, 10-50 regions, 2000 random reads
    python benchmarks/data_store.py --images 5000 --reads 5000 --workdir /tmp/bench_store

Writes a VinVL-format ``features.tsv`` (+ lineidx) of random features, converts it (fp16 and fp32),
then reads the same random sequence of image ids (with repeats, like sampling) from the TSV slow path and
from each store, and prints one JSON line: regions/s and MB/s (counted as float32 [n, 2054]) for each reader (``store_float16_raw``: fp16 arrays
as stored, for a loader that converts on the device), the
conversion time and the on-disk sizes. Page cache is warm for every reader (the TSV is read once to
build its index; the stores were just written), so this measures decode/copy cost, not the disk.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvptr_ds.data.feature_store import FeatureStore, TsvFeatureStore, convert_features  # noqa: E402
from mvptr_ds.data.readers import FEATURE_DIM, encode_feature_row, write_lineidx  # noqa: E402


def write_tsv(path: str, images: int, lo: int, hi: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    offsets, pos, regions = [], 0, 0
    with open(path, "wb") as f:
        for k in range(images):
            n = int(rng.integers(lo, hi + 1))
            line = encode_feature_row(f"img{k:07d}", rng.random((n, FEATURE_DIM), dtype=np.float32))
            offsets.append(pos)
            f.write(line)
            pos += len(line)
            regions += n
    write_lineidx(path[:-4] + ".lineidx", offsets)
    return regions


def time_reads(read, ids) -> dict:
    regions = 0
    t0 = time.perf_counter()
    for image_id in ids:
        regions += read(image_id).shape[0]
    dt = time.perf_counter() - t0
    return {"seconds": round(dt, 4), "regions": regions, "regions_per_s": round(regions / dt),
            "images_per_s": round(len(ids) / dt), "mb_per_s_fp32": round(regions * FEATURE_DIM * 4 / dt / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--min_regions", type=int, default=10)
    ap.add_argument("--max_regions", type=int, default=50)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="kept if given; a temporary directory otherwise")
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="mvptr_store_bench_")
    os.makedirs(work, exist_ok=True)
    try:
        tsv = os.path.join(work, "features.tsv")
        t0 = time.perf_counter()
        total_regions = write_tsv(tsv, args.images, args.min_regions, args.max_regions, args.seed)
        write_s = time.perf_counter() - t0
        result = {"bench": "data_store", "images": args.images, "regions_in_corpus": total_regions,
                  "reads": args.reads, "tsv_write_s": round(write_s, 2),
                  "tsv_mb": round(os.path.getsize(tsv) / 1e6, 1)}
        ids = [f"img{k:07d}" for k in np.random.default_rng(args.seed + 1).integers(0, args.images, args.reads)]
        tsv_store = TsvFeatureStore(tsv, progress=False)
        readers = {"tsv_base64": tsv_store.__getitem__}
        for dtype in ("float16", "float32"):
            out = os.path.join(work, f"store_{dtype}")
            t0 = time.perf_counter()
            convert_features(tsv, out, dtype=dtype, progress=False)
            result[f"convert_{dtype}_s"] = round(time.perf_counter() - t0, 2)
            result[f"store_{dtype}_mb"] = round(sum(os.path.getsize(os.path.join(out, f))
                                                    for f in os.listdir(out)) / 1e6, 1)
            store = FeatureStore(out)
            readers[f"store_{dtype}"] = store.__getitem__                  # float32 out
            if dtype == "float16":
                readers["store_float16_raw"] = store.raw                   # fp16 out, no conversion
        for name, read in readers.items():
            time_reads(read, ids[:50])                         # open files / maps outside the timing
            result[name] = time_reads(read, ids)
        result["speedup_store_float16_vs_tsv"] = round(
            result["store_float16"]["regions_per_s"] / result["tsv_base64"]["regions_per_s"], 2)
        result["speedup_store_float32_vs_tsv"] = round(
            result["store_float32"]["regions_per_s"] / result["tsv_base64"]["regions_per_s"], 2)
        print(json.dumps(result))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
