"""The text store (convert_text): the same examples as tokenizing the files, and bad input in it or in the files it
was made from is one error naming the file, row and field (exit 2 through the CLI)."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from conftest import main_one_error

from mvptr_ds.data.export import write_real_formats
from mvptr_ds.data.readers import DataError
from mvptr_ds.data.real_dataset import RealDataset, convert_text
from mvptr_ds.data.synthetic import SceneWorld, parse_synthetic_source
from mvptr_ds.run import main


LIMITS = [dict(max_seq_length=200, max_phrases=50, max_tag_length=200, max_img_seq_length=500),
          dict(max_seq_length=6, max_phrases=1, max_tag_length=4, max_img_seq_length=3)]


@pytest.fixture(scope="module")
def world():
    return SceneWorld(parse_synthetic_source("synthetic:seed=3,images=24,held_out=6"))


@pytest.fixture
def data(world, tmp_path):
    write_real_formats(world, str(tmp_path / "d"))
    return tmp_path / "d"


def _fields(ex):
    return (ex.sample_id, ex.image_id, ex.caption_ids, ex.concept_ids, ex.concept_word_links, ex.tag_ids)


def _same_dataset(a: RealDataset, b: RealDataset):
    assert len(a) == len(b) and a.report == b.report
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert _fields(x) == _fields(y), i
        assert x.regions.dtype == y.regions.dtype and np.array_equal(x.regions, y.regions)


@pytest.mark.parametrize("phrases", [True, False])
def test_store_gives_the_examples_of_the_files(world, tmp_path, phrases):
    d = tmp_path / "d"
    write_real_formats(world, str(d), phrases=phrases)
    if phrases:   # a tuple outside the vocabulary is counted in the report, as without the store
        lines = (d / "captions.jsonl").read_text().splitlines()
        rec = json.loads(lines[2])
        rec["phrases"].append(["unicorn", "purple"])
        (d / "captions.jsonl").write_text("\n".join(lines[:2] + [json.dumps(rec)] + lines[3:]) + "\n")
    files = [RealDataset(str(d), str(d / "tokenizer"), **lim) for lim in LIMITS]
    summary = convert_text(str(d), progress=False)
    assert summary["captions"] == len(world.captions) and os.path.isfile(d / "text" / "meta.json")
    for lim, slow in zip(LIMITS, files):
        fast = RealDataset(str(d), str(d / "tokenizer"), **lim)
        assert fast.store is not None and slow.store is None
        _same_dataset(fast, slow)
    assert fast.report["tuples_not_in_vocab"] == (1 if phrases else 0)
    assert fast.caption_image(5) == str(world.captions[5].image_id) == fast.image_key(fast[5].image_id)
    clone = pickle.loads(pickle.dumps(fast))            # spawned workers: the arrays are mapped again, not copied
    assert _fields(clone[7]) == _fields(fast[7]) and np.array_equal(clone[7].regions, fast[7].regions)
    for state in (fast.__getstate__(), fast.store.__getstate__()):
        assert not [k for k, v in state.items() if isinstance(v, np.ndarray)]


def test_collated_batches_equal_and_workers(data):
    from mvptr_ds.data.batching import Collator, ResumableLoader

    slow = RealDataset(str(data), str(data / "tokenizer"))
    convert_text(str(data), progress=False)
    fast = RealDataset(str(data), str(data / "tokenizer"))
    collator = Collator(fast.vocab_info, ("mlm", "mcr", "itm"))
    got = [ResumableLoader(ds, collator, 4, 0, 1, seed=3, num_workers=w) for ds, w in ((slow, 0), (fast, 1))]
    for a, b in zip(*(list(__import__("itertools").islice(iter(x), 3)) for x in got)):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("text_ids", "mlm_labels", "tag_ids",
                                                                      "mcr_labels", "region_feats"))


def _store_error(data, *must_contain):
    with pytest.raises(DataError) as e:
        RealDataset(str(data), str(data / "tokenizer"))
    for text in must_contain:
        assert str(text) in str(e.value), (text, str(e.value))


def _rewrite(path, change):
    a = np.load(path)
    a = change(a.copy())
    np.save(path, a)


def test_bad_stores_are_one_error_naming_file_row_field(data):
    convert_text(str(data), progress=False)
    text = data / "text"
    shutil.copytree(text, data / "good")

    def fresh():
        shutil.rmtree(text)
        shutil.copytree(data / "good", text)

    (text / "words.npy").write_bytes((text / "words.npy").read_bytes()[:100])        # a cut file
    _store_error(data, text / "words.npy", "not a readable .npy array", "field 'words'")
    fresh()
    _rewrite(text / "word_off.npy", lambda a: np.concatenate([a[:3], a[2:3] - 1, a[4:]]))
    _store_error(data, text / "word_off.npy", "row 4", "field 'word_off'", "never decrease")
    fresh()
    _rewrite(text / "tags.npy", lambda a: (a.__setitem__(6, 10 ** 6), a)[1])
    _store_error(data, text / "tags.npy", "row 7", "field 'tags'", "id 1000000 outside")
    fresh()
    _rewrite(text / "links.npy", lambda a: (a.__setitem__(0, 999), a)[1])
    _store_error(data, text / "links.npy", "row 1", "field 'links'", "word position 999", "line 1 of the captions")
    fresh()
    _rewrite(text / "words.npy", lambda a: (a.__setitem__(0, a[0] + 1), a)[1])        # valid ids, other encoding
    _store_error(data, text / "meta.json", "field 'encoding'", "line 1", "convert_text again")
    fresh()
    (text / "meta.json").unlink()
    _store_error(data, text, "no meta.json")
    fresh()
    stat = os.stat(data / "captions.jsonl")
    os.utime(data / "captions.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert RealDataset(str(data), str(data / "tokenizer")).store is not None     # touched (or copied): same bytes
    raw = (data / "captions.jsonl").read_bytes()
    at = len(raw) // 2 + raw[len(raw) // 2:].index(b"a ")
    (data / "captions.jsonl").write_bytes(raw[:at] + b"A" + raw[at + 1:])           # one letter, the same size
    _store_error(data, text / "meta.json", "field 'sources.captions'", "convert_text again")
    (data / "captions.jsonl").write_bytes(raw)
    with open(data / "predictions.tsv", "a") as f:                                   # a row more
        f.write("77777\t" + json.dumps({"objects": []}) + "\n")
    _store_error(data, text / "meta.json", "field 'sources.predictions'")


def test_conversion_validates_every_record(data, world):
    lines = (data / "captions.jsonl").read_text().splitlines()
    (data / "captions.jsonl").write_text("\n".join(lines[:4] + ['{"image_id": "3", "caption": ""}'] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"captions.jsonl, line 5, field 'caption': empty caption"):
        convert_text(str(data), progress=False)
    assert not os.path.exists(data / "text")
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    preds = (data / "predictions.tsv").read_text().splitlines()
    first = json.loads(lines[0])["image_id"]
    (data / "predictions.tsv").write_text("\n".join(p for p in preds if not p.startswith(first + "\t")) + "\n")
    with pytest.raises(DataError, match=r"captions.jsonl, line 1, field 'image_id'.*no tags"):
        convert_text(str(data), progress=False)
    (data / "predictions.tsv").write_text("\n".join(preds) + "\n")
    convert_text(str(data), progress=False)
    with pytest.raises(DataError, match="exists"):
        convert_text(str(data), progress=False)
    # an image of the store without region features, found at open
    feats = (data / "features.tsv").read_text().splitlines()
    (data / "features.tsv").write_text("\n".join(f for f in feats if not f.startswith(first + "\t")) + "\n")
    os.remove(data / "features.lineidx")
    os.remove(data / "imageid2idx.json")
    _store_error(data, "captions.jsonl", "line 1", "field 'image_id'", "no region features")


_one_error = main_one_error


def test_cli_convert_and_a_bad_store_exit_2(data, capsys, tmp_path, no_process_group):
    assert main(["convert_text", "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["captions"] > 0
    _one_error(capsys, ["convert_text", "--data", data], data / "text", "exists")
    _rewrite(data / "text" / "concepts.npy", lambda a: (a.__setitem__(2, -5), a)[1])
    _one_error(capsys, ["--data", data, "--max_steps", "1", "--micro_batch", "2", "--wandb", "disabled",
                        "--output_dir", tmp_path / "out"],
               data / "text" / "concepts.npy", "row 3", "field 'concepts'", "id -5")
