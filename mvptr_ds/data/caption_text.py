"""Text of the real formats -> the ids of an :class:`~mvptr_ds.data.types.Example`: the one place where a caption
(or a question, a hypothesis, a referring expression) and an image's tag names become word pieces and concepts,
for pre-training (:class:`~mvptr_ds.data.real_dataset.RealDataset`) and the downstream tasks
(:class:`~mvptr_ds.finetune.readers.ImageSource`).

As the release (``oscar_tsv4.py``, ``run_retrieval.py``): caption word pieces up to ``max_seq_length - 2``;
concepts, in the order given (or extracted), up to the slots the caption leaves free,
``max_phrases + max_seq_length - 2 - words``; tag pieces up to ``max_tag_length - 2``. Each concept is linked to
the word pieces of the caption words it came from (corrupting a word masks the concepts linked to it).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

from .concepts import build_lexicon, extract_with_words, lemma_candidates, tokenize
from .caption_files import ConceptVocab


@functools.lru_cache(maxsize=1 << 16)
def _lemma_set(word: str) -> frozenset:
    """:func:`lemma_candidates` as a set, cached (captions repeat a small vocabulary)."""
    return frozenset(lemma_candidates(word))


class _Pieces:
    """``pieces(text, limit) -> (ids, offsets)``: word pieces of ``text`` without [CLS]/[SEP], the first ``limit``.

    Calls a private copy of a fast tokenizer's Rust backend (no truncation or padding set on it), about half
    the time of the tokenizer's Python ``__call__`` per text; the same ids and character offsets. Other
    tokenizers go through ``__call__``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = None
        if backend is not None:
            from tokenizers import Tokenizer
            self.backend = Tokenizer.from_str(backend.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()

    def __call__(self, text: str, limit: Optional[int]):
        """``limit`` None: every piece."""
        if self.backend is not None:
            enc = self.backend.encode(text, add_special_tokens=False)
            return enc.ids[:limit], enc.offsets[:limit]
        enc = self.tokenizer(text, add_special_tokens=False, truncation=limit is not None,
                             max_length=None if limit is None else max(limit, 1), return_offsets_mapping=True)
        return list(enc["input_ids"])[:limit], list(enc["offset_mapping"])[:limit]

    def many(self, texts: Sequence[str]) -> List[Tuple[List[int], List[Tuple[int, int]]]]:
        """Every piece of each text, ``[(ids, offsets), ...]`` (the Rust backend encodes them in parallel)."""
        if self.backend is not None:
            return [(enc.ids, enc.offsets) for enc in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self(t, None) for t in texts]


def _pieces_in(offsets, spans) -> List[int]:
    """Indices of the word pieces (character ``offsets``, ``(start, end)``) overlapping any of ``spans``."""
    out = []
    for p, (s, e) in enumerate(offsets):
        if e > s:
            for ws, we in spans:
                if s < we and e > ws:
                    out.append(p)
                    break
    return out


class CaptionEncoder:
    """``caption(text, phrases) -> (word ids, concept ids, links)`` and ``tags(classes) -> word ids``.

    Args:
        tokenizer: a Hugging Face tokenizer (BERT uncased for the released vocabulary).
        vocab: the concept vocabulary.
        max_seq_length, max_phrases, max_tag_length: the data limits (``DataConfig``).
        labels: optional detector label map JSON to widen the extraction lexicon.
    """

    def __init__(self, tokenizer, vocab: ConceptVocab, max_seq_length: int = 35, max_phrases: int = 5,
                 max_tag_length: int = 20, labels: Optional[str] = None):
        self.vocab = vocab
        self._pieces = _Pieces(tokenizer)
        self.max_words, self.max_phrases = max(max_seq_length - 2, 1), max_phrases
        self.max_tags = max(max_tag_length - 2, 0)
        self._labels, self._lexicon = labels, None

    def _lex(self):
        if self._lexicon is None:
            self._lexicon = build_lexicon(self.vocab, self._labels)
        return self._lexicon

    def _concepts(self, caption: str, phrases) -> List[Tuple[Tuple[str, ...], List[Tuple[int, int]]]]:
        """Tuples with the character spans of the caption words each came from (extracted when ``phrases`` is
        None)."""
        words = tokenize(caption)
        if phrases is None:
            return [(t, [words[i][1:] for i in idx]) for t, idx in extract_with_words(caption, self._lex())]
        lemmas = [_lemma_set(w) for w, _, _ in words]
        out = []
        for t in phrases:
            head = next((k for k, c in enumerate(lemmas) if t[0].split()[-1] in c), None)
            spans = []
            for e, element in enumerate(t):
                for part in element.split():
                    hits = [k for k, c in enumerate(lemmas) if part in c]
                    if hits:  # the occurrence nearest to the tuple's head word (after it on a tie)
                        k = hits[0] if head is None or e == 0 else min(hits, key=lambda k: (abs(k - head), k < head))
                        spans.append(words[k][1:])
            out.append((t, spans))
        return out

    def caption(self, text: str, phrases: Optional[Sequence[Tuple[str, ...]]] = None
                ) -> Tuple[List[int], List[int], List[List[int]]]:
        """Word pieces of ``text``, its concept ids (``phrases`` as given, tuples outside the vocabulary left
        out, or extracted) and each concept's linked word-piece indices."""
        ids, offsets = self._pieces(text, self.max_words)
        concept_ids, links = self.concepts(text, phrases, offsets, self.max_phrases + self.max_words - len(ids))
        return list(ids), concept_ids, links

    def concepts(self, text: str, phrases: Optional[Sequence[Tuple[str, ...]]], offsets,
                 limit: Optional[int] = None) -> Tuple[List[int], List[List[int]]]:
        """The first ``limit`` (None: all) concepts of ``text`` in the vocabulary and their links to the word pieces
        whose character ``offsets`` are given."""
        concept_ids, links = [], []
        for t, spans in self._concepts(text, phrases):
            if limit is not None and len(concept_ids) >= limit:
                break
            cid = self.vocab.lookup(t)
            if cid is not None:
                concept_ids.append(cid)
                links.append(_pieces_in(offsets, spans))
        return concept_ids, links

    def truncate(self, ids: Sequence[int], concept_ids: Sequence[int], links: Sequence[Sequence[int]]
                 ) -> Tuple[List[int], List[int], List[List[int]]]:
        """What :meth:`caption` gives, from the untruncated encoding (every piece, every concept with its links):
        the first pieces, the concepts that fit the slots they leave, links to kept pieces only."""
        ids = list(ids[:self.max_words])
        n, slots = len(ids), self.max_phrases + self.max_words - len(ids)
        return ids, list(concept_ids[:slots]), [[p for p in w if p < n] for w in links[:slots]]

    def tags(self, classes: Sequence[str]) -> List[int]:
        """Word pieces of an image's tag names (``PredictionsReader.classes``), the first ``max_tag_length - 2``."""
        return list(self._pieces(self.tag_text(classes), self.max_tags)[0]) if classes else []

    @staticmethod
    def tag_text(classes: Sequence[str]) -> str:
        """The text whose word pieces are an image's tags."""
        return " ".join(classes)
