"""Input corruption for MLM, MCR and concepts, and the per-batch draws of ITM/WPG (MVPTR.md section 3).

Pure functions of their inputs and an explicit ``torch.Generator``; nothing here touches the global RNG.
The loader seeds one generator per sample from ``(seed, epoch, sample_id)`` (:func:`sample_generator`), so a
sample's corruption does not depend on the batch it lands in or the world size, and one generator per batch
from ``(seed, epoch, position, rank)`` (:func:`batch_generator`) for the WPG negatives and picks.

* Word pieces (caption words for MLM, tag words for MCR): each selected with probability ``mask_prob``;
  a selected piece becomes ``[MASK]`` (80%), a random word id from ``VocabInfo.random_word_range`` (10%), or
  stays (10%); its label is the original id, every other label is -1.
* Concepts: a concept linked to a selected caption word is always ``[MASK]`` (the word must not leak
  through it); every other concept is selected with probability ``mask_prob`` and becomes ``[MASK]`` (80%),
  a random concept id from ``VocabInfo.concept_range`` (10%; kept when that range is empty), or stays
  (10%). Concepts are never predicted, so they get no labels.
* Regions are never corrupted.

The draws are made for every position whether or not it is selected, in a fixed order (selection, kind,
replacement id), so the result is a function of the generator's seed and the input lengths only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

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


def _generator(*values: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(mix_seed(*values))
    return gen


def sample_generator(seed: int, epoch: int, sample_id: int) -> torch.Generator:
    """Generator for one sample's corruption in one epoch."""
    return _generator(1, seed, epoch, sample_id)


def batch_generator(seed: int, epoch: int, position: int, rank: int) -> torch.Generator:
    """Generator for one rank's per-batch draws at global position ``position`` of ``epoch``."""
    return _generator(2, seed, epoch, position, rank)


@dataclass
class MaskedTokens:
    ids: torch.Tensor        # [n] long, after corruption
    labels: torch.Tensor     # [n] long, original id where selected, else -1
    selected: torch.Tensor   # [n] bool


def mask_tokens(ids: torch.Tensor, gen: torch.Generator, mask_prob: float, mask_id: int,
                random_range: Tuple[int, int]) -> MaskedTokens:
    """BERT-style 15% / 80-10-10 corruption of a 1-d sequence of word ids ``[n]``."""
    n = ids.shape[0]
    selected = torch.rand(n, generator=gen) < mask_prob
    kind = torch.rand(n, generator=gen)
    random_ids = torch.randint(random_range[0], random_range[1], (n,), generator=gen)
    out = torch.where(selected & (kind < MASK_FRACTION), torch.full_like(ids, mask_id), ids)
    is_random = selected & (kind >= MASK_FRACTION) & (kind < MASK_FRACTION + RANDOM_FRACTION)
    out = torch.where(is_random, random_ids, out)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return MaskedTokens(out, labels, selected)


def corrupt_concepts(concept_ids: torch.Tensor, links: Sequence[Sequence[int]], word_selected: torch.Tensor,
                     gen: torch.Generator, mask_prob: float, mask_id: int,
                     concept_range: Tuple[int, int]) -> torch.Tensor:
    """Corrupt concept ids ``[k]``; ``links[j]`` are indices into ``word_selected`` ``[n]`` of concept j's words.

    Returns the corrupted ids ``[k]``. Link indices outside ``word_selected`` (words cut by truncation) are
    ignored.
    """
    k = concept_ids.shape[0]
    n = word_selected.shape[0]
    flat = torch.tensor([w for ws in links for w in ws], dtype=torch.long)                # [sum of link counts]
    owner = torch.tensor([j for j, ws in enumerate(links) for _ in ws], dtype=torch.long)  # concept of each link
    valid = (flat >= 0) & (flat < n)
    linked = torch.zeros(k, dtype=torch.bool)
    linked[owner[valid][word_selected[flat[valid]]]] = True
    selected = torch.rand(k, generator=gen) < mask_prob
    kind = torch.rand(k, generator=gen)
    lo, hi = concept_range
    random_ids = torch.randint(lo, hi, (k,), generator=gen) if hi > lo else concept_ids.clone()
    out = torch.where(selected & (kind < MASK_FRACTION), torch.full_like(concept_ids, mask_id), concept_ids)
    is_random = selected & (kind >= MASK_FRACTION) & (kind < MASK_FRACTION + RANDOM_FRACTION)
    out = torch.where(is_random, random_ids, out)
    return torch.where(linked, torch.full_like(concept_ids, mask_id), out)


@dataclass
class CorruptedSample:
    caption_ids: torch.Tensor   # [n] long
    mlm_labels: torch.Tensor    # [n] long (-1: not scored)
    concept_ids: torch.Tensor   # [k] long
    tag_ids: torch.Tensor       # [m] long
    mcr_labels: torch.Tensor    # [m] long (-1: not scored)


def corrupt_sample(caption_ids: torch.Tensor, concept_ids: torch.Tensor, links: Sequence[Sequence[int]],
                   tag_ids: torch.Tensor, gen: torch.Generator, vocab: VocabInfo, mask_prob: float,
                   mlm: bool, mcr: bool) -> CorruptedSample:
    """Corrupt one (already truncated) sample: caption words + concepts when ``mlm``, tag words when ``mcr``.

    Without ``mlm`` the caption and concepts pass through with all labels -1 (retrieval-style inputs);
    without ``mcr`` the tags do. Draw order: caption, concepts, tags.
    """
    if mlm:
        words = mask_tokens(caption_ids, gen, mask_prob, vocab.mask_id, vocab.random_word_range)
        caption_out, mlm_labels = words.ids, words.labels
        concepts_out = corrupt_concepts(concept_ids, links, words.selected, gen, mask_prob, vocab.mask_id,
                                        vocab.concept_range)
    else:
        caption_out, mlm_labels = caption_ids, torch.full_like(caption_ids, IGNORE)
        concepts_out = concept_ids
    if mcr:
        tags = mask_tokens(tag_ids, gen, mask_prob, vocab.mask_id, vocab.random_word_range)
        tags_out, mcr_labels = tags.ids, tags.labels
    else:
        tags_out, mcr_labels = tag_ids, torch.full_like(tag_ids, IGNORE)
    return CorruptedSample(caption_out, mlm_labels, concepts_out, tags_out, mcr_labels)


def wpg_negatives(image_ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each pair ``i`` of ``image_ids`` ``[B]``, a uniformly random in-batch index ``j`` whose image differs.

    Returns ``[B]`` long, -1 where every pair of the batch shows the same image as ``i``.
    """
    b = image_ids.shape[0]
    other = image_ids[:, None] != image_ids[None, :]            # [B, B]
    score = torch.where(other, torch.rand((b, b), generator=gen), torch.full((b, b), -1.0))
    best = score.argmax(dim=1) if b else torch.zeros(0, dtype=torch.long)
    return torch.where(other.any(dim=1), best, torch.full_like(best, -1))


def wpg_picks(batch_size: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform ``[0, 1)`` draws ``[B, L]``: which of a phrase's top-k regions WPG takes."""
    return torch.rand((batch_size, length), generator=gen)
