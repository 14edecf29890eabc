"""Collate (layout, padding, truncation counters, errors) and the resumable, rank-aware loader."""
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from mvptr_ds.config import ConfigError, DataConfig
from mvptr_ds.data.batching import (BatchContext, BatchError, Collator, ResumableLoader, _Orders,
                                    epoch_permutation, step_plan)
from mvptr_ds.data.pipeline import DataBundle, build_data
from mvptr_ds.data.synthetic import SceneSpec, SceneWorld
from mvptr_ds.data.types import Batch, Example
from mvptr_ds.data.vocab import VocabInfo

ALL = ("mcr", "vsc", "itm", "mlm", "wpg")
VOCAB = VocabInfo(vocab_size=300, only_word_size=100, pad_id=0, cls_id=2, sep_id=3, mask_id=4,
                  concept_range=(100, 300), word_range=(5, 100))


@pytest.fixture(scope="module")
def world():
    return SceneWorld(SceneSpec(images=13, held_out=2, captions_per_image=2, regions=(4, 7)))


def _example(sid, n_words=4, n_concepts=2, n_tags=3, n_regions=5, image=None, regions_of=None, dim=8):
    rng = np.random.default_rng(sid)
    return Example(sample_id=sid, image_id=sid if image is None else image,
                   caption_ids=list(range(10, 10 + n_words)), concept_ids=list(range(100, 100 + n_concepts)),
                   concept_word_links=[[j] for j in range(n_concepts)], tag_ids=list(range(50, 50 + n_tags)),
                   regions=rng.random((n_regions, dim), dtype=np.float32), concept_regions=regions_of)


def test_layout_and_padding_without_corruption():
    collate = Collator(VOCAB, ("vsc", "itm"), max_seq_length=35, max_phrases=5, max_tag_length=20,
                       max_img_seq_length=50)
    a, b = _example(1, n_words=4, n_concepts=2, n_tags=3, n_regions=5, regions_of=[0, 4]), _example(2, 2, 0, 1, 2)
    batch = collate([a, b])
    assert isinstance(batch, Batch) and batch.size == 2
    assert batch.text_ids.tolist() == [[2, 10, 11, 12, 13, 100, 101, 3], [2, 10, 11, 3, 0, 0, 0, 0]]
    assert batch.text_mask.tolist() == [[True] * 8, [True] * 4 + [False] * 4]
    assert batch.phrase_mask[0].nonzero().flatten().tolist() == [5, 6] and not batch.phrase_mask[1].any()
    assert batch.phrase_regions.tolist() == [[-1] * 5 + [0, 4, -1], [-1] * 8]
    assert batch.tag_ids.tolist() == [[2, 50, 51, 52, 3], [2, 50, 3, 0, 0]]
    assert batch.tag_mask.sum(1).tolist() == [5, 3]
    assert batch.region_feats.shape == (2, 5, 8) and batch.region_feats.dtype == torch.float32
    assert batch.region_mask.sum(1).tolist() == [5, 2] and (batch.region_feats[1, 2:] == 0).all()
    assert torch.equal(batch.region_feats[0], torch.from_numpy(a.regions))
    assert batch.image_ids.tolist() == [1, 2] and batch.sample_ids.tolist() == [1, 2]
    assert (batch.mlm_labels == -1).all() and (batch.mcr_labels == -1).all()
    assert batch.wpg_negative_pair.tolist() == [1, 0]
    assert batch.wpg_pick_positive.shape == (2, 8)
    for f in ("text_mask", "phrase_mask", "tag_mask", "region_mask"):
        assert getattr(batch, f).dtype == torch.bool
    assert collate([b]).phrase_regions is None  # no example carries ground truth


def test_truncation_is_counted():
    collate = Collator(VOCAB, ALL, max_seq_length=5, max_phrases=2, max_tag_length=4, max_img_seq_length=3)
    ex = _example(7, n_words=6, n_concepts=4, n_tags=5, n_regions=6, regions_of=[1, 5, 0, 2])
    batch, counts = collate.collate([ex, _example(8, 2, 1, 1, 2)])
    assert batch.text_ids.shape == (2, 5 + 2) and batch.tag_ids.shape == (2, 4) and batch.region_feats.shape[1] == 3
    assert batch.phrase_regions[0, 4:6].tolist() == [1, -1]   # region 5 was cut
    assert counts.as_dict() == {"samples": 2, "samples_truncated": 1, "caption_words": 3, "concepts": 2,
                                "tag_words": 3, "regions": 3, "concept_regions": 1}
    assert collate.counters.samples == 0
    collate([ex])
    collate([ex])
    assert collate.counters.caption_words == 6 and collate.counters.samples == 2


def test_concepts_fill_the_slots_a_short_caption_leaves_free():
    """The release's rule: concepts up to max_phrases + max_seq_length - 2 - words, so the text stream holds at
    most max_seq_length + max_phrases positions."""
    collate = Collator(VOCAB, ALL, max_seq_length=6, max_phrases=2, max_tag_length=4, max_img_seq_length=3)
    short, full = _example(1, n_words=1, n_concepts=9), _example(2, n_words=6, n_concepts=9)
    batch, counts = collate.collate([short, full])
    assert batch.phrase_mask.sum(1).tolist() == [2 + 4 - 1, 2]  # 3 caption slots unused by the short one
    assert batch.text_mask.sum(1).tolist() == [6 + 2, 6 + 2]
    assert counts.concepts == (9 - 5) + (9 - 2) and counts.caption_words == 2


@pytest.mark.parametrize("bad, words", [
    ([], "empty batch"),
    ([_example(1), _example(2, dim=9)], "sample 2: field 'regions' has width 9"),
    ([dataclasses.replace(_example(3), caption_ids=[5, 300])], "sample 3: field 'caption_ids' holds id 300"),
    ([dataclasses.replace(_example(4), concept_word_links=[[0]])], "sample 4: field 'concept_word_links'"),
    ([dataclasses.replace(_example(5), concept_regions=[1])], "sample 5: field 'concept_regions'"),
    ([dataclasses.replace(_example(6), regions=np.zeros(5, np.float32))], "sample 6: field 'regions' must be"),
])
def test_collate_errors_name_the_sample_and_field(bad, words):
    with pytest.raises(BatchError, match=words):
        Collator(VOCAB, ALL)(bad)


def test_wpg_negative_never_shares_the_image():
    batch = Collator(VOCAB, ALL)([_example(1, image=5), _example(2, image=5), _example(3, image=6)])
    assert batch.wpg_negative_pair.tolist() == [2, 2, batch.wpg_negative_pair[2].item()]
    assert batch.wpg_negative_pair[2].item() in (0, 1)
    alone = Collator(VOCAB, ALL)([_example(1, image=5), _example(2, image=5)])
    assert alone.wpg_negative_pair.tolist() == [-1, -1]


def _batches(world, n, **kw):
    kw = {"micro_batch": 4, "rank": 0, "world_size": 1, "seed": 5, **kw}
    loader = ResumableLoader(world.train, Collator(world.vocab, ALL), **kw)
    return loader, list(itertools.islice(iter(loader), n))


def _same(a: Batch, b: Batch) -> bool:
    pairs = [(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(Batch)]
    return all(x is y is None or (x is not None and y is not None and torch.equal(x, y)) for x, y in pairs)


def test_deterministic_and_exactly_resumable(world):
    _, ref = _batches(world, 12)
    _, again = _batches(world, 12)
    assert all(_same(x, y) for x, y in zip(ref, again))
    loader, first = _batches(world, 5)
    state = loader.state_dict()
    assert state == {"epoch": 0, "position": 20}
    resumed = ResumableLoader(world.train, Collator(world.vocab, ALL), 4, 0, 1, seed=5)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(iter(resumed), 7))
    assert all(_same(x, y) for x, y in zip(first + rest, ref))
    _, other_seed = _batches(world, 1, seed=6)
    assert not torch.equal(other_seed[0].sample_ids, ref[0].sample_ids)


def test_epochs_follow_each_other_without_dropping(world):
    n = len(world.train)                                    # 26: not a multiple of the global batch 4
    loader, batches = _batches(world, 13)                   # 52 samples = 2 epochs
    stream = torch.cat([b.sample_ids for b in batches]).tolist()
    ids = [world.train.caption_ids[i] for i in np.concatenate([epoch_permutation(n, 5, 0),
                                                               epoch_permutation(n, 5, 1)])]
    assert stream == ids
    assert sorted(stream[:n]) == sorted(stream[n:]) and len(set(stream[:n])) == n
    assert stream[:n] != stream[n:]                         # each epoch has its own order
    assert loader.state_dict() == {"epoch": 2, "position": 0}


def test_two_ranks_are_disjoint_and_complete(world):
    _, single = _batches(world, 10, micro_batch=6)
    _, r0 = _batches(world, 10, micro_batch=3, rank=0, world_size=2)
    _, r1 = _batches(world, 10, micro_batch=3, rank=1, world_size=2)
    stream = []
    for s, a, b in zip(single, r0, r1):
        assert a.size == b.size == 3
        assert torch.cat([a.sample_ids, b.sample_ids]).tolist() == s.sample_ids.tolist()
        stream += torch.cat([a.sample_ids, b.sample_ids]).tolist()
    n = len(world.train)
    # The ranks' union over the first epoch is every sample exactly once (disjoint and complete).
    assert sorted(stream[:n]) == sorted(world.train.caption_ids.tolist())
    for s, a, b in zip(single, r0, r1):
        # A sample's corruption is the same whichever rank and world size it lands on.
        for half, off in ((a, 0), (b, 3)):
            for i in range(3):
                n = int(half.text_mask[i].sum())
                assert torch.equal(half.text_ids[i, :n], s.text_ids[off + i, :n])
                m = int(half.tag_mask[i].sum())
                assert torch.equal(half.mcr_labels[i, :m], s.mcr_labels[off + i, :m])
    assert not torch.equal(r0[0].wpg_pick_positive, r1[0].wpg_pick_positive)  # per-batch draws differ per rank


def _run(world, state, world_size, steps, micro_batch=3):
    """Global stream of sample ids over ``steps`` steps on ``world_size`` ranks from ``state``; final state."""
    loaders = []
    for r in range(world_size):
        ld = ResumableLoader(world.train, Collator(world.vocab, ALL), micro_batch, r, world_size, seed=9)
        ld.load_state_dict(state)
        loaders.append((ld, iter(ld)))
    stream = []
    for _ in range(steps):
        for _, it in loaders:
            stream += next(it).sample_ids.tolist()
    states = {str(ld.state_dict()) for ld, _ in loaders}
    assert len(states) == 1                                 # every rank agrees on the state
    return stream, loaders[0][0].state_dict()


@pytest.mark.parametrize("new_world", [1, 3])
def test_elastic_resume_neither_repeats_nor_skips(world, new_world):
    reference, _ = _run(world, {"epoch": 0, "position": 0}, 1, 40)
    before, state = _run(world, {"epoch": 0, "position": 0}, 2, 5)   # 30 samples: into epoch 1
    assert state == {"epoch": 1, "position": 4}
    after, _ = _run(world, state, new_world, 4)
    assert before + after == reference[:len(before) + len(after)]


@pytest.mark.parametrize("world_size,micro_batch", [(2, 64), (2, 96)])
def test_ranks_shard_100k_ids_without_overlap(world_size, micro_batch):
    """At 100,000 ids (indices only): each step gives every rank its own ids; over the first epoch the ranks'
    shards are disjoint and together cover every id once (the partial last step continues into epoch 1)."""
    n, shards = 100_000, [[] for _ in range(world_size)]
    orders = _Orders(n, seed=7)                        # the epochs' permutations, as the loader keeps them
    epoch = position = 0
    while epoch == 0:
        plans = [step_plan(n, epoch, position, micro_batch, r, world_size, seed=7, orders=orders)
                 for r in range(world_size)]
        assert len({(p.next_epoch, p.next_position) for p in plans}) == 1      # every rank agrees on the state
        step_ids = [np.asarray(p.indices)[np.asarray(p.context.sample_epochs) == 0] for p in plans]
        assert len(set(np.concatenate(step_ids).tolist())) == sum(len(x) for x in step_ids)
        for shard, ids in zip(shards, step_ids):
            shard.append(ids)
        epoch, position = plans[0].next_epoch, plans[0].next_position
    shards = [np.concatenate(s) for s in shards]
    assert all(len(np.unique(s)) == len(s) for s in shards)
    assert all(len(np.intersect1d(shards[a], shards[b])) == 0 for a in range(world_size)
               for b in range(a + 1, world_size))
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(n))
    assert abs(len(shards[0]) - len(shards[1])) <= micro_batch


def test_step_plan_spans_epochs_when_the_global_batch_exceeds_the_data():
    plan = step_plan(num_samples=5, epoch=0, position=3, micro_batch=4, rank=1, world_size=2, seed=0)
    perms = [epoch_permutation(5, 0, e) for e in range(3)]
    stream = np.concatenate(perms)
    assert list(plan.indices) == stream[3 + 4:3 + 8].tolist()
    assert plan.context.sample_epochs == (1, 1, 1, 2)
    assert (plan.next_epoch, plan.next_position) == (2, 1)


def test_workers_yield_the_same_batches_and_state(world):
    loader, ref = _batches(world, 6)
    inline_state = loader.state_dict()
    worker_loader, got = _batches(world, 6, num_workers=2, prefetch_factor=2)
    assert all(_same(x, y) for x, y in zip(got, ref))
    assert worker_loader.state_dict() == inline_state       # prefetched batches are not counted
    assert worker_loader.truncation_counts.samples == 24


def test_loader_argument_and_state_errors(world):
    collate = Collator(world.vocab, ALL)
    with pytest.raises(ValueError, match="rank=2"):
        ResumableLoader(world.train, collate, 4, rank=2, world_size=2, seed=0)
    with pytest.raises(ValueError, match="micro_batch=0"):
        ResumableLoader(world.train, collate, 0, 0, 1, seed=0)
    with pytest.raises(ValueError, match="empty"):
        ResumableLoader([], collate, 4, 0, 1, seed=0)
    loader = ResumableLoader(world.train, collate, 4, 0, 1, seed=0)
    with pytest.raises(ValueError, match="position must be in"):
        loader.load_state_dict({"epoch": 0, "position": 1000})
    with pytest.raises(ValueError, match="expected integers"):
        loader.load_state_dict({"step": 3})


def test_build_data_bundle():
    bundle = build_data(DataConfig(source="synthetic:images=12,held_out=3,seed=2", max_phrases=3),
                        ("mcr",))
    assert isinstance(bundle, DataBundle) and len(bundle.train) == 24 and len(bundle.held_out) == 6
    assert bundle.vocab == bundle.world.vocab
    batch = bundle.collator([bundle.train[i] for i in range(4)], BatchContext(seed=1))
    assert (batch.mlm_labels == -1).all() and int(batch.text_mask.sum(1).max()) <= 35 + 3
    with pytest.raises(ConfigError, match="'/data/coco'"):
        build_data(DataConfig(source="/data/coco"), ALL)
    with pytest.raises(ConfigError, match="unknown key 'imgs'"):
        build_data(DataConfig(source="synthetic:imgs=3"), ALL)
