"""The built-in scene world: spec parsing, determinism, structure, ground truth and learnability."""
import json
from pathlib import Path

import numpy as np
import pytest

from mvptr_ds.config import ConfigError
from mvptr_ds.data.synthetic import (FEATURE_DIM, ROI_DIM, SceneSpec, SceneWorld, load_scene_names,
                                     parse_synthetic_source)
from mvptr_ds.data.vocab import SPECIAL_TOKENS, VocabInfo, WordTokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SMALL = SceneSpec(images=40, held_out=10, captions_per_image=2)


@pytest.fixture(scope="module")
def world():
    return SceneWorld(SMALL)


def test_parse_defaults_and_overrides():
    assert parse_synthetic_source("synthetic") == SceneSpec()
    spec = parse_synthetic_source("synthetic:seed=3,images=20,objects=2-5,regions=12,noise=0.25")
    assert (spec.seed, spec.images, spec.objects, spec.regions, spec.noise) == (3, 20, (2, 5), (12, 12), 0.25)


@pytest.mark.parametrize("source, words", [
    ("synthetic:colour=3", "unknown key 'colour'"),
    ("synthetic:images=many", "images='many'"),
    ("synthetic:objects=3-x", "objects='3-x'"),
    ("synthetic:seed", "has no value"),
    ("coco", "not a synthetic source"),
])
def test_parse_errors_name_the_key(source, words):
    with pytest.raises(ConfigError, match=words):
        parse_synthetic_source(source)


@pytest.mark.parametrize("kwargs, key", [
    ({"images": 0}, "images"), ({"objects": (5, 3)}, "objects"), ({"classes": 100000}, "classes"),
    ({"tag_miss": 1.5}, "tag_miss"), ({"objects": (3, 60)}, "objects"), ({"noise": -1.0}, "noise"),
])
def test_invalid_spec_is_a_config_error(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        SceneWorld(SceneSpec(**kwargs))


def _fingerprint(w: SceneWorld):
    return ([(im.image_id, im.width, im.height, im.boxes.tobytes(), im.regions.tobytes(),
              [(o.name, o.attribute, o.region) for o in im.objects], im.relations,
              [(t.name, t.region, t.conf) for t in im.tags]) for im in w.images],
            [(c.text, c.tuples, c.tuple_words, c.tuple_regions) for c in w.captions], w.concepts, w.vocab)


def test_same_seed_same_world_different_seed_differs(world):
    assert _fingerprint(SceneWorld(SMALL)) == _fingerprint(world)
    other = SceneWorld(SceneSpec(images=40, held_out=10, seed=1))
    assert [c.text for c in other.captions] != [c.text for c in world.captions]
    assert not np.array_equal(other.images[0].regions[:, :ROI_DIM].mean(0), world.images[0].regions[:, :ROI_DIM].mean(0))
    # Same laws: a model trained on one seed's world reads another's with the same ids.
    assert other.concepts == world.concepts and other.tokenizer.words == world.tokenizer.words
    assert np.array_equal(other._laws.class_protos, world._laws.class_protos)
    new_laws = SceneWorld(SceneSpec(images=40, held_out=10, world_seed=1))
    assert not np.array_equal(new_laws._laws.class_protos, world._laws.class_protos)


def test_vocabulary_layout(world):
    v = world.vocab
    assert isinstance(v, VocabInfo)
    assert v.only_word_size == len(world.tokenizer) and v.concept_range == (v.only_word_size, v.vocab_size)
    assert sorted(world.concepts) == list(range(*v.concept_range))
    assert v.real_word_range == (len(SPECIAL_TOKENS), v.only_word_size)
    assert (v.pad_id, v.mask_id) == (0, world.tokenizer.mask_id)
    assert v.vocab_size < 1000  # small table for the tiny model
    lengths = {len(t) for t in world.concepts.values()}
    assert lengths == {1, 2, 3}


def test_tokenizer_round_trip_and_unknown_words():
    tok = WordTokenizer(["red dog", "in front of", "dog"])
    assert tok.words[:5] == list(SPECIAL_TOKENS) and len(tok) == 5 + 5
    ids = tok.encode("A red dog in front of")
    assert tok.decode(ids) == "a red dog in front of".replace("a ", "[UNK] ", 1)
    assert tok.encode("cat")[0] == tok.unk_id
    assert tok.decode([tok.cls_id, ids[1], tok.sep_id, tok.pad_id]) == "red"
    with pytest.raises(ValueError, match="outside the word vocabulary"):
        tok.decode([len(tok)])


def test_images_regions_boxes_and_tags(world):
    spec = world.spec
    assert len(world.images) == spec.images + spec.held_out
    for im in world.images:
        n = im.regions.shape[0]
        assert im.regions.dtype == np.float32 and im.regions.shape[1] == FEATURE_DIM
        assert max(spec.regions[0], len(im.objects)) <= n <= max(spec.regions[1], len(im.objects))
        assert spec.objects[0] <= len(im.objects) <= spec.objects[1]
        assert (im.regions >= 0).all()
        box6 = im.regions[:, ROI_DIM:]
        np.testing.assert_allclose(box6[:, :4], im.boxes / [im.width, im.height, im.width, im.height], rtol=1e-6)
        np.testing.assert_allclose(box6[:, 4:], box6[:, 2:4] - box6[:, :2], atol=1e-6)
        assert (box6 >= 0).all() and (box6 <= 1).all()
        assert len({o.name for o in im.objects}) == len(im.objects)
        assert sorted(o.region for o in im.objects) == sorted(set(o.region for o in im.objects))
        object_regions = {o.region: o.name for o in im.objects}
        for t in im.tags:  # a right tag names its object; a wrong one sits on a distractor
            assert object_regions.get(t.region, t.name) == t.name
        assert [t.conf for t in im.tags] == sorted((t.conf for t in im.tags), reverse=True)


def test_tag_noise_rates():
    w = SceneWorld(SceneSpec(images=300, held_out=0, captions_per_image=1, tag_miss=0.2, tag_wrong=0.1))
    objects = sum(len(im.objects) for im in w.images)
    distractors = sum(im.regions.shape[0] - len(im.objects) for im in w.images)
    right = sum(1 for im in w.images for t in im.tags if t.region in {o.region for o in im.objects})
    wrong = sum(len(im.tags) for im in w.images) - right
    assert abs(1 - right / objects - 0.2) < 0.03
    assert abs(wrong / distractors - 0.1) < 0.02


def test_captions_tuples_links_and_regions(world):
    words_of = world.tokenizer
    for cap in world.captions:
        im = world.images[cap.image_id]
        words = cap.text.split()
        assert len(cap.tuples) == len(cap.tuple_words) == len(cap.tuple_regions) >= 1
        by_name = {o.name: o for o in im.objects}
        for tup, links, region in zip(cap.tuples, cap.tuple_words, cap.tuple_regions):
            assert tup in world.concept_ids
            assert sorted(" ".join(words[i] for i in links).split()) == sorted(" ".join(tup).split())
            subject = by_name[tup[0]]
            assert region == subject.region
            if len(tup) == 2:
                assert subject.attribute == tup[1]
            if len(tup) == 3:
                assert (list(by_name).index(tup[0]), tup[1], list(by_name).index(tup[2])) in im.relations
        assert words_of.unk_id not in words_of.encode(cap.text)
    texts = [c.text for c in world.captions]
    assert len(set(texts)) > 0.9 * len(texts)  # varied templates and contents
    assert any(len(t) == 3 for c in world.captions for t in c.tuples)
    assert any(c.text.startswith("there is") for c in world.captions)


def test_examples_match_the_raw_content(world):
    assert len(world.train) == SMALL.images * SMALL.captions_per_image
    assert len(world.held_out) == SMALL.held_out * SMALL.captions_per_image
    train_images = {world.train[i].image_id for i in range(len(world.train))}
    held_images = {world.held_out[i].image_id for i in range(len(world.held_out))}
    assert not train_images & held_images
    ex = world.held_out[3]
    cap = world.captions[ex.sample_id]
    assert world.tokenizer.decode(ex.caption_ids) == cap.text
    assert [world.concepts[c] for c in ex.concept_ids] == cap.tuples
    assert ex.concept_word_links == cap.tuple_words and ex.concept_regions == cap.tuple_regions
    assert world.tokenizer.decode(ex.tag_ids) == " ".join(t.name for t in world.images[ex.image_id].tags)
    assert ex.regions is world.images[ex.image_id].regions
    with pytest.raises(IndexError):
        world.held_out[len(world.held_out)]


def test_learnable_retrieval_and_grounding_with_the_true_prototypes():
    """An oracle that knows the class/attribute prototypes retrieves and grounds from the data alone.

    Captions that mention one or two objects are genuinely ambiguous among 64 images, so R@1 stays below
    1 (as on real data) while R@5 is near 1.
    """
    w = SceneWorld(SceneSpec(images=1, held_out=64, seed=5))
    laws = w._laws

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def proto(t):  # object or (object, attribute) concept -> unit prototype [2048]
        p = laws.class_protos[laws.classes.index(t[0])]
        if len(t) == 2:
            p = p + 0.6 * laws.attr_protos[laws.attributes.index(t[1])]
        return unit(p)

    held = [im for im in w.images if im.split == "held_out"]
    feats = [unit(im.regions[:, :ROI_DIM]) for im in held]
    caps = [c for c in w.captions if c.split == "held_out"]
    ranks, grounded, total = [], 0, 0
    for cap in caps:
        tuples = [t for t in cap.tuples if len(t) < 3]
        scores = np.array([sum((f @ proto(t)).max() for t in tuples) for f in feats])
        order = [held[i].image_id for i in np.argsort(-scores)]
        ranks.append(order.index(cap.image_id))
        f = feats[cap.image_id - held[0].image_id]
        for t, r in zip(cap.tuples, cap.tuple_regions):
            grounded += int(np.argmax(f @ proto(t[:1]))) == r
            total += 1
    ranks = np.array(ranks)
    assert (ranks < 1).mean() > 0.7, (ranks < 1).mean()
    assert (ranks < 5).mean() > 0.95, (ranks < 5).mean()
    assert grounded / total > 0.95, grounded / total


def test_default_world_sizes():
    w = SceneWorld()
    assert len(w.train) == 1024 and len(w.held_out) == 128


def test_names_come_from_the_detector_label_map():
    names = load_scene_names()
    assert len(names["objects"]) >= 100 and len(names["attributes"]) >= 40 and len(names["predicates"]) >= 10
    path = SHARED / "VG-SGG-dicts-vgoi6-clipped.json"
    if not path.exists():
        pytest.skip(f"{path} not present (needs ../shared/data next to the repository)")
    label_map = json.loads(path.read_text())
    assert set(names["objects"]) <= set(label_map["label_to_idx"])
    assert set(names["attributes"]) <= set(label_map["attribute_to_idx"])
    assert set(names["predicates"]) <= set(label_map["predicate_to_idx"])
