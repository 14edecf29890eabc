"""Readers of the real formats: good files parse, every bad input names file + row/line + field."""
import base64
import json
from pathlib import Path

import numpy as np
import pytest

from mvptr_ds.data.feature_store import TsvFeatureStore
from mvptr_ds.data.caption_files import CaptionIndex, read_id2phrase
from mvptr_ds.data.readers import (FEATURE_DIM, DataError, PredictionsReader, encode_feature_row, iter_feature_rows,
                                   read_lineidx, write_lineidx)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _feats(n, seed):
    return np.random.default_rng(seed).random((n, FEATURE_DIM), dtype=np.float32)


def write_tsv(path, rows, lineidx=True):
    """rows: list of (image_id, features) or raw bytes lines."""
    offsets, pos = [], 0
    with open(path, "wb") as f:
        for r in rows:
            line = r if isinstance(r, bytes) else encode_feature_row(*r)
            offsets.append(pos)
            f.write(line)
            pos += len(line)
    if lineidx:
        write_lineidx(str(path)[:-4] + ".lineidx", offsets)
    return offsets


def _err(excinfo, *parts):
    msg = str(excinfo.value)
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"


def test_features_roundtrip_through_tsv_slow_path(tmp_path):
    rows = [("img1", _feats(3, 0)), ("42", _feats(1, 1)), ("img0", _feats(0, 2))]
    write_tsv(tmp_path / "features.tsv", rows)
    store = TsvFeatureStore(str(tmp_path / "features.tsv"), progress=False)
    assert len(store) == 3 and "42" in store and "nope" not in store
    assert store.ids() == ["42", "img0", "img1"]
    for image_id, f in rows:
        got = store[image_id]
        assert got.dtype == np.float32 and got.shape == f.shape
        np.testing.assert_array_equal(got, f)
    with pytest.raises(KeyError) as e:
        store["nope"]
    _err(e, "features.tsv", "image_id", "nope")


def test_lineidx_built_when_missing_and_imageid2idx_used(tmp_path):
    rows = [(f"i{k}", _feats(2, k)) for k in range(5)]
    offsets = write_tsv(tmp_path / "features.tsv", rows, lineidx=False)
    store = TsvFeatureStore(str(tmp_path / "features.tsv"), progress=False)
    assert (tmp_path / "features.lineidx").read_text().split() == [str(o) for o in offsets]
    np.testing.assert_array_equal(store["i3"], rows[3][1])
    # imageid2idx.json decides which row holds which id; a wrong mapping is caught at access
    (tmp_path / "imageid2idx.json").write_text(json.dumps({f"i{k}": k for k in range(5)}))
    np.testing.assert_array_equal(TsvFeatureStore(str(tmp_path / "features.tsv"))["i4"], rows[4][1])
    (tmp_path / "imageid2idx.json").write_text(json.dumps({"i0": 1, "i1": 0, "i2": 2, "i3": 3, "i4": 4}))
    with pytest.raises(DataError) as e:
        TsvFeatureStore(str(tmp_path / "features.tsv"))["i0"]
    _err(e, "features.tsv", "row 2", "image_id", "'i1'")
    (tmp_path / "imageid2idx.json").write_text(json.dumps({"i0": 0, "i1": 9}))
    with pytest.raises(DataError) as e:
        TsvFeatureStore(str(tmp_path / "features.tsv"))
    _err(e, "imageid2idx.json", "'i1'", "row 9")


@pytest.mark.parametrize("case", ["truncated", "not_base64", "width", "fields", "num_boxes"])
def test_bad_feature_rows(tmp_path, case):
    good = encode_feature_row("a", _feats(2, 0))
    f = _feats(2, 1)
    bad = {
        "truncated": encode_feature_row("b", f)[:-1001] + b"\n",
        "not_base64": b"b\t2\t" + b"@@notbase64@@" * 10 + b"\n",
        "width": b"b\t2\t" + base64.b64encode(np.zeros((2, 2048), np.float32).tobytes()) + b"\n",
        "fields": b"b\t2\n",
        "num_boxes": b"b\ttwo\t" + base64.b64encode(f.tobytes()) + b"\n",
    }[case]
    field = {"truncated": "features", "not_base64": "features", "width": "features", "fields": "row",
             "num_boxes": "num_boxes"}[case]
    write_tsv(tmp_path / "features.tsv", [good, bad])
    with pytest.raises(DataError) as e:
        list(iter_feature_rows(str(tmp_path / "features.tsv")))
    _err(e, "features.tsv", "row 2", f"field '{field}'")
    if case == "width":
        _err(e, "2 x 2054", "width 2048")
    store = TsvFeatureStore(str(tmp_path / "features.tsv"), progress=False)   # slow path: at access
    np.testing.assert_array_equal(store["a"], _feats(2, 0))
    if case != "fields":
        with pytest.raises(DataError) as e:
            store["b"]
        _err(e, "features.tsv", "row 2", f"field '{field}'")


def test_lineidx_past_end_and_non_increasing(tmp_path):
    write_tsv(tmp_path / "features.tsv", [("a", _feats(1, 0))])
    size = (tmp_path / "features.tsv").stat().st_size
    (tmp_path / "features.lineidx").write_text(f"0\n{size + 10}\n")
    with pytest.raises(DataError) as e:
        read_lineidx(str(tmp_path / "features.lineidx"), str(tmp_path / "features.tsv"))
    _err(e, "features.lineidx", "line 2", "field 'offset'", "past the end")
    (tmp_path / "features.lineidx").write_text("0\n0\n")
    with pytest.raises(DataError) as e:
        TsvFeatureStore(str(tmp_path / "features.tsv"))
    _err(e, "features.lineidx", "line 2", "field 'offset'")


def test_stale_lineidx_missing_rows(tmp_path):
    write_tsv(tmp_path / "features.tsv", [("a", _feats(1, 0)), ("b", _feats(1, 1))])
    (tmp_path / "features.lineidx").write_text("0\n")
    with pytest.raises(DataError) as e:
        TsvFeatureStore(str(tmp_path / "features.tsv"))
    _err(e, "features.lineidx", "line 1", "field 'offset'", "stale")


def test_lineidx_not_at_line_start(tmp_path):
    offsets = write_tsv(tmp_path / "features.tsv", [("a", _feats(1, 0)), ("b", _feats(1, 1)), ("c", _feats(1, 2))])
    (tmp_path / "features.lineidx").write_text(f"0\n7\n{offsets[2]}\n")
    with pytest.raises(DataError) as e:
        TsvFeatureStore(str(tmp_path / "features.tsv"))
    _err(e, "features.tsv", "row 2", "field 'offset'")
    (tmp_path / "imageid2idx.json").write_text(json.dumps({"a": 0, "b": 1, "c": 2}))
    store = TsvFeatureStore(str(tmp_path / "features.tsv"))          # ids from imageid2idx: caught at access
    with pytest.raises(DataError) as e:
        store["b"]
    _err(e, "features.tsv", "row 2", "field 'offset'")


def test_duplicate_image_id_in_features(tmp_path):
    write_tsv(tmp_path / "features.tsv", [("a", _feats(1, 0)), ("b", _feats(1, 1)), ("a", _feats(1, 2))])
    with pytest.raises(DataError) as e:
        TsvFeatureStore(str(tmp_path / "features.tsv"))
    _err(e, "features.tsv", "row 3", "field 'image_id'", "duplicate image id 'a'", "row 1")


def _pred(cls):
    return {"objects": [{"class": c, "rect": [0, 0, 1, 1], "conf": 0.9} for c in cls],
            "image_h": 10, "image_w": 10}


def test_predictions_reader(tmp_path):
    p = tmp_path / "predictions.tsv"
    p.write_text(f"a\t{json.dumps(_pred(['man', 'surfboard']))}\n\nb\t{json.dumps(_pred([]))}\n")
    r = PredictionsReader(str(p))
    assert len(r) == 2 and "a" in r and "c" not in r
    assert r.classes("a") == ["man", "surfboard"] and r.classes("b") == []
    assert r["a"]["image_w"] == 10
    with pytest.raises(KeyError) as e:
        r["c"]
    _err(e, "predictions.tsv", "'c'")


def test_tags_are_the_release_s_set_of_names_from_ground_truth_when_present(tmp_path):
    p = tmp_path / "predictions.tsv"
    gt = dict(_pred(["dog", "dog", "man"]), gt_objects=[{"class": "woman"}, {"class": "kite"}, {"class": "woman"}])
    p.write_text(f"a\t{json.dumps(_pred(['man', 'dog', 'man', 'kite', 'dog']))}\nb\t{json.dumps(gt)}\n")
    r = PredictionsReader(str(p))
    assert r.classes("a") == ["man", "dog", "kite"]  # each name once, first occurrence first
    assert r.classes("b") == ["woman", "kite"]       # gt_objects win over the detections
    p.write_text(f"a\t{json.dumps(dict(_pred(['man']), gt_objects=[{'class': ''}]))}\n")
    with pytest.raises(DataError) as e:
        PredictionsReader(str(p))
    _err(e, "predictions.tsv", "row 1", "gt_objects[0].class")


@pytest.mark.parametrize("line,field", [
    ('b\t{"objects": [', "json"),
    ('b\t{"image_h": 3}', "objects"),
    ('b\t{"objects": [{"rect": [0,0,1,1]}]}', "objects[0].class"),
    ('b {"objects": []}', "row"),
])
def test_bad_predictions(tmp_path, line, field):
    p = tmp_path / "predictions.tsv"
    p.write_text(f"a\t{json.dumps(_pred(['x']))}\n{line}\n")
    with pytest.raises(DataError) as e:
        PredictionsReader(str(p))
    _err(e, "predictions.tsv", "row 2", f"field '{field}'")


def test_duplicate_prediction_rows(tmp_path):
    p = tmp_path / "predictions.tsv"
    p.write_text(f"a\t{json.dumps(_pred(['x']))}\na\t{json.dumps(_pred(['y']))}\n")
    with pytest.raises(DataError) as e:
        PredictionsReader(str(p))
    _err(e, "predictions.tsv", "row 2", "duplicate image id 'a'")


CAPS = [{"image_id": 7, "caption": "A man rides a wave.", "phrases": [["man"], ["man", "ride", "wave"]]},
        {"image_id": "x", "caption": "Two dogs."}]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_captions_jsonl_and_json(tmp_path, fmt):
    p = tmp_path / f"captions.{fmt}"
    p.write_text("\n".join(json.dumps(c) for c in CAPS) + "\n" if fmt == "jsonl" else json.dumps(CAPS))
    idx = CaptionIndex(str(p))
    assert len(idx) == 2 and idx.image_id(0) == "7" and idx.image_id(1) == "x"
    assert idx[0] == ("7", "A man rides a wave.", [("man",), ("man", "ride", "wave")])
    assert idx[1] == ("x", "Two dogs.", None)
    assert idx.offsets.dtype == np.int64 and idx.image_of.dtype == np.int64


@pytest.mark.parametrize("rec,field", [
    ('{"image_id": 1, "caption": "a', "json"),
    ('{"image_id": 1, "caption": "   "}', "caption"),
    ('{"caption": "a dog"}', "image_id"),
    ('{"image_id": 1}', "caption"),
    ('{"image_id": 1, "caption": "a dog", "phrases": [["a", "b", "c", "d"]]}', "phrases[0]"),
    ('{"image_id": 1, "caption": "a dog", "phrases": "dog"}', "phrases"),
])
def test_bad_captions_jsonl(tmp_path, rec, field):
    p = tmp_path / "captions.jsonl"
    p.write_text(json.dumps(CAPS[0]) + "\n\n" + rec + "\n")
    with pytest.raises(DataError) as e:
        CaptionIndex(str(p))
    _err(e, "captions.jsonl", "line 3", f"field '{field}'")


def test_bad_captions_json_list(tmp_path):
    p = tmp_path / "captions.json"
    p.write_text('[\n{"image_id": 1, "caption": "ok"},\n{"image_id": 2 "caption": "x"}\n]')
    with pytest.raises(DataError) as e:
        CaptionIndex(str(p))
    _err(e, "captions.json", "line 3", "field 'json'")
    p.write_text('[{"image_id": 1, "caption": "ok"}, {"image_id": 2, "caption": ""}]')
    with pytest.raises(DataError) as e:
        CaptionIndex(str(p))
    _err(e, "captions.json", "line 2", "field 'caption'", "empty caption")


def test_id2phrase_small_and_bad(tmp_path):
    p = tmp_path / "id2phrase.json"
    p.write_text(json.dumps({"30522": ["boat", "Black"], "1000": ["man"], "30600": ["man", "sit on", "bench"]}))
    v = read_id2phrase(str(p))
    assert len(v) == 3 and v.id_to_tuple[30522] == ("boat", "Black")
    assert v.lookup(["boat", "black"]) == 30522 and v.lookup(("man", "sit on", "bench")) == 30600
    assert v.lookup(["man", "sit", "bench"]) is None and v.max_id() == 30600
    for bad, field in [({"x1": ["a"]}, "x1"), ({"5": []}, "5"), ({"5": ["a", "b", "c", "d"]}, "5"),
                       ({"5": ["a"], "6": ["A"]}, "6")]:
        p.write_text(json.dumps(bad))
        with pytest.raises(DataError) as e:
            read_id2phrase(str(p))
        _err(e, "id2phrase.json", f"field '{field}'")
    p.write_text('{"5": ["a"],\n "5": ["b"]}')
    with pytest.raises(DataError) as e:
        read_id2phrase(str(p))
    _err(e, "id2phrase.json", "duplicate key '5'")
    p.write_text('{"5": ["a"],\n "6": ["b"')
    with pytest.raises(DataError) as e:
        read_id2phrase(str(p))
    _err(e, "id2phrase.json", "line 2", "field 'json'")


def test_authors_id2phrase_ids_as_released():
    path = SHARED / "id2phrase_new.json"
    if not path.exists():
        pytest.skip(f"{path} not available")
    v = read_id2phrase(str(path))
    raw = json.loads(path.read_text())
    assert len(v) == len(raw) == 73599
    assert all(v.id_to_tuple[int(k)] == tuple(t) for k, t in raw.items())
    assert v.lookup(["man", "ride", "wave"]) == 30530 and v.lookup(["boat", "black"]) == 30523
    assert min(v.id_to_tuple) == 999 and v.max_id() == 86050
    assert all(i >= 30522 for i, t in v.id_to_tuple.items() if len(t) > 1)
