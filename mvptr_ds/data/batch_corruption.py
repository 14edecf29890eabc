"""The corruption of a whole batch at once, with the same draws as :func:`corruption.corrupt_sample` per sample.

:func:`corruption.corrupt_sample` is the specification: each sample draws from its own generator
(``corruption.sample_generator``), for the caption words their selection (``random(n)``), kind (``random(n)``)
and random ids (``integers(lo, hi, n)``), then the same for its concepts and its tags. Calling numpy for each of
those costs about ten times the work itself, so this module takes each sample's raw 64-bit outputs in one call
(``PCG64.random_raw``) and turns them into the same values for the whole batch with array operations:

* ``Generator.random()`` is ``(raw >> 11) * 2**-53``, one output per value;
* ``Generator.integers(lo, hi, n)`` (int64, a range below 2**32) is Lemire's method on 32-bit halves: the low half
  of an output first, its high half kept for the next 32-bit draw, also across calls (``random()`` leaves it); a
  range of one value draws nothing. A draw that Lemire's method would reject (a chance of about ``range / 2**32``,
  under 1e-5 at BERT's vocabulary) is not reproduced here: that sample is corrupted by ``corrupt_sample`` itself.

``tests/data/test_batch_corruption.py`` checks the outputs against ``corrupt_sample`` and these rules against numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from . import corruption
from .sample_streams import raw_outputs
from .vocab import VocabInfo

_LOW32 = np.uint64(0xFFFFFFFF)
_DOUBLE = 2.0 ** -53


@dataclass
class Flat:
    """One kind of id of the whole batch back to back: ``ids`` ``[sum(lengths)]`` int64, ``lengths`` ``[B]``,
    ``owner`` (the sample of each id) and ``pos`` (its position in its sample)."""

    ids: np.ndarray
    lengths: np.ndarray

    def __post_init__(self):
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.owner = np.repeat(np.arange(len(self.lengths)), self.lengths)
        self.pos = np.arange(len(self.ids), dtype=np.int64) - np.repeat(self.starts, self.lengths)


class _Stream:
    """Where each sample's draws sit in its raw outputs, segment by segment (the order of ``corrupt_sample``)."""

    def __init__(self, batch: int):
        self.next = np.zeros(batch, np.int64)          # the next unused output
        self.held = np.zeros(batch, bool)              # a high half kept for the next 32-bit draw
        self.held_at = np.zeros(batch, np.int64)       # the output holding it

    def segment(self, lengths: np.ndarray, draw_ids: bool) -> Tuple[np.ndarray, ...]:
        """Selection, kind and (when ``draw_ids``) random-id draws of ``lengths`` values per sample; returns the
        starts of the selection and kind outputs, of the id draws' fresh outputs, and the held half before them."""
        sel, kind = self.next, self.next + lengths
        self.next = self.next + 2 * lengths
        first, held, held_at = self.next, self.held, self.held_at
        if draw_ids:
            fresh = np.maximum(lengths - held, 0)
            outputs = (fresh + 1) // 2
            some = lengths > 0
            self.held = np.where(some, fresh % 2 == 1, held)
            self.held_at = np.where(some, first + outputs - 1, held_at)
            self.next = first + outputs
        return sel, kind, first, held, held_at


def _doubles(raw: np.ndarray, owner: np.ndarray, at: np.ndarray) -> np.ndarray:
    return (raw[owner, at] >> np.uint64(11)).astype(np.float64) * _DOUBLE


def _bounded(raw: np.ndarray, flat: Flat, first, held, held_at, lo: int, hi: int):
    """``integers(lo, hi)`` draws of every value of ``flat`` -> (values, samples whose draw Lemire would reject)."""
    b, q = flat.owner, flat.pos - held[flat.owner]
    word = raw[b, np.where(q < 0, held_at[b], first[b] + np.maximum(q, 0) // 2)]
    high = (q < 0) | (q % 2 == 1)
    u32 = np.where(high, word >> np.uint64(32), word & _LOW32)
    span = hi - lo
    m = u32 * np.uint64(span)
    rejected = (m & _LOW32) < np.uint64((2 ** 32 - span) % span)
    return lo + (m >> np.uint64(32)).astype(np.int64), np.unique(b[rejected])


def _corrupt(raw, flat: Flat, seg, mask_prob: float, mask_id: int, lo: int, hi: int):
    """``corruption._corrupt`` for every value of ``flat``: (ids, selected, samples to redo)."""
    sel_at, kind_at, first, held, held_at = seg
    b = flat.owner
    selected = _doubles(raw, b, sel_at[b] + flat.pos) < mask_prob
    kind = _doubles(raw, b, kind_at[b] + flat.pos)
    redo = np.zeros(0, np.int64)
    if hi - lo > 1:
        random_ids, redo = _bounded(raw, flat, first, held, held_at, lo, hi)
    else:
        random_ids = np.full_like(flat.ids, lo) if hi - lo == 1 else flat.ids
    out = np.where(selected & (kind < corruption.MASK_FRACTION), mask_id, flat.ids)
    is_random = (selected & (kind >= corruption.MASK_FRACTION)
                 & (kind < corruption.MASK_FRACTION + corruption.RANDOM_FRACTION))
    return np.where(is_random, random_ids, out).astype(np.int64), selected, redo


@dataclass
class CorruptedBatch:
    """The outputs of :func:`corrupt_batch`, flat as its inputs."""

    words: np.ndarray          # caption word ids after corruption
    mlm_labels: np.ndarray     # original id where selected, else -1
    concepts: np.ndarray
    tags: np.ndarray
    mcr_labels: np.ndarray


def corrupt_batch(words: Flat, concepts: Flat, links: Sequence[Sequence[int]], tags: Flat, seeds: Sequence[int],
                  vocab: VocabInfo, mask_prob: float, mlm: bool, mcr: bool) -> CorruptedBatch:
    """:func:`corruption.corrupt_sample` of every sample of a batch (``seeds[b]`` seeds sample b's generator, as
    ``corruption.generator``; ``links[j]``: word positions of concept j, flat order), the same result."""
    B = len(seeds)
    word_range, concept_range = (0, vocab.only_word_size), vocab.concept_range
    out = CorruptedBatch(words.ids.copy(), np.full_like(words.ids, corruption.IGNORE), concepts.ids.copy(),
                         tags.ids.copy(), np.full_like(tags.ids, corruption.IGNORE))
    if not (mlm or mcr) or B == 0:
        return out
    if max(word_range[1] - word_range[0], concept_range[1] - concept_range[0]) >= 2 ** 32:
        return _reference(words, concepts, links, tags, seeds, vocab, mask_prob, mlm, mcr, range(B), out)
    stream = _Stream(B)
    segments = {}
    if mlm:
        segments["words"] = stream.segment(words.lengths, word_range[1] - word_range[0] > 1)
        segments["concepts"] = stream.segment(concepts.lengths, concept_range[1] - concept_range[0] > 1)
    if mcr:
        segments["tags"] = stream.segment(tags.lengths, word_range[1] - word_range[0] > 1)
    width = int(stream.next.max())
    raw = raw_outputs(seeds, max(width, 1))                  # [B, outputs]: sample b's raw outputs in row b
    redo = [np.zeros(0, np.int64)]
    if mlm:
        out.words, selected, again = _corrupt(raw, words, segments["words"], mask_prob, vocab.mask_id, *word_range)
        out.mlm_labels = np.where(selected, words.ids, corruption.IGNORE).astype(np.int64)
        concept_out, _, again2 = _corrupt(raw, concepts, segments["concepts"], mask_prob, vocab.mask_id,
                                          *concept_range)
        # a concept linked to a selected word of its caption is always masked (links past the caption ignored)
        link_of = np.repeat(np.arange(len(links)), [len(x) for x in links])            # concept of each link
        at = np.fromiter((p for x in links for p in x), np.int64, len(link_of))        # its word position
        owner = concepts.owner[link_of]
        valid = (at >= 0) & (at < words.lengths[owner])
        linked = np.zeros(len(concepts.ids), bool)
        linked[link_of[valid][selected[words.starts[owner[valid]] + at[valid]]]] = True
        out.concepts = np.where(linked, vocab.mask_id, concept_out).astype(np.int64)
        redo += [again, again2]
    if mcr:
        out.tags, selected, again = _corrupt(raw, tags, segments["tags"], mask_prob, vocab.mask_id, *word_range)
        out.mcr_labels = np.where(selected, tags.ids, corruption.IGNORE).astype(np.int64)
        redo.append(again)
    samples = np.unique(np.concatenate(redo))
    return _reference(words, concepts, links, tags, seeds, vocab, mask_prob, mlm, mcr, samples, out) \
        if len(samples) else out


def _reference(words: Flat, concepts: Flat, links, tags: Flat, seeds, vocab, mask_prob, mlm, mcr, samples,
               out: CorruptedBatch) -> CorruptedBatch:
    """``corruption.corrupt_sample`` of ``samples``, written into ``out``'s flat arrays."""
    for b in samples:
        b = int(b)
        ws, cs, ts = (slice(int(f.starts[b]), int(f.starts[b] + f.lengths[b])) for f in (words, concepts, tags))
        got = corruption.corrupt_sample(words.ids[ws], concepts.ids[cs], links[cs], tags.ids[ts],
                                        np.random.Generator(np.random.PCG64(int(seeds[b]))), vocab, mask_prob, mlm, mcr)
        out.words[ws], out.mlm_labels[ws], out.concepts[cs] = got.caption_ids, got.mlm_labels, got.concept_ids
        out.tags[ts], out.mcr_labels[ts] = got.tag_ids, got.mcr_labels
    return out
