"""Real-data path end to end: synthetic world -> real formats -> converter/store -> RealDataset."""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from mvptr_ds.data.export import synth, write_real_formats
from mvptr_ds.data.feature_store import FeatureStore, convert_features
from mvptr_ds.data.caption_files import read_id2phrase
from mvptr_ds.data.readers import DataError
from mvptr_ds.data.batching import Collator
from mvptr_ds.data.caption_text import _Pieces
from mvptr_ds.data.real_dataset import RealDataset, load_tokenizer, real_vocab_info
from mvptr_ds.data.synthetic import SceneWorld, parse_synthetic_source

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
BIG = dict(max_seq_length=200, max_phrases=50, max_tag_length=200, max_img_seq_length=500)


@pytest.fixture(scope="module")
def world():
    return SceneWorld(parse_synthetic_source("synthetic:seed=3,images=24,held_out=6"))


@pytest.fixture(scope="module")
def written(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    summary = write_real_formats(world, str(out))
    assert summary["images"] == 30 and summary["captions"] == len(world.captions)
    return out


def _same(a, b, exact=True):
    assert (a.sample_id, a.image_id) == (b.sample_id, b.image_id)
    assert a.caption_ids == b.caption_ids and a.tag_ids == b.tag_ids
    assert a.concept_ids == b.concept_ids
    assert [sorted(x) for x in a.concept_word_links] == [sorted(x) for x in b.concept_word_links]
    # fp16 as a converted fp16 store holds them (converted on the device), else float32
    assert a.regions.dtype == (np.float32 if exact else np.float16) and a.regions.shape == b.regions.shape
    np.testing.assert_array_equal(a.regions, b.regions.astype(a.regions.dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_through_converted_store(world, written, tmp_path, dtype):
    convert_features(str(written / "features.tsv"), str(tmp_path / "features"), dtype=dtype, shard_size=7,
                     progress=False)
    store = FeatureStore(str(tmp_path / "features"))
    assert len(store) == len(world.images)
    for im in world.images:
        want = im.regions if dtype == "float32" else im.regions.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(store[str(im.image_id)], want)
    for name in ("predictions.tsv", "captions.jsonl", "id2phrase.json", "tokenizer"):
        os.symlink(written / name, tmp_path / name)
    ds = RealDataset(str(tmp_path), str(tmp_path / "tokenizer"), **BIG)
    assert isinstance(ds.features, FeatureStore) and len(ds) == len(world.captions)
    for i in range(len(ds)):
        _same(ds[i], world.example(i), exact=dtype == "float32")


def test_concepts_fill_the_slots_a_short_caption_leaves(world, written):
    """The release's rule, shared by pre-training and the tasks: concepts up to max_phrases + max_seq_length - 2
    - caption pieces, in the order given."""
    from mvptr_ds.data.caption_text import CaptionEncoder

    tok, vocab = load_tokenizer(str(written / "tokenizer")), read_id2phrase(str(written / "id2phrase.json"))
    i = next(k for k in range(len(world.captions)) if len(world.example(k).concept_ids) >= 4)
    ex = world.example(i)
    text, phrases = world.captions[i].text, [vocab.id_to_tuple[c] for c in ex.concept_ids]
    words = len(ex.caption_ids)
    for max_phrases, spare in ((1, 0), (1, 2), (0, 3)):
        enc = CaptionEncoder(tok, vocab, max_seq_length=words + 2 + spare, max_phrases=max_phrases)
        ids, concepts, links = enc.caption(text, phrases)
        assert ids == ex.caption_ids and concepts == ex.concept_ids[:max_phrases + spare] and len(links) == len(concepts)
    cut = CaptionEncoder(tok, vocab, max_seq_length=words, max_phrases=1)  # a cut caption leaves no slot free
    ids, concepts, _ = cut.caption(text, phrases)
    assert ids == ex.caption_ids[:words - 2] and concepts == ex.concept_ids[:1]


def test_pieces_match_the_tokenizer_call(written):
    """The Rust backend path gives the ids and offsets of ``tokenizer(text, truncation=True, max_length=L)``."""
    tok = load_tokenizer(str(written / "tokenizer"))
    pieces = _Pieces(tok)
    assert pieces.backend is not None
    texts = ["a red cup on the table near two bikes", "", "Dogs, cats! and birds' nests", "x " * 80]
    for text in texts:
        for limit in (1, 3, 33, 500):
            enc = tok(text, add_special_tokens=False, truncation=True, max_length=limit, return_offsets_mapping=True)
            ids, offsets = pieces(text, limit)
            assert list(ids) == list(enc["input_ids"]) and [tuple(o) for o in offsets] == \
                [tuple(o) for o in enc["offset_mapping"]], (text, limit)
    tok("a b c", add_special_tokens=False, truncation=True, max_length=1)   # truncation left on the shared backend
    assert len(pieces("a b c", 10)[0]) == 3                                 # does not reach the private copy


def test_fp16_store_batch_gives_the_fp32_loss(written, tmp_path):
    """Batches of an fp16 store stay fp16 on the host; converted by the trainer's ``batch.to(device, dtype)``
    they give exactly the loss of the same features converted to float32 on the host."""
    import dataclasses

    import torch

    from mvptr_ds.config import DataConfig, RunConfig, TrainConfig, model_config_from
    from mvptr_ds.objectives import build_pretraining_module
    from mvptr_ds.assembly import resolve_model_config

    convert_features(str(written / "features.tsv"), str(tmp_path / "features"), progress=False)
    for name in ("predictions.tsv", "captions.jsonl", "id2phrase.json", "tokenizer"):
        os.symlink(written / name, tmp_path / name)
    ds = RealDataset(str(tmp_path), str(tmp_path / "tokenizer"))
    examples = [ds[i] for i in range(6)]
    collator = Collator(ds.vocab_info, ("mlm", "mcr", "vsc", "itm", "wpg"))
    half = collator(examples)
    full = collator([dataclasses.replace(e, regions=e.regions.astype(np.float32)) for e in examples])
    assert half.region_feats.dtype == torch.float16 and full.region_feats.dtype == torch.float32
    assert torch.equal(half.region_feats.float(), full.region_feats)
    cfg = RunConfig(model=model_config_from("tiny"), data=DataConfig(source=str(tmp_path)),
                    train=TrainConfig(wandb="disabled"))
    model_cfg = resolve_model_config(cfg.model, ds.vocab_info, cfg.data)
    torch.manual_seed(0)
    module = build_pretraining_module(model_cfg, ("mlm", "mcr", "vsc", "itm", "wpg"), cfg.objectives).eval()
    with torch.no_grad():
        a = module(half.to("cpu", dtype=torch.float32)).loss
        b = module(full.to("cpu", dtype=torch.float32)).loss
    assert torch.isfinite(a) and a.item() == b.item()


def test_tsv_slow_path_and_vocab_info(world, written):
    ds = RealDataset(str(written), str(written / "tokenizer"), **BIG)
    assert ds.vocab_info == world.vocab
    assert ds.report["tuples_not_in_vocab"] == 0 and ds.report["captions_to_extract"] == 0
    for i in (0, 5, len(ds) - 1):
        _same(ds[i], world.example(i))
    assert ds.image_key(ds[3].image_id) == str(world.captions[3].image_id)
    clone = pickle.loads(pickle.dumps(ds))                   # spawn-started workers get a pickled copy
    _same(clone[4], world.example(4))


def test_truncation_to_configured_lengths(written):
    ds = RealDataset(str(written), str(written / "tokenizer"), max_seq_length=5, max_phrases=2,
                     max_tag_length=4, max_img_seq_length=3)
    for i in range(len(ds)):
        ex = ds[i]
        assert len(ex.caption_ids) <= 3 and len(ex.concept_ids) <= 2 and len(ex.tag_ids) <= 2
        assert ex.regions.shape[0] <= 3
        assert all(0 <= p < len(ex.caption_ids) for links in ex.concept_word_links for p in links)


def test_extracted_concepts_match_the_world(world, tmp_path):
    write_real_formats(world, str(tmp_path), phrases=False)
    ds = RealDataset(str(tmp_path), str(tmp_path / "tokenizer"), **BIG)
    assert ds.report["captions_to_extract"] == len(world.captions)
    tp = fp = fn = 0
    for i in range(len(ds)):
        got, want = set(ds[i].concept_ids), set(world.example(i).concept_ids)
        tp, fp, fn = tp + len(got & want), fp + len(got - want), fn + len(want - got)
    assert tp / (tp + fp) >= 0.95 and tp / (tp + fn) >= 0.95


def test_bad_directories(world, tmp_path):
    write_real_formats(world, str(tmp_path))
    tok = str(tmp_path / "tokenizer")
    caps = (tmp_path / "captions.jsonl").read_text().splitlines()
    # a caption of an unknown image
    (tmp_path / "captions.jsonl").write_text("\n".join(caps[:3] + [json.dumps(
        {"image_id": "999999", "caption": "a dog"})] + caps[3:]) + "\n")
    with pytest.raises(DataError) as e:
        RealDataset(str(tmp_path), tok)
    msg = str(e.value)
    assert "captions.jsonl" in msg and "line 4" in msg and "'image_id'" in msg and "999999" in msg
    # an image without tags
    (tmp_path / "captions.jsonl").write_text("\n".join(caps) + "\n")
    preds = (tmp_path / "predictions.tsv").read_text().splitlines()
    first_image = json.loads(caps[0])["image_id"]
    (tmp_path / "predictions.tsv").write_text("\n".join(p for p in preds if not p.startswith(first_image + "\t")))
    with pytest.raises(DataError) as e:
        RealDataset(str(tmp_path), tok)
    assert "line 1" in str(e.value) and "tags" in str(e.value) and "predictions.tsv" in str(e.value)
    # tuples outside the vocabulary are counted and reported, not an error
    (tmp_path / "predictions.tsv").write_text("\n".join(preds) + "\n")
    rec = json.loads(caps[0])
    rec["phrases"] = rec["phrases"] + [["unicorn", "purple"]]
    (tmp_path / "captions.jsonl").write_text("\n".join([json.dumps(rec)] + caps[1:]) + "\n")
    ds = RealDataset(str(tmp_path), tok, **BIG)
    assert ds.report["tuples_not_in_vocab"] == 1 and ds.report["not_in_vocab_examples"] == [["unicorn", "purple"]]
    assert ds[0].concept_ids == world.example(0).concept_ids
    # a vocabulary whose tuples sit inside the tokenizer's word ids
    (tmp_path / "id2phrase.json").write_text(json.dumps({"7": ["dog", "red"]}))
    with pytest.raises(DataError) as e:
        RealDataset(str(tmp_path), tok)
    assert "id2phrase.json" in str(e.value) and "'7'" in str(e.value)


def test_bare_vocab_txt_tokenizer_and_synth_cli_body(tmp_path):
    summary = synth(str(tmp_path / "d"), data="synthetic:images=4,held_out=0")
    assert summary["images"] == 4
    os.remove(tmp_path / "d" / "tokenizer" / "tokenizer_config.json")
    tok = load_tokenizer(str(tmp_path / "d" / "tokenizer"))
    assert tok.convert_tokens_to_ids("[MASK]") == 4
    assert len(RealDataset(str(tmp_path / "d"), tok)) == summary["captions"]


def test_vocab_info_of_the_authors_layout(tmp_path):
    path = SHARED / "id2phrase_new.json"
    if not path.exists():
        pytest.skip(f"{path} not available")
    vocab = read_id2phrase(str(path))
    # a BERT-uncased-shaped vocab.txt: [PAD], [unused0-98], [UNK], [CLS], [SEP], [MASK], [unused99-993],
    # then words; the authors' single-word concepts below 30522 are placed at their ids.
    lines = ["[PAD]"] + [f"[unused{k}]" for k in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    lines += [f"[unused{k}]" for k in range(99, 994)]
    words = {i: t[0] for i, t in vocab.id_to_tuple.items() if i < 30522}
    lines += [words.get(i, f"filler{i}") for i in range(999, 30522)]
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n")
    info = real_vocab_info(load_tokenizer(str(tmp_path)), vocab)
    assert (info.vocab_size, info.only_word_size) == (86051, 30522)
    assert info.word_range == (999, 30522) and info.concept_range == (30522, 86051)
    assert (info.pad_id, info.cls_id, info.sep_id, info.mask_id) == (0, 101, 102, 103)
