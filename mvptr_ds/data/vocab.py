"""Vocabulary layout shared by the data and the model, and a word-level tokenizer for the synthetic world.

One embedding table holds words, object-tag words and concepts (MVPTR.md section 1):

* ids ``< only_word_size`` are word pieces (the MLM/MCR decoders predict over them);
* concept ids live above them; ``concept_range`` is the ``[start, end)`` that random concept
  replacement draws from;
* ``word_range`` is the ``[start, end)`` of the real words: never ``[PAD]``/``[CLS]``/``[SEP]``/``[MASK]``/
  ``[UNK]`` (for BERT uncased that is ``(999, 30522)``, the first real piece after the ``[unusedN]`` block);
  generated samples draw their words from it. (Random word replacement in corruption draws from every word
  piece, ``[0, only_word_size)``, as the release does.)

:class:`WordTokenizer` is the synthetic world's tokenizer: one id per lower-cased whitespace-separated
word, special tokens first (``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``), then the words in the
order given. It has no sub-word splitting; an unknown word becomes ``[UNK]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class VocabInfo:
    """Sizes and special ids of the shared word/concept/tag table.

    ``vocab_size``: rows of the table. ``only_word_size``: ids below it are word pieces; concept ids are
    ``>= only_word_size`` (single-word concepts may reuse word ids in vocabularies that do so, like the
    authors'). ``concept_range``: ``[start, end)`` of random concept replacement. ``word_range``:
    ``[start, end)`` of the real words; ``None`` means ``(max special id + 1, only_word_size)``.
    """

    vocab_size: int
    only_word_size: int
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    concept_range: Tuple[int, int]
    word_range: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        if not 0 < self.only_word_size <= self.vocab_size:
            raise ValueError(f"VocabInfo: only_word_size={self.only_word_size} must be in (0, vocab_size="
                             f"{self.vocab_size}]")
        for name in ("pad_id", "cls_id", "sep_id", "mask_id"):
            if not 0 <= getattr(self, name) < self.only_word_size:
                raise ValueError(f"VocabInfo: {name}={getattr(self, name)} is not a word id "
                                 f"(< only_word_size={self.only_word_size})")
        lo, hi = self.concept_range
        if not 0 <= lo <= hi <= self.vocab_size:
            raise ValueError(f"VocabInfo: concept_range={self.concept_range} is not inside [0, {self.vocab_size})")
        wlo, whi = self.real_word_range
        if not 0 <= wlo < whi <= self.only_word_size:
            raise ValueError(f"VocabInfo: word_range={self.real_word_range} is empty or not inside "
                             f"[0, only_word_size={self.only_word_size})")

    @property
    def real_word_range(self) -> Tuple[int, int]:
        """``[start, end)`` of the real words (no special or unused tokens)."""
        if self.word_range is not None:
            return tuple(self.word_range)
        return (max(self.pad_id, self.cls_id, self.sep_id, self.mask_id) + 1, self.only_word_size)

    @property
    def num_concepts(self) -> int:
        return self.concept_range[1] - self.concept_range[0]


class WordTokenizer:
    """Word-level tokenizer: ``encode(text) -> List[int]`` (no [CLS]/[SEP]), ``decode(ids) -> str``.

    Built from a word list; duplicates are ignored after their first occurrence, special tokens come first.
    Text is lower-cased and split on whitespace, so multi-word names ("in front of") are several ids.
    """

    def __init__(self, words: Iterable[str]):
        self._id_to_word: List[str] = list(SPECIAL_TOKENS)
        self._word_to_id: Dict[str, int] = {w: i for i, w in enumerate(SPECIAL_TOKENS)}
        for word in words:
            for w in word.lower().split():
                if w not in self._word_to_id:
                    self._word_to_id[w] = len(self._id_to_word)
                    self._id_to_word.append(w)

    pad_id = property(lambda self: self._word_to_id["[PAD]"])
    unk_id = property(lambda self: self._word_to_id["[UNK]"])
    cls_id = property(lambda self: self._word_to_id["[CLS]"])
    sep_id = property(lambda self: self._word_to_id["[SEP]"])
    mask_id = property(lambda self: self._word_to_id["[MASK]"])

    def __len__(self) -> int:
        return len(self._id_to_word)

    @property
    def words(self) -> List[str]:
        """Every token in id order (specials first)."""
        return list(self._id_to_word)

    def token_to_id(self, word: str) -> int:
        return self._word_to_id.get(word.lower(), self.unk_id)

    def encode(self, text: str) -> List[int]:
        """Word ids of ``text`` (lower-cased, whitespace-split), without [CLS]/[SEP]."""
        return [self._word_to_id.get(w, self.unk_id) for w in text.lower().split()]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Words of ``ids`` joined by spaces; ``skip_special`` drops [PAD]/[CLS]/[SEP] (keeps [MASK]/[UNK])."""
        skip = {self.pad_id, self.cls_id, self.sep_id} if skip_special else set()
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._id_to_word):
                raise ValueError(f"decode: id {i} is outside the word vocabulary (0..{len(self._id_to_word) - 1})")
            if i not in skip:
                out.append(self._id_to_word[i])
        return " ".join(out)
