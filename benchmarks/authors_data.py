"""Benchmark samples at the authors' vocabulary sizes, drawn like their timing harness draws them.

The authors' model has a shared word/concept table of 86,051 rows whose first 30,522 are BERT word pieces
(the MLM/MCR decoders predict over those), so at base size it holds 245.5M parameters; the scene world's
439-id vocabulary gives 133M and hides most of the embedding, decoder and optimizer cost. These samples
have the authors' sizes and the length distribution of their harness (``../shared/peer/authors_step.py``):

* caption: 10-25 word pieces, ids uniform over the real BERT pieces ``[999, 30522)`` (the ``[unusedN]``
  block and the specials below 999 are never drawn), plus 0-5 concept ids uniform over ``[30522, 79507)``
  (the concept ids the harness draws);
* tags: 5-18 word pieces (the visual text stream is ``[CLS] tags [SEP]``, 7-20 positions);
* regions: 10-50 of 2054-d features, uniform in ``[0, 1)`` (float32);
* 15% masking, applied by whoever turns the samples into a batch (this project's collator: 80% ``[MASK]`` /
  10% random / 10% kept, as the release's data loader; the authors' driver: ``[MASK]`` as their harness).

Every sample is a pure function of ``(seed, index)`` (:func:`draw_sample`), so the two sides of the
benchmark can be given the same samples by index: this project's loader picks a batch of indices, the
authors' driver (``authors_driver.py``, a separate process) redraws the same samples from those indices.
This module imports only numpy (the driver must not import mvptr_ds next to the authors' vendored
``transformers``); :func:`authors_bundle` (this project's data bundle) imports mvptr_ds when called.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import numpy as np

# The authors' vocabulary: BERT uncased word pieces, then their concept (phrase) and theme ids.
AUTHORS_VOCAB_SIZE = 86051
AUTHORS_ONLY_WORD_SIZE = 30522

# Lengths drawn per sample, inclusive ranges (the authors' harness).
CAPTION_WORDS = (10, 25)
CONCEPTS = (0, 5)
TAG_PIECES = (5, 18)
REGIONS = (10, 50)
FEATURE_DIM = 2054
MASK_PROB = 0.15


@dataclass(frozen=True)
class IdSpace:
    """Where the ids of a generated sample come from: ``[start, end)`` ranges and the special ids."""

    vocab_size: int
    only_word_size: int
    word_range: Tuple[int, int]
    concept_range: Tuple[int, int]
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "IdSpace":
        d = dict(d)
        d["word_range"], d["concept_range"] = tuple(d["word_range"]), tuple(d["concept_range"])
        return cls(**d)


AUTHORS_IDS = IdSpace(vocab_size=AUTHORS_VOCAB_SIZE, only_word_size=AUTHORS_ONLY_WORD_SIZE,
                      word_range=(999, AUTHORS_ONLY_WORD_SIZE), concept_range=(AUTHORS_ONLY_WORD_SIZE, 79507))


def ids_of_vocab(vocab) -> IdSpace:
    """The id space of an mvptr_ds ``VocabInfo`` (e.g. the scene world's), for drawing samples in it."""
    return IdSpace(vocab_size=vocab.vocab_size, only_word_size=vocab.only_word_size,
                   word_range=tuple(vocab.real_word_range), concept_range=tuple(vocab.concept_range),
                   pad_id=vocab.pad_id, cls_id=vocab.cls_id, sep_id=vocab.sep_id, mask_id=vocab.mask_id)


def draw_sample(ids: IdSpace, seed: int, index: int) -> Dict[str, np.ndarray]:
    """Sample ``index`` of the stream ``seed``: ``caption_ids`` [w], ``concept_ids`` [c], ``tag_ids`` [t] (int64,
    no [CLS]/[SEP]) and ``regions`` float32 [r, 2054]; lengths as in the module doc."""
    rng = np.random.default_rng([int(seed), 13, int(index)])
    words = int(rng.integers(CAPTION_WORDS[0], CAPTION_WORDS[1] + 1))
    concepts = int(rng.integers(CONCEPTS[0], CONCEPTS[1] + 1))
    tags = int(rng.integers(TAG_PIECES[0], TAG_PIECES[1] + 1))
    regions = int(rng.integers(REGIONS[0], REGIONS[1] + 1))
    lo, hi = ids.concept_range
    return {
        "caption_ids": rng.integers(*ids.word_range, size=words, dtype=np.int64),
        "concept_ids": (rng.integers(lo, hi, size=concepts, dtype=np.int64) if hi > lo
                        else np.zeros(0, dtype=np.int64)),
        "tag_ids": rng.integers(*ids.word_range, size=tags, dtype=np.int64),
        "regions": rng.random((regions, FEATURE_DIM), dtype=np.float32),
    }


class GeneratedSamples:
    """Indexable dataset of mvptr_ds ``Example`` s: sample ``i`` is ``draw_sample(ids, seed, i)``, its own image."""

    def __init__(self, ids: IdSpace, size: int, seed: int = 0):
        self.ids, self.size, self.seed = ids, int(size), int(seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        from mvptr_ds.data.types import Example

        if not 0 <= i < self.size:
            raise IndexError(i)
        s = draw_sample(self.ids, self.seed, i)
        return Example(sample_id=int(i), image_id=int(i), caption_ids=s["caption_ids"].tolist(),
                       concept_ids=s["concept_ids"].tolist(), concept_word_links=[[] for _ in s["concept_ids"]],
                       tag_ids=s["tag_ids"].tolist(), regions=s["regions"], concept_regions=None)


def authors_bundle(data_cfg, objectives, size: int, seed: int = 0):
    """An mvptr_ds ``DataBundle`` over :class:`GeneratedSamples` with the authors' vocabulary (``VocabInfo``
    86,051 rows, 30,522 word pieces, [CLS]/[SEP]/[MASK] = 101/102/103 as BERT uncased) and the collator of
    ``data_cfg`` (15% masking)."""
    from mvptr_ds.data.batching import Collator
    from mvptr_ds.data.pipeline import DataBundle
    from mvptr_ds.data.vocab import VocabInfo

    a = AUTHORS_IDS
    vocab = VocabInfo(vocab_size=a.vocab_size, only_word_size=a.only_word_size, pad_id=a.pad_id, cls_id=a.cls_id,
                      sep_id=a.sep_id, mask_id=a.mask_id, concept_range=a.concept_range, word_range=a.word_range)
    return DataBundle(train=GeneratedSamples(a, size, seed), held_out=[], vocab=vocab,
                      collator=Collator.from_config(data_cfg, vocab, objectives), world=None)
