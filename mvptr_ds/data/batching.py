"""Examples -> padded, corrupted :class:`~mvptr_ds.data.types.Batch`, and the rank-aware resumable loader.

Collate (:class:`Collator`), per sample, in this order:

1. truncate: caption words to ``max_seq_length - 2`` (the text stream's ``[CLS]``/``[SEP]`` come out of
   ``max_seq_length``, as in MVPTR.md section 2); concepts (and their links and regions) to the slots the
   caption leaves free, ``max_phrases + max_seq_length - 2 - words`` (the release's rule: the text stream
   holds at most ``max_seq_length + max_phrases`` positions, a short caption leaves room for more concepts);
   tag words to ``max_tag_length - 2``; regions to ``max_img_seq_length`` (a concept whose true region was
   cut gets region -1). Every cut is counted in :class:`TruncationCounts`; nothing is dropped silently.
2. corrupt with a generator seeded by ``(seed, epoch, sample_id)`` (``corruption.corrupt_sample``).
3. lay out ``[CLS] words concepts [SEP]`` and ``[CLS] tags [SEP]``, pad every stream to the batch's
   longest, and draw WPG's negative pairs and top-k picks and ITM's text/image split and negative draws
   (used by its sampled and random negatives) from a generator seeded
   by ``(seed, epoch, global position of the micro batch)`` (not the rank: the draws follow the batch
   whichever rank processes it).

Order (:func:`step_plan`): epoch ``e`` has one global permutation of the dataset, seeded by ``(seed, e)``.
Step ``t`` consumes the global slice ``[position, position + micro_batch * world_size)`` of the stream
of permutations (epoch ``e``'s, then ``e+1``'s, ...: nothing is dropped and every rank always gets a full
micro batch); rank ``r`` takes the ``r``-th contiguous ``micro_batch`` chunk. The state ``(epoch,
position)`` counts global samples, so it does not depend on the world size: a run checkpointed on N ranks
continues on M ranks without repeating or skipping a sample.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mvptr_ds.data import corruption
from mvptr_ds.data.types import Batch, Example
from mvptr_ds.data.vocab import VocabInfo


class BatchError(ValueError):
    """An example cannot be batched; the message names its sample id and field."""


@dataclass(frozen=True)
class BatchContext:
    """Where a batch sits in the data stream: seeds every random draw of its collation."""

    seed: int = 0
    epoch: int = 0                            # epoch of the step's first global sample
    position: int = 0                         # global position of this micro batch's first sample
    rank: int = 0
    sample_epochs: Optional[Tuple[int, ...]] = None  # epoch each example was drawn in (None: all ``epoch``)


@dataclass
class TruncationCounts:
    """What truncation cut (items, not samples, except ``samples`` / ``samples_truncated``)."""

    samples: int = 0
    samples_truncated: int = 0
    caption_words: int = 0
    concepts: int = 0
    tag_words: int = 0
    regions: int = 0
    concept_regions: int = 0      # true regions of kept concepts that were cut (set to -1)

    def add(self, other: "TruncationCounts") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


class Collator:
    """``collator(examples, ctx) -> Batch``; ``collate`` also returns this batch's :class:`TruncationCounts`.

    ``objectives`` decides what is corrupted: caption words and concepts when it holds ``"mlm"``, tag words
    when it holds ``"mcr"``. ``exclude_same_image``: WPG's negative pair never shows the row's image
    (``ObjectiveConfig.exclude_same_image``). ``counters`` accumulates the truncations of every ``__call__``.
    """

    def __init__(self, vocab: VocabInfo, objectives: Sequence[str], max_seq_length: int = 35,
                 max_phrases: int = 5, max_tag_length: int = 20, max_img_seq_length: int = 50,
                 mask_prob: float = 0.15, exclude_same_image: bool = True):
        if min(max_seq_length, max_tag_length) < 3 or max_img_seq_length < 1 or max_phrases < 0:
            raise ValueError(f"Collator: max_seq_length={max_seq_length} and max_tag_length={max_tag_length} "
                             f"must be >= 3, max_img_seq_length={max_img_seq_length} >= 1, "
                             f"max_phrases={max_phrases} >= 0")
        self.vocab = vocab
        self.mlm = "mlm" in objectives
        self.mcr = "mcr" in objectives
        self.max_words = max_seq_length - 2
        self.max_phrases = max_phrases
        self.max_tags = max_tag_length - 2
        self.max_regions = max_img_seq_length
        self.mask_prob = mask_prob
        self.exclude_same_image = exclude_same_image
        self.counters = TruncationCounts()

    @classmethod
    def from_config(cls, data_cfg, vocab: VocabInfo, objectives: Sequence[str],
                    exclude_same_image: bool = True) -> "Collator":
        """Limits and mask rate from a :class:`~mvptr_ds.config.DataConfig`."""
        return cls(vocab, objectives, data_cfg.max_seq_length, data_cfg.max_phrases, data_cfg.max_tag_length,
                   data_cfg.max_img_seq_length, data_cfg.mask_prob, exclude_same_image)

    def __call__(self, examples: Sequence[Example], ctx: BatchContext = BatchContext()) -> Batch:
        batch, counts = self.collate(examples, ctx)
        self.counters.add(counts)
        return batch

    def collate(self, examples: Sequence[Example], ctx: BatchContext = BatchContext()
                ) -> Tuple[Batch, TruncationCounts]:
        """Truncate, corrupt and pad ``examples`` into a :class:`Batch` (shapes in ``types.Batch``)."""
        if len(examples) == 0:
            raise BatchError("cannot collate an empty batch (0 examples)")
        epochs = ctx.sample_epochs or (ctx.epoch,) * len(examples)
        if len(epochs) != len(examples):
            raise BatchError(f"BatchContext.sample_epochs has {len(epochs)} entries for {len(examples)} examples")
        counts = TruncationCounts()
        feat_dim = self._feature_dim(examples[0])
        rows = [self._sample(ex, ctx.seed, ep, feat_dim, counts) for ex, ep in zip(examples, epochs)]
        v = self.vocab
        B = len(rows)
        Lt = max(len(r["text"]) for r in rows)
        Lg = max(len(r["tags"]) for r in rows)
        Lr = max(r["regions"].shape[0] for r in rows)
        text_ids = np.full((B, Lt), v.pad_id, dtype=np.int64)
        mlm_labels = np.full((B, Lt), corruption.IGNORE, dtype=np.int64)
        phrase_mask = np.zeros((B, Lt), dtype=bool)
        phrase_regions = np.full((B, Lt), -1, dtype=np.int64)
        tag_ids = np.full((B, Lg), v.pad_id, dtype=np.int64)
        mcr_labels = np.full((B, Lg), corruption.IGNORE, dtype=np.int64)
        # fp16 regions (a converted store) stay fp16: the trainer converts them on the device
        half = all(r["regions"].dtype == np.float16 for r in rows)
        feats, region_feats = _feature_buffer((B, Lr, feat_dim), np.float16 if half else np.float32)
        text_len, tag_len, reg_len = (np.array([len(r[k]) for r in rows]) for k in ("text", "tags", "regions"))
        for i, r in enumerate(rows):
            n = len(r["text"])
            text_ids[i, :n] = r["text"]
            mlm_labels[i, :n] = r["mlm"]
            lo, hi = r["phrase_span"]
            phrase_mask[i, lo:hi] = True
            phrase_regions[i, lo:hi] = r["phrase_regions"]
            tag_ids[i, :len(r["tags"])] = r["tags"]
            mcr_labels[i, :len(r["tags"])] = r["mcr"]
            feats[i, :r["regions"].shape[0]] = r["regions"]
            feats[i, r["regions"].shape[0]:] = 0
        gen = corruption.batch_generator(ctx.seed, ctx.epoch, ctx.position)
        image_ids = np.array([ex.image_id for ex in examples], dtype=np.int64)
        wpg_negative = corruption.wpg_negative_pairs(image_ids, gen, self.exclude_same_image)
        pick_positive = corruption.wpg_picks(B, Lt, gen)
        pick_negative = corruption.wpg_picks(B, Lt, gen)
        text_side = corruption.itm_text_side(B, gen)
        itm_draw = gen.random((B, 2), dtype=np.float32)
        has_regions = any(ex.concept_regions is not None for ex in examples)
        t = torch.from_numpy
        batch = Batch(
            text_ids=t(text_ids),
            text_mask=t(np.arange(Lt)[None, :] < text_len[:, None]),      # [B, Lt]
            phrase_mask=t(phrase_mask),
            tag_ids=t(tag_ids),
            tag_mask=t(np.arange(Lg)[None, :] < tag_len[:, None]),        # [B, Lg]
            region_feats=region_feats,
            region_mask=t(np.arange(Lr)[None, :] < reg_len[:, None]),     # [B, Lr]
            image_ids=t(image_ids),
            sample_ids=torch.tensor([ex.sample_id for ex in examples], dtype=torch.long),
            mlm_labels=t(mlm_labels),
            mcr_labels=t(mcr_labels),
            wpg_negative_pair=t(wpg_negative),
            wpg_pick_positive=t(pick_positive),
            wpg_pick_negative=t(pick_negative),
            itm_text_side=t(text_side),
            itm_negative_draw=t(itm_draw),
            phrase_regions=t(phrase_regions) if has_regions else None,
        )
        return batch, counts

    def _feature_dim(self, ex: Example) -> int:
        if getattr(ex.regions, "ndim", 0) != 2:
            raise BatchError(f"sample {ex.sample_id}: field 'regions' must be a 2-d array [num_regions, dim], "
                             f"got shape {getattr(ex.regions, 'shape', None)}")
        return ex.regions.shape[1]

    def _check(self, ex: Example, feat_dim: int) -> None:
        sid = ex.sample_id
        if self._feature_dim(ex) != feat_dim:
            raise BatchError(f"sample {sid}: field 'regions' has width {ex.regions.shape[1]}, but the batch's "
                             f"first example has {feat_dim}")
        for name, ids in (("caption_ids", ex.caption_ids), ("tag_ids", ex.tag_ids), ("concept_ids", ex.concept_ids)):
            ids = np.asarray(ids, dtype=np.int64)
            bad = ids[(ids < 0) | (ids >= self.vocab.vocab_size)]
            if bad.size:
                raise BatchError(f"sample {sid}: field '{name}' holds id {bad[0]} outside the vocabulary "
                                 f"(0..{self.vocab.vocab_size - 1})")
        if len(ex.concept_word_links) != len(ex.concept_ids):
            raise BatchError(f"sample {sid}: field 'concept_word_links' has {len(ex.concept_word_links)} entries "
                             f"for {len(ex.concept_ids)} concepts")
        if ex.concept_regions is not None and len(ex.concept_regions) != len(ex.concept_ids):
            raise BatchError(f"sample {sid}: field 'concept_regions' has {len(ex.concept_regions)} entries "
                             f"for {len(ex.concept_ids)} concepts")

    def _sample(self, ex: Example, seed: int, epoch: int, feat_dim: int, counts: TruncationCounts) -> dict:
        """One example, truncated and corrupted, as unpadded rows."""
        self._check(ex, feat_dim)
        words = ex.caption_ids[:self.max_words]
        slots = self.max_phrases + self.max_words - len(words)  # concepts fill what the caption leaves free
        concepts = ex.concept_ids[:slots]
        links = ex.concept_word_links[:slots]
        tags = ex.tag_ids[:self.max_tags]
        regions = ex.regions[:self.max_regions]
        targets = list(ex.concept_regions[:slots]) if ex.concept_regions is not None else [-1] * len(concepts)
        lost = sum(1 for t in targets if t >= regions.shape[0])
        targets = [t if t < regions.shape[0] else -1 for t in targets]
        cut = TruncationCounts(samples=1, caption_words=len(ex.caption_ids) - len(words),
                               concepts=len(ex.concept_ids) - len(concepts), tag_words=len(ex.tag_ids) - len(tags),
                               regions=ex.regions.shape[0] - regions.shape[0], concept_regions=lost)
        cut.samples_truncated = int(any((cut.caption_words, cut.concepts, cut.tag_words, cut.regions)))
        counts.add(cut)

        out = corruption.corrupt_sample(
            np.asarray(words, dtype=np.int64), np.asarray(concepts, dtype=np.int64), links,
            np.asarray(tags, dtype=np.int64), corruption.sample_generator(seed, epoch, ex.sample_id),
            self.vocab, self.mask_prob, self.mlm, self.mcr)
        v = self.vocab
        ign = [corruption.IGNORE]
        start = 1 + len(words)
        return {
            "text": np.concatenate([[v.cls_id], out.caption_ids, out.concept_ids, [v.sep_id]]),
            "mlm": np.concatenate([ign, out.mlm_labels, ign * len(concepts), ign]),
            "phrase_span": (start, start + len(concepts)),
            "phrase_regions": targets,
            "tags": np.concatenate([[v.cls_id], out.tag_ids, [v.sep_id]]),
            "mcr": np.concatenate([ign, out.mcr_labels, ign]),
            "regions": regions,
        }


def _feature_buffer(shape: Tuple[int, ...], dtype) -> Tuple[np.ndarray, torch.Tensor]:
    """An uninitialised ``shape`` array and the tensor sharing its memory (the caller writes every element).

    In a DataLoader worker the memory is shared memory, which the worker hands to the training process as it
    is, as torch's ``default_collate`` does; an ordinary tensor would be copied into shared memory when the
    batch is sent (measured: 32 ms of CPU per fp16 batch of 64 x 50 regions, against 17 ms this way).
    """
    tdtype = torch.float16 if dtype == np.float16 else torch.float32
    if torch.utils.data.get_worker_info() is None:
        arr = np.empty(shape, dtype)
        return arr, torch.from_numpy(arr)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    tensor = torch.empty(0, dtype=tdtype).set_(storage, 0, shape)
    return tensor.numpy(), tensor


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
    """Dataset over plan keys ``(index, plan_id)`` for the multi-worker path; ``[key] -> (Example, key)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        return self.dataset[key[0]], key


class _PlanSampler:
    """Infinite batch sampler: one list of keys per step, each key carrying its step's plan."""

    def __init__(self, loader: "ResumableLoader"):
        self.loader = loader
        self.start = (loader.epoch, loader.position)

    def __iter__(self):
        ld = self.loader
        epoch, position = self.start
        orders = _Orders(len(ld.dataset), ld.seed)
        while True:
            plan = step_plan(len(ld.dataset), epoch, position, ld.micro_batch, ld.rank, ld.world_size, ld.seed,
                             orders)
            yield [(i, plan) for i in plan.indices]
            epoch, position = plan.next_epoch, plan.next_position


class _PlanCollate:
    def __init__(self, collator: Collator):
        self.collator = collator

    def __call__(self, items):
        plan = items[0][1][1]
        batch, counts = self.collator.collate([ex for ex, _ in items], plan.context)
        return batch, counts, plan


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
            batch, counts = self.collator.collate([self.dataset[i] for i in plan.indices], plan.context)
            self._yielded(plan, counts)
            yield batch

    def _iter_workers(self) -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(
            _PlannedDataset(self.dataset), batch_sampler=_PlanSampler(self), collate_fn=_PlanCollate(self.collator),
            num_workers=self.num_workers, prefetch_factor=self.prefetch_factor)
        for batch, counts, plan in loader:
            self._yielded(plan, counts)
            yield batch
