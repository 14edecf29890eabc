"""Shared-memory region-feature buffers that a DataLoader worker reuses once the training process has let go.

A worker hands each batch's region features (64 x 50 x 2,054 fp16: 13 MB) to the training process in shared
memory. Fresh shared memory for every batch costs a page fault per 4 KiB page to fill (measured on the 2-core
VM: about 20 ms per 13 MB buffer, 0.3 ms of worker CPU per sample, against 2 ms to refill memory already
mapped). So each worker keeps a small pool of buffers (:class:`BufferPool`) and refills one only when it is
known to be free: the training process tracks the buffers it received (:class:`ReleaseTracker`, a weak
reference to each one's storage, which counts views too) and, when every tensor on one is gone, names it
(worker, slot, generation) in the next batch requests it sends to the workers. A worker reuses a slot only
if the named generation is the one it last filled, so a stale release (the slot was refilled since) does
nothing. A buffer still in use is never written: at worst (the trainer keeping batches) the pool stops
growing at ``MAX_SLOTS`` and further batches get fresh memory, as without the pool.

The batch's other tensors (ids, masks, labels, draws: about 100 KB) cross as numpy arrays, pickled by value
(:func:`to_wire`, :func:`from_wire`): torch would give each its own shared-memory segment and file descriptor,
about 0.4 ms per tensor on each side, 17 of them per batch.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

SlotId = Tuple[int, int, int]           # (worker id, slot index, generation)
MAX_SLOTS = 16                          # per worker; beyond, fresh (unpooled) buffers


class BufferPool:
    """One worker's buffers. ``take(shape, dtype, capacity)`` -> (array, tensor, slot id or None)."""

    def __init__(self, worker: int):
        self.worker = worker
        self.storages: List[torch.UntypedStorage] = []
        self.generation: List[int] = []
        self.free: List[bool] = []

    def release(self, slots: Iterable[SlotId]) -> None:
        """Mark free the slots the training process let go (stale generations ignored)."""
        for worker, k, generation in slots:
            if worker == self.worker and k < len(self.storages) and self.generation[k] == generation:
                self.free[k] = True

    def take(self, shape: Tuple[int, ...], dtype, capacity: int) -> Tuple[np.ndarray, torch.Tensor, Optional[SlotId]]:
        """A ``shape`` buffer (uninitialised) in a free slot of at least its size, a new slot of ``capacity``
        bytes (at least its size), or, with ``MAX_SLOTS`` slots in use, fresh unpooled shared memory."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        k = next((k for k, s in enumerate(self.storages) if self.free[k] and s.nbytes() >= nbytes), None)
        if k is None and len(self.storages) < MAX_SLOTS:
            self.storages.append(torch.UntypedStorage._new_shared(max(nbytes, capacity)))
            self.generation.append(0)
            self.free.append(True)
            k = len(self.storages) - 1
        storage = self.storages[k] if k is not None else torch.UntypedStorage._new_shared(nbytes)
        tensor = torch.empty(0, dtype=torch.float16 if dtype == np.float16 else torch.float32).set_(storage, 0, shape)
        if k is None:
            return tensor.numpy(), tensor, None
        self.free[k] = False
        self.generation[k] += 1
        return tensor.numpy(), tensor, (self.worker, k, self.generation[k])


_POOL: Dict[int, BufferPool] = {}       # by process id: a forked worker never uses its parent's pool


def worker_pool() -> Optional[BufferPool]:
    """This DataLoader worker's pool (None outside a worker)."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return None
    pid = os.getpid()
    if pid not in _POOL:
        _POOL.clear()
        _POOL[pid] = BufferPool(info.id)
    return _POOL[pid]


class ReleaseTracker:
    """The training process's side: ``received(slot, tensor)`` for each batch; ``released()`` the slots whose
    tensors are all gone (named until that slot comes back refilled)."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.held: Dict[Tuple[int, int], Tuple[int, object]] = {}     # (worker, slot) -> (generation, weak ref)
        self.free: Dict[Tuple[int, int], int] = {}                    # (worker, slot) -> released generation
        self.batches = 0                                               # received in pooled buffers
        self.slots = set()                                             # (worker, slot) seen

    def received(self, slot: Optional[SlotId], tensor: torch.Tensor) -> None:
        if slot is None:
            return
        worker, k, generation = slot
        self.batches += 1
        self.slots.add((worker, k))
        self.free.pop((worker, k), None)
        self.held[(worker, k)] = (generation, self._ref(tensor.untyped_storage()))

    def released(self) -> Tuple[SlotId, ...]:
        for key, (generation, ref) in list(self.held.items()):
            if ref.expired():
                del self.held[key]
                self.free[key] = generation
        return tuple((w, k, g) for (w, k), g in self.free.items())


@dataclasses.dataclass
class _Wire:
    """A batch dataclass on its way from a worker: its small tensors as numpy arrays."""

    cls: type
    fields: Dict[str, Any]
    arrays: Tuple[str, ...]


def to_wire(batch, keep: str = "region_feats"):
    """``batch`` (a dataclass of tensors, possibly nested) with every tensor but the ``keep`` field(s) as a numpy
    array sharing its memory (pickled by value)."""
    if not dataclasses.is_dataclass(batch):
        return batch
    fields, arrays = {}, []
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor) and f.name != keep:
            v, _ = v.numpy(), arrays.append(f.name)
        fields[f.name] = to_wire(v, keep)
    return _Wire(type(batch), fields, tuple(arrays))


def from_wire(wire):
    """The batch of :func:`to_wire`, with tensors again (sharing the unpickled arrays' memory)."""
    if not isinstance(wire, _Wire):
        return wire
    return wire.cls(**{k: torch.from_numpy(v) if k in wire.arrays else from_wire(v) for k, v in wire.fields.items()})
