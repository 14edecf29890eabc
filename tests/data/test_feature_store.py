"""The converted feature store: round trip fp16/fp32, restart after SIGKILL, determinism, workers."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mvptr_ds.data.feature_store import (FeatureStore, TsvFeatureStore, convert_features,
                                         open_feature_store, write_store)
from mvptr_ds.data.readers import FEATURE_DIM, DataError, encode_feature_row, write_lineidx

REPO = Path(__file__).resolve().parents[2]


def make_rows(n, seed=0, max_boxes=4):
    rng = np.random.default_rng(seed)
    return [(f"im{k:05d}" if k % 3 else str(1000 + k),
             (rng.random((int(rng.integers(0, max_boxes + 1)), FEATURE_DIM), dtype=np.float32) * 8.0))
            for k in range(n)]


def write_tsv(path, rows):
    offsets, pos = [], 0
    with open(path, "wb") as f:
        for image_id, feats in rows:
            line = encode_feature_row(image_id, feats)
            offsets.append(pos)
            f.write(line)
            pos += len(line)
    write_lineidx(str(path)[:-4] + ".lineidx", offsets)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_convert_round_trip(tmp_path, dtype):
    rows = make_rows(23, seed=1)
    write_tsv(tmp_path / "features.tsv", rows)
    summary = convert_features(str(tmp_path / "features.tsv"), str(tmp_path / "store"), dtype=dtype,
                               shard_size=5, progress=False)
    assert summary["num_images"] == 23 and summary["shards"] == 5
    assert summary["num_regions"] == sum(f.shape[0] for _, f in rows) and summary["resumed_from_row"] == 0
    store = FeatureStore(str(tmp_path / "store"))
    assert len(store) == 23 and store.ids() == sorted(i for i, _ in rows)
    assert "im00001" in store and "missing" not in store
    for image_id, f in rows:
        got = store[image_id]
        assert got.dtype == np.float32 and got.shape == f.shape
        want = f if dtype == "float32" else f.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got, want)
        assert store.num_boxes(image_id) == f.shape[0]
    with pytest.raises(KeyError) as e:
        store["missing"]
    assert "store" in str(e.value) and "'missing'" in str(e.value) and "image_id" in str(e.value)
    # a second call is a no-op on a finished store
    assert convert_features(str(tmp_path / "features.tsv"), str(tmp_path / "store"), dtype=dtype,
                            shard_size=5, progress=False)["num_images"] == 23


def test_open_feature_store_chooses_by_path(tmp_path):
    rows = make_rows(4, seed=2)
    write_tsv(tmp_path / "features.tsv", rows)
    assert isinstance(open_feature_store(str(tmp_path), progress=False), TsvFeatureStore)
    assert isinstance(open_feature_store(str(tmp_path / "features.tsv"), progress=False), TsvFeatureStore)
    convert_features(str(tmp_path / "features.tsv"), str(tmp_path / "features"), progress=False)
    assert isinstance(open_feature_store(str(tmp_path)), FeatureStore)
    assert isinstance(open_feature_store(str(tmp_path / "features")), FeatureStore)
    with pytest.raises(DataError):
        open_feature_store(str(tmp_path / "nothing"))


def test_converter_refuses_other_settings_and_bad_rows(tmp_path):
    rows = make_rows(6, seed=3)
    write_tsv(tmp_path / "features.tsv", rows)
    convert_features(str(tmp_path / "features.tsv"), str(tmp_path / "s"), shard_size=2, progress=False)
    with pytest.raises(DataError) as e:
        convert_features(str(tmp_path / "features.tsv"), str(tmp_path / "s"), dtype="float32",
                         shard_size=2, progress=False)
    assert "progress.json" in str(e.value) and "settings" in str(e.value)
    with open(tmp_path / "features.tsv", "ab") as f:
        f.write(encode_feature_row("im00001", rows[1][1]))          # duplicate id in row 7
    with pytest.raises(DataError) as e:
        convert_features(str(tmp_path / "features.tsv"), str(tmp_path / "s2"), progress=False)
    assert "features.tsv" in str(e.value) and "row 7" in str(e.value) and "image_id" in str(e.value)
    with open(tmp_path / "features.tsv", "ab") as f:
        f.write(b"x\t1\tAAAA\n")                                     # 1 float for 1 box
    with pytest.raises(DataError) as e:
        convert_features(str(tmp_path / "features.tsv"), str(tmp_path / "s3"), progress=False)
    assert "row 8" in str(e.value) and "'features'" in str(e.value)
    with pytest.raises(DataError):
        FeatureStore(str(tmp_path / "s3"))                           # unfinished store is refused


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from mvptr_ds.data import feature_store
real = feature_store.atomic_write_json
def slow(path, obj, **kwargs):  # slow storage: each manifest commit takes a while
    real(path, obj, **kwargs)
    time.sleep(0.03)
feature_store.atomic_write_json = slow
feature_store.convert_features({tsv!r}, {out!r}, dtype="float16", shard_size=40, progress=False)
"""


def test_sigkill_and_resume(tmp_path):
    rows = make_rows(3000, seed=4, max_boxes=2)
    tsv, out = str(tmp_path / "features.tsv"), str(tmp_path / "store")
    write_tsv(tmp_path / "features.tsv", rows)
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), tsv=tsv, out=out)])
    manifest = os.path.join(out, "progress.json")
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            if os.path.exists(manifest) and len(json.load(open(manifest))["shards"]) >= 5:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = json.load(open(manifest))
    assert not state["done"] and 5 <= len(state["shards"]) < 75
    assert not os.path.exists(os.path.join(out, "meta.json"))
    # garbage where the next shard is being written must not matter
    nxt = os.path.join(out, f"shard_{len(state['shards']):05d}.bin.tmp")
    with open(nxt, "wb") as f:
        f.write(b"\x00" * 12345)
    summary = convert_features(tsv, out, dtype="float16", shard_size=40, progress=False)
    assert summary["resumed_from_row"] == state["next_row"] > 0
    assert summary["num_images"] == 3000 and summary["shards"] == 75
    store = FeatureStore(out)
    assert len(store) == 3000
    for image_id, f in rows:
        np.testing.assert_array_equal(store[image_id], f.astype(np.float16).astype(np.float32))
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_conversion_is_deterministic(tmp_path):
    rows = make_rows(30, seed=5)
    write_tsv(tmp_path / "features.tsv", rows)
    for name in ("a", "b"):
        convert_features(str(tmp_path / "features.tsv"), str(tmp_path / name), shard_size=7, progress=False)
    files = sorted(p for p in os.listdir(tmp_path / "a") if p != "progress.json")
    assert files == sorted(p for p in os.listdir(tmp_path / "b") if p != "progress.json")
    for p in files:
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes(), p


def test_write_store_gives_the_converters_files(tmp_path):
    """Pairs written directly make the same shard and index files as the TSV converted; bad input is refused."""
    rows = make_rows(17, seed=7)
    write_tsv(tmp_path / "features.tsv", rows)
    convert_features(str(tmp_path / "features.tsv"), str(tmp_path / "a"), shard_size=5, progress=False)
    summary = write_store(iter(rows), str(tmp_path / "b"), shard_size=5, source="pairs")
    assert summary["num_images"] == 17 and summary["shards"] == 4
    files = sorted(p for p in os.listdir(tmp_path / "a") if p not in ("progress.json", "meta.json"))
    assert files == sorted(p for p in os.listdir(tmp_path / "b") if p not in ("progress.json", "meta.json"))
    for p in files:
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes(), p
    assert json.load(open(tmp_path / "b" / "meta.json"))["source"] == "pairs"
    with pytest.raises(DataError, match="not an empty folder"):
        write_store(iter(rows), str(tmp_path / "b"))
    bad = rows[:3] + [("nan_image", np.full((2, FEATURE_DIM), np.nan, np.float32))]
    with pytest.raises(DataError) as e:
        write_store(iter(bad), str(tmp_path / "c"), source="pairs")
    assert "pairs" in str(e.value) and "nan_image" in str(e.value) and "4" in str(e.value)


class _Reads:
    def __init__(self, store, ids):
        self.store, self.ids = store, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.store[self.ids[i]].sum(dtype=np.float64)


@pytest.mark.parametrize("kind", ["store", "tsv"])
def test_store_works_in_forked_workers(tmp_path, kind):
    import torch

    rows = make_rows(16, seed=6)
    write_tsv(tmp_path / "features.tsv", rows)
    convert_features(str(tmp_path / "features.tsv"), str(tmp_path / "s"), dtype="float32", progress=False)
    store = FeatureStore(str(tmp_path / "s")) if kind == "store" else TsvFeatureStore(str(tmp_path / "features.tsv"))
    store[rows[0][0]]  # open handles in the parent before forking
    ids = [i for i, _ in rows]
    loader = torch.utils.data.DataLoader(_Reads(store, ids), batch_size=4, num_workers=2,
                                         multiprocessing_context="fork")
    got = torch.cat([b for b in loader]).numpy()
    np.testing.assert_allclose(got, [f.sum(dtype=np.float64) for _, f in rows], rtol=1e-6)
