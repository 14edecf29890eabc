"""Pooled feature buffers of DataLoader workers: a buffer is refilled only after the training process let go of
every tensor on it, the batches are those of the inline loader, and the small tensors cross by value."""
import dataclasses
import itertools
import os

import numpy as np
import pytest
import torch

from mvptr_ds.data.batching import Collator, ResumableLoader
from mvptr_ds.data.synthetic import SceneSpec, SceneWorld
from mvptr_ds.data.types import Batch
from mvptr_ds.data import worker_buffers
from mvptr_ds.data.worker_buffers import BufferPool, ReleaseTracker, from_wire, to_wire


def _same(a: Batch, b: Batch) -> bool:
    pairs = [(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(Batch)]
    return all(x is y is None or (x is not None and y is not None and torch.equal(x, y)) for x, y in pairs)


def _received(tensor: torch.Tensor) -> torch.Tensor:
    """What the training process gets: the same shared memory, mapped again (its own storage object)."""
    fd, size = tensor.untyped_storage()._share_fd_cpu_()
    storage = torch.UntypedStorage._new_shared_fd_cpu(os.dup(fd), size)
    return torch.empty(0, dtype=tensor.dtype).set_(storage, 0, tensor.shape)


def test_pool_reuses_only_released_generations(monkeypatch):
    pool, tracker = BufferPool(worker=3), ReleaseTracker()
    a, ta, slot_a = pool.take((2, 3, 4), np.float16, capacity=2 * 5 * 4 * 2)
    b, tb, slot_b = pool.take((2, 5, 4), np.float16, capacity=2 * 5 * 4 * 2)
    assert slot_a == (3, 0, 1) and slot_b == (3, 1, 1) and ta.dtype == torch.float16 and ta.is_shared()
    a[:] = 7
    got_a = _received(ta)
    assert (got_a == 7).all()                        # one memory
    tracker.received(slot_a, got_a)
    tracker.received(slot_b, _received(tb))          # dropped at once
    view = got_a[1:]                                 # a view keeps the storage alive
    del got_a
    assert tracker.released() == ((3, 1, 1),)
    del view
    assert tracker.released() == ((3, 1, 1), (3, 0, 1))
    pool.release([(3, 0, 1), (4, 1, 1)])             # another worker's slot: not ours
    assert pool.free == [True, False]
    _, tc, slot_c = pool.take((2, 5, 4), np.float16, capacity=0)   # fits the first slot's capacity
    assert slot_c == (3, 0, 2) and pool.free == [False, False] and tc.data_ptr() == ta.data_ptr()
    got_c = _received(tc)
    tracker.received(slot_c, got_c)
    assert tracker.released() == ((3, 1, 1),)        # the refilled slot is held again
    pool.release([(3, 0, 1)])                        # a stale release (generation 1) changes nothing
    assert pool.free == [False, False]
    monkeypatch.setattr(worker_buffers, "MAX_SLOTS", 2)
    _, td, slot_d = pool.take((1, 1, 4), np.float32, capacity=16)
    assert slot_d is None and td.dtype == torch.float32 and len(pool.storages) == 2   # unpooled past the cap
    tracker.received(None, td)


def test_wire_round_trip_of_nested_batches():
    from mvptr_ds.finetune.batching import TaskBatch

    world = SceneWorld(SceneSpec(images=4, held_out=0, captions_per_image=2, regions=(3, 5)))
    batch = Collator(world.vocab, ("mlm", "mcr"))([world.train[i] for i in range(4)])
    task = TaskBatch(batch=batch, labels=torch.arange(4))
    wire = to_wire(task)
    assert isinstance(wire.fields["batch"].fields["text_ids"], np.ndarray)
    assert wire.fields["batch"].fields["region_feats"] is batch.region_feats          # kept as a tensor
    back = from_wire(__import__("pickle").loads(__import__("pickle").dumps(wire)))
    assert isinstance(back, TaskBatch) and _same(back.batch, batch) and torch.equal(back.labels, task.labels)


@pytest.fixture(scope="module")
def world():
    return SceneWorld(SceneSpec(images=30, held_out=0, captions_per_image=2, regions=(4, 9)))


def test_live_batches_are_never_overwritten_and_buffers_are_reused(world):
    kw = dict(micro_batch=4, rank=0, world_size=1, seed=2)
    collator = Collator(world.vocab, ("mlm", "mcr", "itm", "wpg"))
    ref = list(itertools.islice(iter(ResumableLoader(world.train, collator, **kw)), 40))
    loader = ResumableLoader(world.train, collator, num_workers=2, prefetch_factor=2, **kw)
    kept = []
    for k, batch in enumerate(itertools.islice(iter(loader), 40)):
        assert _same(batch, ref[k]), k
        if k % 7 == 0:
            kept.append((k, batch))                  # the consumer holds some batches for a long time
        del batch
    assert all(_same(b, ref[k]) for k, b in kept)    # still intact: their buffers were not refilled
    tracker = loader.buffer_tracker
    assert tracker.batches == 40 and len(tracker.slots) < 20      # dropped batches' buffers came back
