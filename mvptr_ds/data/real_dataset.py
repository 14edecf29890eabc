"""Examples from a directory of real data (VinVL features, detector tags, captions, concept vocabulary).

Directory layout::

    DATA_DIR/
      features/             a converted store (``convert_features``; preferred), or
      features.tsv          VinVL rows ``image_id \\t num_boxes \\t base64 float32[num_boxes x 2054]``
      features.lineidx      byte offset of each row (built next to the TSV when missing)
      imageid2idx.json      optional ``{image_id: row}``
      predictions.tsv       detector tags: ``image_id \\t {"objects": [{"class", "rect", "conf"}, ..], ..}``
                            (``"gt_objects"`` in the same form, when present, give the tags instead)
      captions.jsonl        ``{"image_id", "caption", "phrases"?: [[elem, ...], ..]}`` per line
                            (or captions.json, a JSON list); extra keys (e.g. "split") are ignored
      id2phrase.json        concept vocabulary ``{"id": [elem, ...]}``

Opening validates everything once (every caption record, every tag row, that every caption's image has
features and tags) and keeps only compact numpy indices; ``dataset[i]`` reads caption ``i`` and its
image lazily, so each rank can address its own samples without holding the corpus as Python objects.
Tuples given in ``phrases`` that are not in the vocabulary are counted in ``dataset.report`` (not an
error); captions without ``phrases`` get theirs from :func:`~mvptr_ds.data.concepts.extract_with_words`.
Text becomes ids in :class:`~mvptr_ds.data.caption_text.CaptionEncoder`; the tags are
``PredictionsReader.classes`` (ground-truth objects when a row has them, each name once).

Image ids are strings in the files; ``Example.image_id`` is ``int(image_id)`` when every image id of the
captions is a decimal integer (COCO, Flickr30k), else the image's rank among the sorted distinct ids
(``dataset.image_key(n)`` gives the string back).
"""
from __future__ import annotations

import inspect
import logging
import os
from collections import Counter
from typing import Optional, Union

import numpy as np

from .caption_text import CaptionEncoder
from .feature_store import open_feature_store
from .readers import CaptionIndex, ConceptVocab, DataError, PredictionsReader, read_id2phrase
from .types import Example
from .vocab import VocabInfo

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    """A local Hugging Face tokenizer directory (no hub access); a bare ``vocab.txt`` directory is read
    as a lower-casing BERT word-piece tokenizer."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        vocab = os.path.join(path, "vocab.txt")
        if not os.path.isfile(vocab):
            raise DataError(path, f"cannot load a tokenizer from this directory ({e})", field="tokenizer") from e
        if "vocab" in inspect.signature(transformers.BertTokenizer.__init__).parameters:   # transformers 5
            with open(vocab, "r", encoding="utf-8") as f:
                table = {line.rstrip("\n"): i for i, line in enumerate(f)}
            return transformers.BertTokenizer(vocab=table, do_lower_case=True)
        return transformers.BertTokenizerFast(vocab_file=vocab, do_lower_case=True)


def real_vocab_info(tokenizer, id2phrase: Union[str, ConceptVocab]) -> VocabInfo:
    """The embedding-table layout of a tokenizer + concept vocabulary.

    ``only_word_size`` = tokenizer vocabulary size; ``vocab_size`` = max(id) + 1 over words and concepts;
    ``concept_range`` = [lowest concept id >= only_word_size, vocab_size); ``word_range`` starts after the
    last bracketed special/unused token (999 for BERT uncased). Raises :class:`DataError` when a
    multi-element concept id falls inside the word range (a vocabulary built for another tokenizer).
    """
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    cv = read_id2phrase(id2phrase) if isinstance(id2phrase, str) else id2phrase
    words = tok.get_vocab()
    only = max(words.values()) + 1
    for cid, t in cv.id_to_tuple.items():
        if len(t) > 1 and cid < only:
            raise DataError(cv.path, f"tuple {list(t)} has id {cid}, inside the tokenizer's word ids "
                            f"(< {only}): vocabulary and tokenizer do not match", field=str(cid))
    above = [i for i in cv.id_to_tuple if i >= only]
    vocab_size = max(only, cv.max_id() + 1)
    special = [i for w, i in words.items() if w.startswith("[") and w.endswith("]")]
    first_word = max(special) + 1 if special else 0
    first_word = first_word if first_word < only else 0
    return VocabInfo(vocab_size=vocab_size, only_word_size=only, pad_id=tok.pad_token_id,
                     cls_id=tok.cls_token_id, sep_id=tok.sep_token_id, mask_id=tok.mask_token_id,
                     concept_range=(min(above) if above else vocab_size, vocab_size),
                     word_range=(first_word, only))


def _caption_file(data_dir: str) -> str:
    for name in ("captions.jsonl", "captions.json"):
        if os.path.isfile(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    raise DataError(data_dir, "no captions.jsonl or captions.json", field="captions")


class RealDataset:
    """``len(ds)``, ``ds[i] -> Example`` over a data directory (layout: module docstring).

    Args:
        data_dir: the directory.
        tokenizer: a local Hugging Face tokenizer directory or a tokenizer object.
        vocab: ``id2phrase.json`` path or a :class:`ConceptVocab` (default ``data_dir/id2phrase.json``).
        max_seq_length: caption word pieces kept, [CLS]/[SEP] included (so ``- 2`` pieces).
        max_phrases: concept slots beyond the caption's (``caption_text.CaptionEncoder``: a short caption
            leaves more).
        max_tag_length: tag word pieces kept, [CLS]/[SEP] included.
        max_img_seq_length: regions kept (the first ones, VinVL's order).
        labels: optional detector label map JSON to widen the extraction lexicon.
    """

    def __init__(self, data_dir: str, tokenizer, vocab: Union[str, ConceptVocab, None] = None,
                 max_seq_length: int = 35, max_phrases: int = 5, max_tag_length: int = 20,
                 max_img_seq_length: int = 50, labels: Optional[str] = None, progress: bool = False):
        self.data_dir = str(data_dir)
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        vocab = os.path.join(self.data_dir, "id2phrase.json") if vocab is None else vocab
        self.vocab = read_id2phrase(vocab) if isinstance(vocab, str) else vocab
        self.text = CaptionEncoder(self.tokenizer, self.vocab, max_seq_length, max_phrases, max_tag_length, labels)
        self.vocab_info = real_vocab_info(self.tokenizer, self.vocab)
        self.max_seq_length, self.max_phrases = max_seq_length, max_phrases
        self.max_tag_length, self.max_img_seq_length = max_tag_length, max_img_seq_length
        self.features = open_feature_store(self.data_dir, progress=progress)
        self.predictions = PredictionsReader(os.path.join(self.data_dir, "predictions.tsv"))
        unknown: Counter = Counter()
        counts = Counter()

        def check(line, image_id, caption, phrases):
            if phrases is None:
                counts["captions_to_extract"] += 1
                return
            for t in phrases:
                counts["tuples_given"] += 1
                if self.vocab.lookup(t) is None:
                    unknown[t] += 1

        self.captions = CaptionIndex(_caption_file(self.data_dir), check=check)
        if len(self.captions) == 0:
            raise DataError(self.captions.path, "no caption records (the file is empty)", field="captions")
        keys = [k.decode("utf-8") for k in self.captions.image_keys]
        for k, image_id in enumerate(keys):
            for source, what in ((self.features, "region features"), (self.predictions, "tags")):
                if image_id not in source:
                    first = int(np.argmax(self.captions.image_of == k))
                    raise DataError(self.captions.path, f"image {image_id!r} has no {what} in {source.path}",
                                    int(self.captions.lines[first]), "image_id", "line")
        numeric = all(k.isdigit() for k in keys)
        self._image_ints = np.asarray([int(k) for k in keys] if numeric else range(len(keys)), dtype=np.int64)
        self.report = {"captions": len(self.captions), "images": len(keys),
                       "tuples_given": counts["tuples_given"], "tuples_not_in_vocab": sum(unknown.values()),
                       "not_in_vocab_examples": [list(t) for t, _ in unknown.most_common(10)],
                       "captions_to_extract": counts["captions_to_extract"]}
        if unknown:
            log.warning("%s: %d of %d given tuples are not in %s (e.g. %s); they are left out",
                        self.captions.path, sum(unknown.values()), counts["tuples_given"], self.vocab.path,
                        self.report["not_in_vocab_examples"][:3])

    def __len__(self) -> int:
        return len(self.captions)

    def image_key(self, image_int: int) -> str:
        """The file's image id of ``Example.image_id``."""
        k = int(np.searchsorted(self._image_ints, image_int))
        return self.captions.image_keys[k].decode("utf-8")

    def _region_feats(self, image_id: str):
        """As stored: fp16 from a converted store (the batch stays fp16 and is converted on the device, no
        host fp32 copy); float32 from the TSV path."""
        f = self.features
        return f.raw(image_id) if hasattr(f, "raw") else f[image_id]

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} captions")
        i = i % len(self)
        image_id, caption, phrases = self.captions[i]
        ids, concept_ids, links = self.text.caption(caption, phrases)
        tags = self.text.tags(self.predictions.classes(image_id))
        regions = self._region_feats(image_id)[:self.max_img_seq_length]         # [n, 2054] as stored
        return Example(sample_id=i, image_id=int(self._image_ints[self.captions.image_of[i]]),
                       caption_ids=ids, concept_ids=concept_ids, concept_word_links=links,
                       tag_ids=tags, regions=regions)
