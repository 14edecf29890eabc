"""Corruption statistics (15% / 80-10-10, linked concepts always masked), purity and per-batch draws."""
import numpy as np
import pytest
import torch

from mvptr_ds.data import corruption
from mvptr_ds.data.batching import BatchContext, Collator
from mvptr_ds.data.synthetic import SceneSpec, SceneWorld
from mvptr_ds.data.vocab import VocabInfo

VOCAB = VocabInfo(vocab_size=1000, only_word_size=600, pad_id=0, cls_id=2, sep_id=3, mask_id=4,
                  concept_range=(600, 1000), word_range=(5, 600))
N = 400_000   # 60k selected positions: the 80/10/10 ratios have a std of about 0.0016, so 1e-2 is > 6 sigma
TOL = 1e-2


def _gen(seed=0):
    return np.random.default_rng(seed)


def test_word_masking_statistics():
    ids = _gen(1).integers(5, 600, N)
    out = corruption.mask_tokens(ids, _gen(2), 0.15, VOCAB.mask_id, VOCAB.real_word_range)
    sel = out.selected
    assert abs(sel.mean() - 0.15) < 2e-3
    masked = (out.ids == VOCAB.mask_id) & sel
    kept = (out.ids == ids) & sel
    random = sel & ~masked & ~kept
    n = sel.sum()
    assert abs(masked.sum() / n - 0.8) < TOL
    # A random draw equals the original 1 time in 595; it then counts as kept.
    assert abs(random.sum() / n - 0.1) < TOL
    assert abs(kept.sum() / n - 0.1) < TOL
    assert np.array_equal(out.ids[~sel], ids[~sel])
    assert np.array_equal(out.labels[sel], ids[sel]) and (out.labels[~sel] == -1).all()
    assert out.ids[random].min() >= 5 and out.ids[random].max() < 600  # inside the range given
    assert out.ids.dtype == out.labels.dtype == np.int64


def test_concept_corruption_linked_always_masked_others_at_rate():
    k = N // 2
    concepts = _gen(3).integers(600, 1000, k)
    words_selected = np.zeros(k, dtype=bool)
    words_selected[::2] = True       # concept j is linked to word j: every even concept is linked
    links = [[j] for j in range(k)]
    out = corruption.corrupt_concepts(concepts, links, words_selected, _gen(4), 0.15, VOCAB.mask_id,
                                      VOCAB.concept_range)
    assert (out[::2] == VOCAB.mask_id).all()
    rest, orig = out[1::2], concepts[1::2]
    changed = rest != orig
    masked = rest == VOCAB.mask_id
    sel_rate = changed.mean() / 0.9  # 10% of the selected keep their id
    assert abs(sel_rate - 0.15) < 3e-3
    assert abs(masked.sum() / changed.sum() - 8 / 9) < TOL
    rand = changed & ~masked
    assert rest[rand].min() >= 600 and rest[rand].max() < 1000


def test_links_to_truncated_words_are_ignored_and_empty_inputs_work():
    concepts = np.array([700, 701])
    out = corruption.corrupt_concepts(concepts, [[5], [0]], np.array([True]), _gen(), 0.0, 4, (600, 1000))
    assert out.tolist() == [700, 4]
    empty = corruption.corrupt_concepts(np.zeros(0, dtype=np.int64), [], np.zeros(0, dtype=bool),
                                        _gen(), 0.15, 4, (600, 1000))
    assert empty.shape == (0,)
    assert corruption.mask_tokens(np.zeros(0, dtype=np.int64), _gen(), 0.15, 4, (5, 600)).ids.shape == (0,)
    # An empty concept range keeps the concept where a random one would be drawn.
    kept = corruption.corrupt_concepts(np.full(2000, 700), [[]] * 2000, np.zeros(0, dtype=bool), _gen(),
                                       1.0, 4, (600, 600))
    assert set(kept.tolist()) == {4, 700}


def test_corrupt_sample_respects_objectives_and_is_pure():
    cap = _gen(5).integers(5, 600, 3000)
    con = _gen(6).integers(600, 1000, 300)
    tags = _gen(7).integers(5, 600, 3000)
    links = [[3 * j] for j in range(300)]
    off = corruption.corrupt_sample(cap, con, links, tags, _gen(8), VOCAB, 0.15, mlm=False, mcr=False)
    assert np.array_equal(off.caption_ids, cap) and np.array_equal(off.concept_ids, con)
    assert np.array_equal(off.tag_ids, tags)
    assert (off.mlm_labels == -1).all() and (off.mcr_labels == -1).all()
    a = corruption.corrupt_sample(cap, con, links, tags, _gen(8), VOCAB, 0.15, mlm=True, mcr=True)
    b = corruption.corrupt_sample(cap, con, links, tags, _gen(8), VOCAB, 0.15, mlm=True, mcr=True)
    c = corruption.corrupt_sample(cap, con, links, tags, _gen(9), VOCAB, 0.15, mlm=True, mcr=True)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("caption_ids", "concept_ids", "tag_ids"))
    assert not np.array_equal(a.caption_ids, c.caption_ids)
    assert (a.mlm_labels != -1).any() and (a.mcr_labels != -1).any()
    linked_selected = a.mlm_labels[::3][:300] != -1
    assert (a.concept_ids[linked_selected] == VOCAB.mask_id).all()
    only_mcr = corruption.corrupt_sample(cap, con, links, tags, _gen(8), VOCAB, 0.15, mlm=False, mcr=True)
    assert np.array_equal(only_mcr.caption_ids, cap) and (only_mcr.mcr_labels != -1).any()


def test_seeds_mix_all_inputs():
    seeds = {corruption.mix_seed(1, s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450
    assert corruption.mix_seed(1, 2) != corruption.mix_seed(2, 1)
    assert all(0 <= s < 2 ** 63 for s in seeds)
    g1, g2 = corruption.sample_generator(0, 1, 2), corruption.batch_generator(0, 1, 2)
    assert not np.array_equal(g1.random(4), g2.random(4))
    assert np.array_equal(corruption.sample_generator(0, 1, 2).random(4), corruption.sample_generator(0, 1, 2).random(4))


def test_wpg_negatives_pick_other_images_uniformly():
    image_ids = np.array([7, 7, 8, 9, 9, 9])
    counts = np.zeros((6, 6))
    gen = _gen(10)
    for _ in range(3000):
        neg = corruption.wpg_negative_pairs(image_ids, gen)
        assert (image_ids[neg] != image_ids).all()
        counts[np.arange(6), neg] += 1
    # Row 0 (image 7) picks among indices 2..5 uniformly.
    assert counts[0, :2].sum() == 0 and (abs(counts[0, 2:] / 3000 - 0.25) < 0.04).all()
    assert corruption.wpg_negative_pairs(np.array([3, 3, 3]), gen).tolist() == [-1, -1, -1]
    assert corruption.wpg_negative_pairs(np.array([3]), gen).tolist() == [-1]
    picks = corruption.wpg_picks(4, 9, gen)
    assert picks.shape == (4, 9) and picks.dtype == np.float32 and (picks >= 0).all() and (picks < 1).all()


def test_release_wpg_negatives_are_any_other_pair_and_itm_splits_half():
    image_ids = np.array([7, 7, 8])
    gen = _gen(11)
    seen = np.zeros((3, 3))
    for _ in range(600):
        neg = corruption.wpg_negative_pairs(image_ids, gen, exclude_same_image=False)
        seen[np.arange(3), neg] += 1
    assert (np.diag(seen) == 0).all() and seen[0, 1] > 200  # the other caption of image 7 is a negative too
    assert corruption.wpg_negative_pairs(np.array([3]), gen, exclude_same_image=False).tolist() == [-1]
    sides = np.stack([corruption.itm_text_side(5, gen) for _ in range(1000)])
    assert (sides.sum(1) == 2).all() and (abs(sides.mean(0) - 0.4) < 0.06).all()  # B // 2 rows, any of them


def test_random_words_come_from_the_whole_word_vocabulary(world):
    """The release draws the 10% random replacements from every word piece (its tokenizer's whole vocabulary)."""
    collate = Collator(world.vocab, ("mlm", "mcr"), mask_prob=1.0)
    examples = [world.train[i] for i in range(len(world.train))]
    drawn = []
    for epoch in range(4):
        batch = collate(examples, BatchContext(seed=2, epoch=epoch))
        words = batch.mlm_labels != -1
        replaced = words & (batch.text_ids != world.vocab.mask_id) & (batch.text_ids != batch.mlm_labels)
        drawn.append(batch.text_ids[replaced])
    drawn = torch.cat(drawn)
    assert drawn.min() < world.vocab.real_word_range[0] and drawn.max() < world.vocab.only_word_size


@pytest.fixture(scope="module")
def world():
    return SceneWorld(SceneSpec(images=80, held_out=0, captions_per_image=2))


def test_collated_scene_batches_mask_linked_concepts_and_never_regions(world):
    collate = Collator(world.vocab, ("mlm", "mcr", "wpg"), max_seq_length=40, max_phrases=8)
    examples = [world.train[i] for i in range(len(world.train))]
    seen_linked = 0
    for epoch in range(3):
        batch = collate(examples, BatchContext(seed=11, epoch=epoch))
        labels, text, feats = batch.mlm_labels.numpy(), batch.text_ids.numpy(), batch.region_feats.numpy()
        for i, ex in enumerate(examples):
            start = 1 + len(ex.caption_ids)
            for j, links in enumerate(ex.concept_word_links):
                if any(labels[i, 1 + w] != -1 for w in links):
                    seen_linked += 1
                    assert text[i, start + j] == world.vocab.mask_id
            n = ex.regions.shape[0]
            assert np.array_equal(feats[i, :n], ex.regions)
    assert seen_linked > 100
    labels = batch.mlm_labels[batch.mlm_labels != -1]
    assert (labels >= world.vocab.real_word_range[0]).all() and (labels < world.vocab.only_word_size).all()


def test_corruption_of_a_sample_does_not_depend_on_its_batch(world):
    collate = Collator(world.vocab, ("mlm", "mcr"))
    a, b, c = (world.train[i] for i in (0, 1, 2))
    ctx = BatchContext(seed=3, epoch=1, position=0, rank=0)
    x = collate([a, b], ctx)
    y = collate([c, a], BatchContext(seed=3, epoch=1, position=64, rank=1))
    n = int(x.text_mask[0].sum())
    assert torch.equal(x.text_ids[0, :n], y.text_ids[1, :n])
    assert torch.equal(x.mlm_labels[0, :n], y.mlm_labels[1, :n])
    m = int(x.tag_mask[0].sum())
    assert torch.equal(x.tag_ids[0, :m], y.tag_ids[1, :m]) and torch.equal(x.mcr_labels[0, :m], y.mcr_labels[1, :m])
    z = collate([a, b], BatchContext(seed=3, epoch=2))
    assert not torch.equal(torch.cat([x.text_ids, x.tag_ids], 1), torch.cat([z.text_ids, z.tag_ids], 1))
