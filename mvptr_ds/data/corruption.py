"""Input corruption for MLM, MCR and concepts, and the per-batch draws of ITM/WPG (MVPTR.md section 3).

Pure functions of their inputs and an explicit ``numpy.random.Generator``; nothing here touches a global
RNG. (numpy, not torch: a sample's draws are a handful of tiny arrays, and numpy's per-call cost is about ten
times lower, which is what decides loader throughput.) The loader seeds one generator per sample from
``(seed, epoch, sample_id)`` (:func:`sample_generator`), so a sample's corruption does not depend on the
batch it lands in or the world size, and one generator per micro batch from ``(seed, epoch, global
position)`` (:func:`batch_generator`: not the rank) for the batch-level draws: WPG's negative pairs and
top-k picks, ITM's split of the rows between text-side and image-side negatives and its negative draws.

* Word pieces (caption words for MLM, tag words for MCR): each selected with probability ``mask_prob``;
  a selected piece becomes ``[MASK]`` (80%), a random word piece, any id in ``[0, only_word_size)`` as the
  release draws it from the whole tokenizer vocabulary (10%), or stays (10%); its label is the original
  id, every other label is -1.
* Concepts: a concept linked to a selected caption word is always ``[MASK]`` (the word must not leak
  through it); every other concept is selected with probability ``mask_prob`` and becomes ``[MASK]`` (80%),
  a random concept id from ``VocabInfo.concept_range`` (10%; kept when that range is empty), or stays
  (10%). Concepts are never predicted, so they get no labels.
* Regions are never corrupted.

The draws are made for every position whether or not it is selected, in a fixed order (selection, kind,
replacement id), so the result is a function of the generator's seed and the input lengths only.
Id arrays are 1-d int64 numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from mvptr_ds.data.vocab import VocabInfo

MASK_FRACTION = 0.8     # of selected positions -> [MASK]
RANDOM_FRACTION = 0.1   # of selected positions -> random id; the remaining 10% keep their id
IGNORE = -1

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Hash integers into one 63-bit seed (SplitMix64 finaliser over a running state); order matters."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


def generator(*values: int) -> np.random.Generator:
    """A fresh generator seeded by the integers ``values`` (see :func:`mix_seed`)."""
    return np.random.Generator(np.random.PCG64(mix_seed(*values)))


def sample_generator(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """Generator for one sample's corruption in one epoch."""
    return generator(1, seed, epoch, sample_id)


def join_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Generator for whether, and with which pair, dataset index ``index`` is joined in epoch ``epoch``
    (``--join_pairs``, :mod:`~mvptr_ds.data.pair_joining`)."""
    return generator(4, seed, epoch, index)


def batch_generator(seed: int, epoch: int, position: int) -> np.random.Generator:
    """Generator for the per-batch draws of the micro batch whose first sample sits at global ``position``.

    Seeded by the global position alone (not the rank), so a micro batch gets the same draws whichever
    rank or accumulation step processes it: 2 ranks x micro batch m and 1 rank x m x 2 accumulation steps
    see identical batches.
    """
    return generator(2, seed, epoch, position)


@dataclass
class MaskedTokens:
    ids: np.ndarray          # [n] int64, after corruption
    labels: np.ndarray       # [n] int64, original id where selected, else -1
    selected: np.ndarray     # [n] bool


def _corrupt(ids: np.ndarray, gen: np.random.Generator, mask_prob: float, mask_id: int,
             random_range: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Select at ``mask_prob``, then 80% ``mask_id`` / 10% uniform in ``random_range`` / 10% kept."""
    n = ids.shape[0]
    selected = gen.random(n) < mask_prob
    kind = gen.random(n)
    lo, hi = random_range
    random_ids = gen.integers(lo, hi, n) if hi > lo else ids
    out = np.where(selected & (kind < MASK_FRACTION), mask_id, ids)
    is_random = selected & (kind >= MASK_FRACTION) & (kind < MASK_FRACTION + RANDOM_FRACTION)
    return np.where(is_random, random_ids, out).astype(np.int64), selected


def mask_tokens(ids: np.ndarray, gen: np.random.Generator, mask_prob: float, mask_id: int,
                random_range: Tuple[int, int]) -> MaskedTokens:
    """BERT-style 15% / 80-10-10 corruption of a 1-d sequence of word ids ``[n]``."""
    out, selected = _corrupt(ids, gen, mask_prob, mask_id, random_range)
    return MaskedTokens(out, np.where(selected, ids, IGNORE).astype(np.int64), selected)


def corrupt_concepts(concept_ids: np.ndarray, links: Sequence[Sequence[int]], word_selected: np.ndarray,
                     gen: np.random.Generator, mask_prob: float, mask_id: int,
                     concept_range: Tuple[int, int]) -> np.ndarray:
    """Corrupt concept ids ``[k]``; ``links[j]`` are indices into ``word_selected`` ``[n]`` of concept j's words.

    Returns the corrupted ids ``[k]``. Link indices outside ``word_selected`` (words cut by truncation) are
    ignored.
    """
    n = word_selected.shape[0]
    linked = np.array([any(0 <= w < n and word_selected[w] for w in ws) for ws in links], dtype=bool)
    out, _ = _corrupt(concept_ids, gen, mask_prob, mask_id, concept_range)
    return np.where(linked, mask_id, out).astype(np.int64) if len(links) else out


@dataclass
class CorruptedSample:
    caption_ids: np.ndarray     # [n] int64
    mlm_labels: np.ndarray      # [n] int64 (-1: not scored)
    concept_ids: np.ndarray     # [k] int64
    tag_ids: np.ndarray         # [m] int64
    mcr_labels: np.ndarray      # [m] int64 (-1: not scored)


def corrupt_sample(caption_ids: np.ndarray, concept_ids: np.ndarray, links: Sequence[Sequence[int]],
                   tag_ids: np.ndarray, gen: np.random.Generator, vocab: VocabInfo, mask_prob: float,
                   mlm: bool, mcr: bool) -> CorruptedSample:
    """Corrupt one (already truncated) sample: caption words + concepts when ``mlm``, tag words when ``mcr``.

    Without ``mlm`` the caption and concepts pass through with all labels -1 (retrieval-style inputs);
    without ``mcr`` the tags do. Draw order: caption, concepts, tags.
    """
    if mlm:
        words = mask_tokens(caption_ids, gen, mask_prob, vocab.mask_id, (0, vocab.only_word_size))
        caption_out, mlm_labels = words.ids, words.labels
        concepts_out = corrupt_concepts(concept_ids, links, words.selected, gen, mask_prob, vocab.mask_id,
                                        vocab.concept_range)
    else:
        caption_out, mlm_labels = caption_ids, np.full_like(caption_ids, IGNORE)
        concepts_out = concept_ids
    if mcr:
        tags = mask_tokens(tag_ids, gen, mask_prob, vocab.mask_id, (0, vocab.only_word_size))
        tags_out, mcr_labels = tags.ids, tags.labels
    else:
        tags_out, mcr_labels = tag_ids, np.full_like(tag_ids, IGNORE)
    return CorruptedSample(caption_out, mlm_labels, concepts_out, tags_out, mcr_labels)


def wpg_negative_pairs(image_ids: np.ndarray, gen: np.random.Generator, exclude_same_image: bool = True
                       ) -> np.ndarray:
    """For each pair ``i`` of ``image_ids`` ``[B]``, a uniformly random other in-batch pair ``j`` whose image is
    WPG's negative: with ``exclude_same_image`` (the correction) one whose image differs from i's, else any
    ``j != i`` (the release's ``random.choice`` over the other pairs).

    Returns ``[B]`` int64, -1 where no pair qualifies (a batch of one; every pair showing i's image).
    """
    b = image_ids.shape[0]
    allowed = image_ids[:, None] != image_ids[None, :] if exclude_same_image else ~np.eye(b, dtype=bool)  # [B, B]
    score = np.where(allowed, gen.random((b, b)), -1.0)
    best = score.argmax(axis=1) if b else np.zeros(0, dtype=np.int64)
    return np.where(allowed.any(axis=1), best, -1).astype(np.int64)


def wpg_picks(batch_size: int, length: int, gen: np.random.Generator) -> np.ndarray:
    """Uniform ``[0, 1)`` draws ``[B, L]`` float32: which of a phrase's top-k regions WPG takes."""
    return gen.random((batch_size, length), dtype=np.float32)


def itm_text_side(batch_size: int, gen: np.random.Generator) -> np.ndarray:
    """``[B]`` bool: the rows whose text gets a mined negative image (the others: their image gets a negative
    text). ``B // 2`` rows chosen uniformly at random, as the release's ``randperm`` split."""
    side = np.zeros(batch_size, dtype=bool)
    side[gen.permutation(batch_size)[:batch_size // 2]] = True
    return side
