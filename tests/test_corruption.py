"""Corruption statistics (15% / 80-10-10, linked concepts always masked), purity and per-batch draws."""
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
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_word_masking_statistics():
    ids = torch.randint(5, 600, (N,), generator=_gen(1))
    out = corruption.mask_tokens(ids, _gen(2), 0.15, VOCAB.mask_id, VOCAB.random_word_range)
    sel = out.selected
    assert abs(sel.float().mean().item() - 0.15) < 2e-3
    masked = (out.ids == VOCAB.mask_id) & sel
    kept = (out.ids == ids) & sel
    random = sel & ~masked & ~kept
    n = sel.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < TOL
    # A random draw equals the original 1 time in 595; it then counts as kept.
    assert abs(random.sum().item() / n - 0.1) < TOL
    assert abs(kept.sum().item() / n - 0.1) < TOL
    assert torch.equal(out.ids[~sel], ids[~sel])
    assert torch.equal(out.labels[sel], ids[sel]) and (out.labels[~sel] == -1).all()
    assert out.ids[random].min() >= 5 and out.ids[random].max() < 600  # never a special token


def test_concept_corruption_linked_always_masked_others_at_rate():
    k = N // 2
    concepts = torch.randint(600, 1000, (k,), generator=_gen(3))
    words_selected = torch.zeros(k, dtype=torch.bool)
    words_selected[::2] = True       # concept j is linked to word j: every even concept is linked
    links = [[j] for j in range(k)]
    out = corruption.corrupt_concepts(concepts, links, words_selected, _gen(4), 0.15, VOCAB.mask_id,
                                      VOCAB.concept_range)
    assert (out[::2] == VOCAB.mask_id).all()
    rest, orig = out[1::2], concepts[1::2]
    changed = rest != orig
    masked = rest == VOCAB.mask_id
    sel_rate = changed.float().mean().item() / 0.9  # 10% of the selected keep their id
    assert abs(sel_rate - 0.15) < 3e-3
    assert abs(masked.sum().item() / changed.sum().item() - 8 / 9) < TOL
    rand = changed & ~masked
    assert rest[rand].min() >= 600 and rest[rand].max() < 1000


def test_links_to_truncated_words_are_ignored_and_empty_inputs_work():
    concepts = torch.tensor([700, 701])
    out = corruption.corrupt_concepts(concepts, [[5], [0]], torch.tensor([True]), _gen(), 0.0, 4, (600, 1000))
    assert out.tolist() == [700, 4]
    empty = corruption.corrupt_concepts(torch.zeros(0, dtype=torch.long), [], torch.zeros(0, dtype=torch.bool),
                                        _gen(), 0.15, 4, (600, 1000))
    assert empty.shape == (0,)
    assert corruption.mask_tokens(torch.zeros(0, dtype=torch.long), _gen(), 0.15, 4, (5, 600)).ids.shape == (0,)


def test_corrupt_sample_respects_objectives_and_is_pure():
    cap = torch.randint(5, 600, (3000,), generator=_gen(5))
    con = torch.randint(600, 1000, (300,), generator=_gen(6))
    tags = torch.randint(5, 600, (3000,), generator=_gen(7))
    links = [[3 * j] for j in range(300)]
    off = corruption.corrupt_sample(cap, con, links, tags, _gen(8), VOCAB, 0.15, mlm=False, mcr=False)
    assert torch.equal(off.caption_ids, cap) and torch.equal(off.concept_ids, con) and torch.equal(off.tag_ids, tags)
    assert (off.mlm_labels == -1).all() and (off.mcr_labels == -1).all()
    a = corruption.corrupt_sample(cap, con, links, tags, _gen(8), VOCAB, 0.15, mlm=True, mcr=True)
    b = corruption.corrupt_sample(cap, con, links, tags, _gen(8), VOCAB, 0.15, mlm=True, mcr=True)
    c = corruption.corrupt_sample(cap, con, links, tags, _gen(9), VOCAB, 0.15, mlm=True, mcr=True)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("caption_ids", "concept_ids", "tag_ids"))
    assert not torch.equal(a.caption_ids, c.caption_ids)
    assert (a.mlm_labels != -1).any() and (a.mcr_labels != -1).any()
    linked_selected = torch.tensor([bool(a.mlm_labels[3 * j] != -1) for j in range(300)])
    assert (a.concept_ids[linked_selected] == VOCAB.mask_id).all()
    only_mcr = corruption.corrupt_sample(cap, con, links, tags, _gen(8), VOCAB, 0.15, mlm=False, mcr=True)
    assert torch.equal(only_mcr.caption_ids, cap) and (only_mcr.mcr_labels != -1).any()


def test_seeds_mix_all_inputs():
    seeds = {corruption.mix_seed(1, s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450
    assert corruption.mix_seed(1, 2) != corruption.mix_seed(2, 1)
    assert all(0 <= s < 2 ** 63 for s in seeds)
    g1, g2 = corruption.sample_generator(0, 1, 2), corruption.batch_generator(0, 1, 2, 0)
    assert not torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_wpg_negatives_pick_other_images_uniformly():
    image_ids = torch.tensor([7, 7, 8, 9, 9, 9])
    counts = torch.zeros(6, 6)
    gen = _gen(10)
    for _ in range(3000):
        neg = corruption.wpg_negatives(image_ids, gen)
        assert (image_ids[neg] != image_ids).all()
        counts[torch.arange(6), neg] += 1
    # Row 0 (image 7) picks among indices 2..5 uniformly.
    assert counts[0, :2].sum() == 0 and (abs(counts[0, 2:] / 3000 - 0.25) < 0.04).all()
    assert corruption.wpg_negatives(torch.tensor([3, 3, 3]), gen).tolist() == [-1, -1, -1]
    assert corruption.wpg_negatives(torch.tensor([3]), gen).tolist() == [-1]
    picks = corruption.wpg_picks(4, 9, gen)
    assert picks.shape == (4, 9) and (picks >= 0).all() and (picks < 1).all()


@pytest.fixture(scope="module")
def world():
    return SceneWorld(SceneSpec(images=80, held_out=0, captions_per_image=2))


def test_collated_scene_batches_mask_linked_concepts_and_never_regions(world):
    collate = Collator(world.vocab, ("mlm", "mcr", "wpg"), max_seq_length=40, max_phrases=8)
    examples = [world.train[i] for i in range(len(world.train))]
    seen_linked = 0
    for epoch in range(3):
        batch = collate(examples, BatchContext(seed=11, epoch=epoch))
        for i, ex in enumerate(examples):
            start = 1 + len(ex.caption_ids)
            for j, links in enumerate(ex.concept_word_links):
                if any(batch.mlm_labels[i, 1 + w] != -1 for w in links):
                    seen_linked += 1
                    assert batch.text_ids[i, start + j] == world.vocab.mask_id
            n = ex.regions.shape[0]
            assert torch.equal(batch.region_feats[i, :n], torch.from_numpy(ex.regions))
    assert seen_linked > 100
    labels = batch.mlm_labels[batch.mlm_labels != -1]
    assert (labels >= world.vocab.random_word_range[0]).all() and (labels < world.vocab.only_word_size).all()


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
