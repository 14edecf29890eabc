"""The benchmark's default data: the built-in scene world re-cut to the lengths of real pre-training data.

The scene world's captions are short (4-14 word pieces) and its tag lists too (1-11 pieces), while the
cost of a step depends on the lengths alone. ``RealisticLengths`` keeps each example's content but draws,
per sample id (seeded, so both benchmark phases and every run see the same data), the lengths of the
issue's realistic setting: captions of 10-25 word pieces, 0-5 concepts, 3-18 tag pieces (5-20 positions
of the visual text stream with [CLS]/[SEP]); regions come from the world drawn with 10-50 per image.
Captions and tag lists are lengthened by repeating their own pieces, shortened by cutting (concept links
to cut words are dropped); concepts are cut to the drawn count.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mvptr_ds.data.pair_joining import example_at
from mvptr_ds.data.types import Example

CAPTION_PIECES = (10, 25)
CONCEPTS = (0, 5)
TAG_PIECES = (3, 18)


def _resize(ids, length: int):
    ids = list(ids) or [0]
    return [ids[i % len(ids)] for i in range(length)]


class RealisticLengths:
    """Indexable dataset over ``dataset`` whose examples have realistic lengths (see module doc)."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Example:
        return self._realistic(self.dataset[i])

    def example_at(self, i: int, epoch: int) -> Example:
        """What the loader asks: the wrapped set's example as epoch ``epoch`` sees it (joined pairs differ)."""
        return self._realistic(example_at(self.dataset, i, epoch))

    def _realistic(self, ex: Example) -> Example:
        rng = np.random.default_rng([self.seed, 11, ex.sample_id])
        words = int(rng.integers(CAPTION_PIECES[0], CAPTION_PIECES[1] + 1))
        concepts = int(rng.integers(CONCEPTS[0], CONCEPTS[1] + 1))
        tags = int(rng.integers(TAG_PIECES[0], TAG_PIECES[1] + 1))
        links = [[w for w in link if w < words] for link in ex.concept_word_links[:concepts]]
        regions = None if ex.concept_regions is None else list(ex.concept_regions[:concepts])
        return dataclasses.replace(ex, caption_ids=_resize(ex.caption_ids, words),
                                   concept_ids=list(ex.concept_ids[:concepts]), concept_word_links=links,
                                   tag_ids=_resize(ex.tag_ids, tags), concept_regions=regions)


def realistic_loader(parts, cfg, info):
    """This rank's loader over ``RealisticLengths`` of ``assembly.build``'s training set (joined pairs included)."""
    from mvptr_ds.data.batching import ResumableLoader

    return ResumableLoader(RealisticLengths(parts.loader.dataset, cfg.train.seed), parts.data.collator,
                           micro_batch=cfg.train.micro_batch, rank=info.rank, world_size=info.world_size,
                           seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                           prefetch_factor=cfg.data.prefetch_factor)
