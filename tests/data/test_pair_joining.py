"""--join_pairs: joined pairs are consistent, a function of (seed, epoch, index), and the loader serves them the
same inline, with workers and after a resume."""
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from mvptr_ds.config import ConfigError, DataConfig, EvalConfig, ObjectiveConfig, RunConfig
from mvptr_ds.data.batching import Collator, ResumableLoader, epoch_permutation, step_plan
from mvptr_ds.data.pair_joining import JoinedPairs, example_at
from mvptr_ds.data.synthetic import SceneSpec, SceneWorld
from mvptr_ds.data.types import Batch

ALL = ("mcr", "vsc", "itm", "mlm", "wpg")


@pytest.fixture(scope="module")
def world():
    return SceneWorld(SceneSpec(seed=3, images=12, held_out=0))


def _same_example(x, y) -> bool:
    return (x.caption_ids, x.concept_ids, x.tag_ids, x.image_id, x.sample_id, x.concept_regions,
            x.concept_word_links) == (y.caption_ids, y.concept_ids, y.tag_ids, y.image_id, y.sample_id,
                                      y.concept_regions, y.concept_word_links) and np.array_equal(x.regions, y.regions)


def test_probability_zero_and_plain_indexing_give_the_corpus(world):
    never = JoinedPairs(world.train, 0.0, seed=1)
    always = JoinedPairs(world.train, 1.0, seed=1)
    for i in range(len(world.train)):
        assert _same_example(never.example_at(i, 3), world.train[i])
        assert _same_example(always[i], world.train[i])            # indexing: the pair as it is
        assert _same_example(example_at(world.train, i, 3), world.train[i])  # a plain dataset ignores the epoch
    assert len(always) == len(world.train)


def test_joined_pair_is_consistent(world):
    joined_set = JoinedPairs(world.train, 1.0, seed=1)
    for i in range(len(world.train)):
        a, joined = world.train[i], joined_set.example_at(i, 0)
        # the partner: the one other example whose caption is the joined caption's tail
        tail = joined.caption_ids[len(a.caption_ids):]
        b = next(e for e in world.train if e.caption_ids == tail and e.image_id != a.image_id)
        assert joined.image_id == a.image_id and joined.sample_id == a.sample_id
        assert joined.caption_ids == a.caption_ids + b.caption_ids
        assert joined.concept_ids == a.concept_ids + b.concept_ids
        assert joined.tag_ids == a.tag_ids + b.tag_ids
        assert np.array_equal(joined.regions, np.concatenate([a.regions, b.regions]))
        r = a.regions.shape[0]
        for k, links in enumerate(joined.concept_word_links):  # every link still names its concept's words
            words = [joined.caption_ids[w] for w in links]
            src, off = (a, 0) if k < len(a.concept_ids) else (b, len(a.concept_ids))
            assert words == [src.caption_ids[w] for w in src.concept_word_links[k - off]]
        assert joined.concept_regions == a.concept_regions + [x + r if x >= 0 else x for x in b.concept_regions]
    unknown = dataclasses.replace(world.train[0], concept_regions=None)   # one side's regions unknown: -1 for it
    from mvptr_ds.data.pair_joining import join_examples
    mixed = join_examples(unknown, world.train[3])
    assert mixed.concept_regions[:len(unknown.concept_ids)] == [-1] * len(unknown.concept_ids)
    assert join_examples(unknown, unknown).concept_regions is None


def test_draws_are_a_function_of_seed_epoch_and_index(world):
    half = JoinedPairs(world.train, 0.5, seed=1)
    again = JoinedPairs(world.train, 0.5, seed=1)
    n = len(world.train)
    epoch0 = [half.example_at(i, 0) for i in range(n)]
    assert all(_same_example(x, again.example_at(i, 0)) for i, x in enumerate(epoch0))
    assert all(_same_example(half.example_at(i, 0), x) for i, x in reversed(list(enumerate(epoch0))))  # any order
    joined = [len(x.caption_ids) > len(world.train[i].caption_ids) for i, x in enumerate(epoch0)]
    assert 0 < sum(joined) < n                                  # p = 0.5 joins some, not all
    epoch1 = [half.example_at(i, 1) for i in range(n)]
    assert any(not _same_example(x, y) for x, y in zip(epoch0, epoch1))   # drawn anew each epoch
    other = [JoinedPairs(world.train, 0.5, seed=2).example_at(i, 0) for i in range(n)]
    assert any(not _same_example(x, y) for x, y in zip(epoch0, other))
    rate = np.mean([len(half.example_at(i, e).caption_ids) > len(world.train[i].caption_ids)
                    for e in range(40) for i in range(n)])
    assert 0.4 < rate < 0.6


def test_errors(world):
    lonely = SceneWorld(SceneSpec(seed=3, images=1, held_out=0))  # one image: no partner, one clear error
    with pytest.raises(ConfigError, match="--join_pairs: no pair of an image other than"):
        JoinedPairs(lonely.train, 1.0, seed=1).example_at(0, 0)
    with pytest.raises(ValueError, match="probability 1.5"):
        JoinedPairs(world.train, 1.5, seed=1)
    with pytest.raises(ConfigError, match=r"data.join_pairs=1.5: must be a finite number in \[0, 1\]"):
        DataConfig(join_pairs=1.5).validate()
    with pytest.raises(ConfigError, match="joins pre-training pairs only"):
        RunConfig(data=DataConfig(join_pairs=0.5), eval=EvalConfig(finetune_task="vqa")).validate()
    with pytest.raises(ConfigError, match="with wpg: a joined pair keeps its first image's id"):
        RunConfig(data=DataConfig(join_pairs=0.5), objectives=ObjectiveConfig(names=("vsc", "wpg"))).validate()
    assert RunConfig(data=DataConfig(join_pairs=0.5), objectives=ObjectiveConfig(names=("mlm", "vsc"))).validate()


def _batches(dataset, world, n, state=None, micro=5, **kw):
    loader = ResumableLoader(dataset, Collator(world.vocab, ALL), micro, 0, 1, seed=5, **kw)
    if state:
        loader.load_state_dict(state)
    return loader, list(itertools.islice(iter(loader), n))


def _same(a: Batch, b: Batch) -> bool:
    pairs = [(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(Batch)]
    return all(x is y is None or (x is not None and y is not None and torch.equal(x, y)) for x, y in pairs)


def test_loader_serves_joined_pairs_alike_inline_with_workers_and_resumed(world):
    """Micro batches of 5 over 24 pairs: some batches hold samples of two epochs, and each sample is joined
    as its own epoch draws it."""
    joined = JoinedPairs(world.train, 0.5, seed=5)
    _, ref = _batches(joined, world, 12)                 # 60 samples: two and a half epochs of 24
    stream = np.concatenate([epoch_permutation(len(world.train), 5, e) for e in range(3)])
    collator = Collator(world.vocab, ALL)
    spanning = 0
    for step, batch in enumerate(ref):
        plan = step_plan(len(world.train), 0, 0, 5, 0, 1, 5) if step == 0 else plan_next
        plan_next = step_plan(len(world.train), plan.next_epoch, plan.next_position, 5, 0, 1, 5)
        indices = stream[5 * step:5 * step + 5].tolist()
        epochs = [(5 * step + k) // len(world.train) for k in range(5)]
        assert list(plan.indices) == indices and list(plan.context.sample_epochs) == epochs
        spanning += len(set(epochs)) > 1
        expected, _ = collator.collate([joined.example_at(i, e) for i, e in zip(indices, epochs)], plan.context)
        assert _same(batch, expected), step
    assert spanning == 2                                 # steps 4 and 9 cross an epoch boundary
    _, plain = _batches(world.train, world, 12)
    assert any(not _same(x, y) for x, y in zip(ref, plain))
    longer = [int(b.text_mask.sum()) > int(p.text_mask.sum()) for b, p in zip(ref, plain)]
    assert any(longer)                                   # joined rows carry both captions
    first, head = _batches(joined, world, 4)             # resumed just before the first epoch-spanning batch
    assert first.state_dict() == {"epoch": 0, "position": 20}
    _, rest = _batches(joined, world, 8, state=first.state_dict())
    assert all(_same(x, y) for x, y in zip(head + rest, ref))
    _, workers = _batches(joined, world, 12, num_workers=2)
    assert all(_same(x, y) for x, y in zip(workers, ref))


@pytest.mark.parametrize("probability", [0.0, 0.25])
def test_pretraining_loader_joins_only_when_asked(probability):
    from types import SimpleNamespace

    from mvptr_ds.assembly import build
    from mvptr_ds.config import TrainConfig

    cfg = RunConfig(data=DataConfig(source="synthetic:seed=3,images=12,held_out=2", join_pairs=probability),
                    train=TrainConfig(stage=1, micro_batch=4, seed=9)).validate()
    parts = build(cfg, SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")))
    dataset = parts.loader.dataset
    if probability:
        assert isinstance(dataset, JoinedPairs) and (dataset.probability, dataset.seed) == (0.25, 9)
        assert dataset.base is parts.data.train
    else:
        assert dataset is parts.data.train
