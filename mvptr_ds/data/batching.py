"""The rank-aware, exactly resumable loader of collated micro batches (collation: :mod:`.collate`).

Order (:func:`step_plan`): epoch ``e`` has one global permutation of the dataset, seeded by ``(seed, e)``.
Step ``t`` consumes the global slice ``[position, position + micro_batch * world_size)`` of the stream
of permutations (epoch ``e``'s, then ``e+1``'s, ...: nothing is dropped and every rank always gets a full
micro batch); rank ``r`` takes the ``r``-th contiguous ``micro_batch`` chunk. The state ``(epoch,
position)`` counts global samples, so it does not depend on the world size: a run checkpointed on N ranks
continues on M ranks without repeating or skipping a sample.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from mvptr_ds.data import corruption
from mvptr_ds.data.collate import BatchContext, BatchError, Collator, TruncationCounts  # noqa: F401 (re-exported)
from mvptr_ds.data.pair_joining import example_at
from mvptr_ds.data.types import Batch
from mvptr_ds.data.worker_buffers import ReleaseTracker, from_wire, to_wire, worker_pool


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The global order of epoch ``epoch``: a permutation of ``range(num_samples)`` (int64)."""
    return corruption.generator(3, seed, epoch).permutation(num_samples)


@dataclass(frozen=True)
class StepPlan:
    """What one rank does at one step: which dataset indices, in which epochs, and the state after it."""

    indices: Tuple[int, ...]
    context: BatchContext
    next_epoch: int
    next_position: int


class _Orders:
    """Permutations of the epochs a step touches (keeps the most recent few)."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self._cache: Dict[int, np.ndarray] = {}

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 3:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = epoch_permutation(self.num_samples, self.seed, epoch)
        return self._cache[epoch]


def step_plan(num_samples: int, epoch: int, position: int, micro_batch: int, rank: int, world_size: int,
              seed: int, orders: Optional[_Orders] = None) -> StepPlan:
    """Rank ``rank``'s share of the step that starts at global ``position`` of ``epoch`` (see module doc)."""
    orders = orders or _Orders(num_samples, seed)
    e, p = epoch, position + rank * micro_batch
    indices: List[int] = []
    epochs: List[int] = []
    while len(indices) < micro_batch:
        while p >= num_samples:
            e, p = e + 1, p - num_samples
        take = min(micro_batch - len(indices), num_samples - p)
        indices += orders(e)[p:p + take].tolist()
        epochs += [e] * take
        p += take
    e, p = epoch, position + micro_batch * world_size
    while p >= num_samples:
        e, p = e + 1, p - num_samples
    return StepPlan(tuple(indices), BatchContext(seed, epoch, position + rank * micro_batch, rank, tuple(epochs)),
                    e, p)


class _PlannedDataset(torch.utils.data.Dataset):
    """Dataset over plan keys ``(index, epoch, plan, released)`` for the multi-worker path;
    ``[key] -> (Example, key)`` (the example as that epoch sees it: ``pair_joining.example_at``)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        return example_at(self.dataset, key[0], key[1]), key


class _PlanSampler:
    """Infinite batch sampler: one list of keys per step, each key carrying its step's plan and the feature
    buffers the training process has released (``worker_buffers``)."""

    def __init__(self, loader: "ResumableLoader", tracker: ReleaseTracker):
        self.loader, self.tracker = loader, tracker
        self.start = (loader.epoch, loader.position)

    def __iter__(self):
        ld = self.loader
        epoch, position = self.start
        orders = _Orders(len(ld.dataset), ld.seed)
        while True:
            plan = step_plan(len(ld.dataset), epoch, position, ld.micro_batch, ld.rank, ld.world_size, ld.seed,
                             orders)
            released = self.tracker.released()
            yield [(i, e, plan, released) for i, e in zip(plan.indices, plan.context.sample_epochs)]
            epoch, position = plan.next_epoch, plan.next_position


class _PlanCollate:
    """In a worker: collate the step's examples into a pooled feature buffer (when the collator takes one)."""

    def __init__(self, collator: Collator):
        self.collator = collator
        self.pooled = "buffers" in inspect.signature(collator.collate).parameters
        self.max_regions = getattr(collator, "max_regions", 0)

    def __call__(self, items):
        _, _, plan, released = items[0][1]
        pool = worker_pool() if self.pooled else None
        if pool is None:
            batch, counts = self.collator.collate([ex for ex, _ in items], plan.context)
            return to_wire(batch), counts, plan, None
        pool.release(released)
        slot = None

        def buffers(shape, dtype):
            nonlocal slot
            capacity = shape[0] * max(self.max_regions, shape[1]) * shape[2] * np.dtype(dtype).itemsize
            array, tensor, slot = pool.take(shape, dtype, capacity)
            return array, tensor

        batch, counts = self.collator.collate([ex for ex, _ in items], plan.context, buffers)
        return to_wire(batch), counts, plan, slot


class ResumableLoader:
    """Infinite, rank-aware, exactly resumable stream of this rank's micro batches (order in module doc).

    ``state_dict()`` is ``{"epoch", "position"}`` after the last batch *yielded* (prefetched batches do not
    count), in global samples, so it is valid for any world size. ``truncation_counts`` accumulates the
    collator's truncation counters of the yielded batches. With ``num_workers > 0`` a torch DataLoader over
    a batch sampler produces the same batches in the same order. Use one live iterator at a time: each
    ``iter(loader)`` starts from the current state, and every yielded batch advances it.
    """

    def __init__(self, dataset, collator: Collator, micro_batch: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0, prefetch_factor: int = 2):
        if micro_batch < 1:
            raise ValueError(f"ResumableLoader: micro_batch={micro_batch} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"ResumableLoader: rank={rank} is not in [0, world_size={world_size})")
        if len(dataset) == 0:
            raise ValueError("ResumableLoader: the dataset is empty (0 samples)")
        if num_workers < 0 or prefetch_factor < 1:
            raise ValueError(f"ResumableLoader: num_workers={num_workers} must be >= 0 and "
                             f"prefetch_factor={prefetch_factor} >= 1")
        self.dataset, self.collator = dataset, collator
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.epoch, self.position = 0, 0
        self.truncation_counts = TruncationCounts()
        self.buffer_tracker: Optional[ReleaseTracker] = None    # the workers' feature buffers (last iterator)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the samples counted by ``state`` (from any world size / micro batch)."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"loader state {state!r}: expected integers 'epoch' and 'position'") from None
        if epoch < 0 or not 0 <= position < len(self.dataset):
            raise ValueError(f"loader state {state!r}: position must be in [0, {len(self.dataset)}) (the dataset "
                             f"size) and epoch >= 0; was the checkpoint made on different data?")
        self.epoch, self.position = epoch, position

    def __iter__(self) -> Iterator[Batch]:
        if self.num_workers == 0:
            return self._iter_inline()
        return self._iter_workers()

    def _yielded(self, plan: StepPlan, counts: TruncationCounts) -> None:
        self.epoch, self.position = plan.next_epoch, plan.next_position
        self.truncation_counts.add(counts)

    def _iter_inline(self) -> Iterator[Batch]:
        orders = _Orders(len(self.dataset), self.seed)
        while True:
            plan = step_plan(len(self.dataset), self.epoch, self.position, self.micro_batch, self.rank,
                             self.world_size, self.seed, orders)
            examples = [example_at(self.dataset, i, e) for i, e in zip(plan.indices, plan.context.sample_epochs)]
            batch, counts = self.collator.collate(examples, plan.context)
            self._yielded(plan, counts)
            yield batch

    def _iter_workers(self) -> Iterator[Batch]:
        tracker = self.buffer_tracker = ReleaseTracker()
        loader = torch.utils.data.DataLoader(
            _PlannedDataset(self.dataset), batch_sampler=_PlanSampler(self, tracker),
            collate_fn=_PlanCollate(self.collator), num_workers=self.num_workers, prefetch_factor=self.prefetch_factor)
        for wire, counts, plan, slot in loader:
            batch = from_wire(wire)
            tracker.received(slot, getattr(batch, "batch", batch).region_feats)   # (a task batch wraps a Batch)
            self._yielded(plan, counts)
            yield batch
            del batch, wire             # the consumer's reference alone decides when the buffer is free
