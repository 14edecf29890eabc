"""Examples -> one padded, corrupted :class:`~mvptr_ds.data.types.Batch` (:class:`Collator`).

Per sample, in this order:

1. truncate: caption words to ``max_seq_length - 2`` (the text stream's ``[CLS]``/``[SEP]`` come out of
   ``max_seq_length``, as in MVPTR.md section 2); concepts (and their links and regions) to the slots the
   caption leaves free, ``max_phrases + max_seq_length - 2 - words`` (the release's rule: the text stream
   holds at most ``max_seq_length + max_phrases`` positions, a short caption leaves room for more concepts);
   tag words to ``max_tag_length - 2``; regions to ``max_img_seq_length`` (a concept whose true region was
   cut gets region -1). Every cut is counted in :class:`TruncationCounts`; nothing is dropped silently.
2. corrupt with a generator seeded by ``(seed, epoch, sample_id)`` (``corruption.corrupt_sample``; computed
   for the whole batch at once by ``batch_corruption.corrupt_batch``, the same draws).
3. lay out ``[CLS] words concepts [SEP]`` and ``[CLS] tags [SEP]``, pad every stream to the batch's
   longest, and draw WPG's negative pairs and top-k picks and ITM's text/image split and negative draws
   (used by its sampled and random negatives) from a generator seeded
   by ``(seed, epoch, global position of the micro batch)`` (not the rank: the draws follow the batch
   whichever rank processes it).

The work is done on the batch's ids laid end to end (``batch_corruption.Flat``), not sample by sample.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from mvptr_ds.data import corruption
from mvptr_ds.data.batch_corruption import Flat, corrupt_batch
from mvptr_ds.data.sample_streams import mix_seeds
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


# (shape, numpy dtype) -> (array, tensor sharing its memory); see :func:`feature_buffer`
BufferSource = Callable[[Tuple[int, ...], type], Tuple[np.ndarray, torch.Tensor]]


def _flat(seqs, lengths: np.ndarray) -> np.ndarray:
    """Integer sequences (lists or arrays) laid end to end, int64 ``[sum(lengths)]``."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])


def _keep(full: Flat, limits: np.ndarray) -> Flat:
    """The first ``limits[b]`` ids of each sample of ``full``."""
    kept = np.minimum(full.lengths, limits)
    return Flat(full.ids[full.pos < limits[full.owner]], kept)


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

    def collate(self, examples: Sequence[Example], ctx: BatchContext = BatchContext(),
                buffers: Optional[BufferSource] = None) -> Tuple[Batch, TruncationCounts]:
        """Truncate, corrupt and pad ``examples`` into a :class:`Batch` (shapes in ``types.Batch``).

        ``buffers(shape, dtype)`` gives the region-feature array to fill (default :func:`feature_buffer`).
        """
        if len(examples) == 0:
            raise BatchError("cannot collate an empty batch (0 examples)")
        epochs = ctx.sample_epochs or (ctx.epoch,) * len(examples)
        if len(epochs) != len(examples):
            raise BatchError(f"BatchContext.sample_epochs has {len(epochs)} entries for {len(examples)} examples")
        v, B = self.vocab, len(examples)
        feat_dim = self._feature_dim(examples[0])
        count = lambda seqs: np.fromiter(map(len, seqs), np.int64, B)    # noqa: E731
        caps, cons, tgs = ([getattr(ex, f) for ex in examples] for f in ("caption_ids", "concept_ids", "tag_ids"))
        full_w, full_c, full_t = Flat(_flat(caps, count(caps)), count(caps)), \
            Flat(_flat(cons, count(cons)), count(cons)), Flat(_flat(tgs, count(tgs)), count(tgs))
        self._check_batch(examples, feat_dim, (full_w, full_c, full_t))

        words = _keep(full_w, np.full(B, self.max_words))
        slots = self.max_phrases + self.max_words - words.lengths      # concepts fill what the caption leaves
        concepts = _keep(full_c, slots)
        tags = _keep(full_t, np.full(B, self.max_tags))
        links = [w for ex, s in zip(examples, concepts.lengths.tolist()) for w in ex.concept_word_links[:s]]
        regions = [ex.regions[:self.max_regions] for ex in examples]
        n_regions = np.fromiter((r.shape[0] for r in regions), np.int64, B)
        full_regions = np.fromiter((ex.regions.shape[0] for ex in examples), np.int64, B)
        has_regions = any(ex.concept_regions is not None for ex in examples)
        targets = np.full(len(concepts.ids), -1, np.int64)
        if has_regions:
            targets = _flat([list(ex.concept_regions[:s]) if ex.concept_regions is not None else [-1] * s
                             for ex, s in zip(examples, concepts.lengths.tolist())], concepts.lengths)
        lost = targets >= n_regions[concepts.owner]
        targets[lost] = -1
        cut = np.stack([full_w.lengths - words.lengths, full_c.lengths - concepts.lengths,
                        full_t.lengths - tags.lengths, full_regions - n_regions])       # [4, B]
        counts = TruncationCounts(B, int((cut > 0).any(axis=0).sum()), *(int(x) for x in cut.sum(axis=1)),
                                  int(lost.sum()))

        seeds = mix_seeds(1, ctx.seed, epochs, [ex.sample_id for ex in examples])   # corruption.sample_generator's
        out = corrupt_batch(words, concepts, links, tags, seeds, v, self.mask_prob, self.mlm, self.mcr)

        rows = np.arange(B)
        text_len, tag_len = words.lengths + concepts.lengths + 2, tags.lengths + 2
        Lt, Lg, Lr = int(text_len.max()), int(tag_len.max()), int(n_regions.max())
        text_ids = np.full((B, Lt), v.pad_id, dtype=np.int64)
        mlm_labels = np.full((B, Lt), corruption.IGNORE, dtype=np.int64)
        phrase_mask = np.zeros((B, Lt), dtype=bool)
        phrase_regions = np.full((B, Lt), -1, dtype=np.int64)
        text_ids[:, 0] = v.cls_id
        text_ids[words.owner, 1 + words.pos] = out.words
        mlm_labels[words.owner, 1 + words.pos] = out.mlm_labels
        at = 1 + words.lengths[concepts.owner] + concepts.pos                # concept positions in the text
        text_ids[concepts.owner, at] = out.concepts
        phrase_mask[concepts.owner, at] = True
        phrase_regions[concepts.owner, at] = targets
        text_ids[rows, text_len - 1] = v.sep_id
        tag_ids = np.full((B, Lg), v.pad_id, dtype=np.int64)
        mcr_labels = np.full((B, Lg), corruption.IGNORE, dtype=np.int64)
        tag_ids[:, 0] = v.cls_id
        tag_ids[tags.owner, 1 + tags.pos] = out.tags
        mcr_labels[tags.owner, 1 + tags.pos] = out.mcr_labels
        tag_ids[rows, tag_len - 1] = v.sep_id
        # fp16 regions (a converted store) stay fp16: the trainer converts them on the device
        half = all(r.dtype == np.float16 for r in regions)
        feats, region_feats = (buffers or feature_buffer)((B, Lr, feat_dim), np.float16 if half else np.float32)
        for i, r in enumerate(regions):
            feats[i, :r.shape[0]] = r
            feats[i, r.shape[0]:] = 0
        gen = corruption.batch_generator(ctx.seed, ctx.epoch, ctx.position)
        image_ids = np.array([ex.image_id for ex in examples], dtype=np.int64)
        wpg_negative = corruption.wpg_negative_pairs(image_ids, gen, self.exclude_same_image)
        pick_positive = corruption.wpg_picks(B, Lt, gen)
        pick_negative = corruption.wpg_picks(B, Lt, gen)
        text_side = corruption.itm_text_side(B, gen)
        itm_draw = gen.random((B, 2), dtype=np.float32)
        wpg_draw = gen.random(B, dtype=np.float32)  # drawn last: the draws above do not depend on it
        t = torch.from_numpy
        batch = Batch(
            text_ids=t(text_ids),
            text_mask=t(np.arange(Lt)[None, :] < text_len[:, None]),      # [B, Lt]
            phrase_mask=t(phrase_mask),
            tag_ids=t(tag_ids),
            tag_mask=t(np.arange(Lg)[None, :] < tag_len[:, None]),        # [B, Lg]
            region_feats=region_feats,
            region_mask=t(np.arange(Lr)[None, :] < n_regions[:, None]),   # [B, Lr]
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
            wpg_negative_draw=t(wpg_draw),
        )
        return batch, counts

    def _feature_dim(self, ex: Example) -> int:
        if getattr(ex.regions, "ndim", 0) != 2:
            raise BatchError(f"sample {ex.sample_id}: field 'regions' must be a 2-d array [num_regions, dim], "
                             f"got shape {getattr(ex.regions, 'shape', None)}")
        return ex.regions.shape[1]

    def _check_batch(self, examples: Sequence[Example], feat_dim: int, flats: Sequence[Flat]) -> None:
        """Every example batchable; else the first fault of the first bad example (:meth:`_check`)."""
        ok = all(getattr(ex.regions, "ndim", 0) == 2 and ex.regions.shape[1] == feat_dim
                 and len(ex.concept_word_links) == len(ex.concept_ids)
                 and (ex.concept_regions is None or len(ex.concept_regions) == len(ex.concept_ids))
                 for ex in examples)
        ok = ok and not any(((f.ids < 0) | (f.ids >= self.vocab.vocab_size)).any() for f in flats)
        if not ok:
            for ex in examples:
                self._check(ex, feat_dim)

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


def feature_buffer(shape: Tuple[int, ...], dtype) -> Tuple[np.ndarray, torch.Tensor]:
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
