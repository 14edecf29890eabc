"""``--join_pairs P``: training pairs joined at random into two-image pairs (MixGen's text concatenation, Hao et
al. 2022, with region sets in place of pixels).

With probability ``P`` the training pair at dataset index i comes back, in epoch e, joined with the pair of
another image: captions, concepts and tags concatenated, the other image's regions appended (concept-word
links and concept regions shifted). The joined caption still describes the joined image, and the images the
model sees are no longer only the corpus's. Whether i is joined in epoch e, and with which pair, is a function
of ``(seed, e, i)`` alone (:func:`~mvptr_ds.data.corruption.join_generator`), so a resumed run, on any number
of ranks, sees the same joined pairs as an uninterrupted one. The joined pair keeps the first pair's sample and
image ids: the first image's other captions still describe it, so they are never its negatives; a batch row
showing the second image still is VSC's (as in MixGen). ITM and WPG would take such a row as a mismatched
image, which it is not, so ``RunConfig`` refuses joining beside them (pre-training with MCR and/or VSC only).

The loader asks :meth:`JoinedPairs.example_at` with the epoch; plain indexing (``ds[i]``) gives the pair
unjoined (evaluation code that indexes a training set sees the corpus as it is).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from mvptr_ds.config_types import ConfigError
from mvptr_ds.data import corruption
from mvptr_ds.data.types import Example

_PARTNER_TRIES = 1000


def join_examples(a: Example, b: Example) -> Example:
    """Pair ``a`` with ``b``'s caption, concepts, tags and regions appended (``a``'s ids)."""
    words, regions = len(a.caption_ids), a.regions.shape[0]
    concept_regions: Optional[list] = None  # unknown on both sides stays unknown; one side unknown: -1 for its own
    if a.concept_regions is not None or b.concept_regions is not None:
        concept_regions = (list(a.concept_regions if a.concept_regions is not None else [-1] * len(a.concept_ids))
                           + [r + regions if r >= 0 else r for r in
                              (b.concept_regions if b.concept_regions is not None else [-1] * len(b.concept_ids))])
    return Example(sample_id=a.sample_id, image_id=a.image_id, caption_ids=list(a.caption_ids) + list(b.caption_ids),
                   concept_ids=list(a.concept_ids) + list(b.concept_ids),
                   concept_word_links=[list(w) for w in a.concept_word_links]
                   + [[k + words for k in w] for w in b.concept_word_links],
                   tag_ids=list(a.tag_ids) + list(b.tag_ids), regions=np.concatenate([a.regions, b.regions]),
                   concept_regions=concept_regions)


class JoinedPairs:
    """The training set with pairs joined at random (module docstring): ``example_at(index, epoch)``."""

    def __init__(self, base, probability: float, seed: int):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"join_pairs: probability {probability!r} is not in [0, 1]")
        self.base, self.probability, self.seed = base, probability, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Example:
        return self.base[index]

    def example_at(self, index: int, epoch: int) -> Example:
        a = self.base[index]
        gen = corruption.join_generator(self.seed, epoch, index)
        if gen.random() >= self.probability:
            return a
        for _ in range(_PARTNER_TRIES):
            b = self.base[int(gen.integers(len(self.base)))]
            if b.image_id != a.image_id:
                return join_examples(a, b)
        raise ConfigError(f"--join_pairs: no pair of an image other than {a.image_id} found in {_PARTNER_TRIES} "
                          "draws (does the training set hold two images?)")


def example_at(dataset, index: int, epoch: int) -> Example:
    """``dataset``'s example ``index`` as epoch ``epoch`` sees it (joined pairs differ by epoch)."""
    at = getattr(dataset, "example_at", None)
    return at(index, epoch) if at is not None else dataset[index]
