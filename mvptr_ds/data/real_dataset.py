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
      text/                 optional: the captions and tags as ids (``convert_text``; :mod:`.text_store`)

Without ``text/``, opening validates everything (every caption record, every tag row, that every caption's
image has features and tags) and keeps only compact numpy indices; ``dataset[i]`` reads caption ``i`` and its
image's tags lazily and tokenizes them, so each rank can address its own samples without holding the corpus as
Python objects. With ``text/`` (validated when it was made) opening maps its arrays, checks that it was made
from these files and that every image has features, and re-encodes a few captions to check the store against
the tokenizer, vocabulary and encoder in use; ``dataset[i]`` then only slices arrays.
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
import json
import logging
import os
from collections import Counter
from typing import Optional, Union

import numpy as np

from .caption_text import CaptionEncoder
from .feature_store import FeatureStore, open_feature_store
from .caption_files import CaptionIndex, ConceptVocab, example_image_ids, read_id2phrase, validate_caption
from .readers import DataError, PredictionsReader, read_json_no_dup, row_classes
from .text_store import TextStore, encoder_fingerprints, write_text_store
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
        self.store: Optional[TextStore] = None
        text_dir = os.path.join(self.data_dir, "text")
        if os.path.exists(text_dir):
            self._open_store(text_dir)
        else:
            self._open_files()
        unknown = self.report["tuples_not_in_vocab"]
        if unknown:
            log.warning("%s: %d of %d given tuples are not in %s (e.g. %s); they are left out",
                        _caption_file(self.data_dir), unknown, self.report["tuples_given"], self.vocab.path,
                        self.report["not_in_vocab_examples"][:3])

    def _keys(self):
        return [k.decode("utf-8") for k in self._image_keys]

    def _open_files(self) -> None:
        """Validate the caption and tag files (every record) and index them."""
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
        self._image_keys, self._image_of, self._lines = (self.captions.image_keys, self.captions.image_of,
                                                         self.captions.lines)
        for k, image_id in enumerate(self._keys()):
            if image_id not in self.predictions:
                self._missing(k, "tags", self.predictions.path)
        self._locate_features()
        self._image_ints = example_image_ids(self._keys())
        self.report = {"captions": len(self.captions), "images": len(self._image_keys),
                       "tuples_given": counts["tuples_given"], "tuples_not_in_vocab": sum(unknown.values()),
                       "not_in_vocab_examples": [list(t) for t, _ in unknown.most_common(10)],
                       "captions_to_extract": counts["captions_to_extract"]}

    def _open_store(self, path: str) -> None:
        """Map the text store; check its sources, that every image has features, and a few of its encodings."""
        captions, predictions = _caption_file(self.data_dir), os.path.join(self.data_dir, "predictions.tsv")
        sources = dict(encoder_fingerprints(self.text), captions=captions, predictions=predictions)
        self.store = TextStore(path, sources, self.vocab_info.vocab_size)
        self.report = dict(self.store.report)
        self.__setstate__({})                               # the indices are the store's arrays
        self._spot_check(captions, predictions)

    def _missing(self, k: int, what: str, where: str):
        first = int(np.argmax(self._image_of == k))
        raise DataError(_caption_file(self.data_dir), f"image {self._image_keys[k].decode()!r} has no {what} in "
                        f"{where}", int(self._lines[first]), "image_id", "line")

    def _locate_features(self) -> None:
        """Every image has region features; a converted store's positions are kept (no search per sample)."""
        f = self.features
        if isinstance(f, FeatureStore):
            self._feature_pos = f.locate(self._image_keys)
            absent = np.flatnonzero(self._feature_pos < 0)
        else:
            self._feature_pos = None
            absent = [k for k, image_id in enumerate(self._keys()) if image_id not in f]
        if len(absent):
            self._missing(int(absent[0]), "region features", f.path)

    def _spot_check(self, captions: str, predictions: str, count: int = 8) -> None:
        """Re-encode ``count`` captions spread over the store (and their images' tags) and compare: a store made
        by another version of the encoder, or with another tokenizer or vocabulary, is an error."""
        n = len(self.store)
        rows = sorted(set(np.linspace(0, n - 1, min(count, n)).astype(int).tolist()))
        records = _read_captions(captions, [(int(self.store.captions[i, 1]), int(self.store.captions[i, 2]))
                                            for i in rows])
        with open(predictions, "rb") as pf:
            for i, (image_id, caption, phrases) in zip(rows, records):
                ids, offsets = self.text._pieces(caption, None)
                concepts, links = self.text.concepts(caption, phrases, offsets)
                k = int(self._image_of[i])
                pf.seek(int(self.store.images[k, 1]))
                tags = list(self.text._pieces(self.text.tag_text(row_classes(pf.readline())), None)[0])
                if (image_id.encode("utf-8") != self._image_keys[k] or (list(ids), concepts, links)
                        != self.store.caption(i) or tags != self.store.tags(k)):
                    raise DataError(os.path.join(self.store.path, "meta.json"), f"the caption at line "
                                    f"{int(self._lines[i])} of {captions} (or its image's tags) encodes differently "
                                    "now (the store was made by another version or with another tokenizer or "
                                    f"vocabulary?): delete {self.store.path} and run convert_text again",
                                    field="encoding")

    def __len__(self) -> int:
        return len(self._image_of)

    _FROM_STORE = ("_image_keys", "_image_of", "_lines", "_image_ints", "_feature_pos")

    def __getstate__(self):     # pickled (spawned workers): the store's arrays are mapped again, not copied
        if self.store is None:
            return dict(self.__dict__)
        return {k: v for k, v in self.__dict__.items() if k not in self._FROM_STORE}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.store is not None:
            self._image_keys, self._image_of = self.store.image_keys, self.store.captions[:, 0]
            self._lines, self._image_ints = self.store.captions[:, 1], self.store.images[:, 0]
            self._locate_features()

    def image_key(self, image_int: int) -> str:
        """The file's image id of ``Example.image_id`` (ids sort as strings, "10" before "2": searched in numeric
        order)."""
        order = np.argsort(self._image_ints, kind="stable")
        k = int(order[min(int(np.searchsorted(self._image_ints[order], image_int)), len(order) - 1)])
        if self._image_ints[k] != image_int:
            raise KeyError(f"no image has Example.image_id {image_int}")
        return self._image_keys[k].decode("utf-8")

    def caption_image(self, i: int) -> str:
        """The file's image id of caption ``i``."""
        return self._image_keys[self._image_of[i]].decode("utf-8")

    def _regions(self, k: int) -> np.ndarray:
        """Image ``k``'s regions as stored: fp16 from a converted store, mapped (the collator copies them into the
        batch, converted on the device: no host fp32 copy); float32 from the TSV path."""
        if self._feature_pos is not None:
            return self.features.view_at(int(self._feature_pos[k]))
        return self.features[self._image_keys[k].decode("utf-8")]

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} captions")
        i = i % len(self)
        k = int(self._image_of[i])
        if self.store is not None:
            ids, concept_ids, links = self.text.truncate(*self.store.caption(i))
            tags = self.store.tags(k)[:self.text.max_tags]
        else:
            image_id, caption, phrases = self.captions[i]
            ids, concept_ids, links = self.text.caption(caption, phrases)
            tags = self.text.tags(self.predictions.classes(image_id))
        return Example(sample_id=i, image_id=int(self._image_ints[k]), caption_ids=ids, concept_ids=concept_ids,
                       concept_word_links=links, tag_ids=tags, regions=self._regions(k)[:self.max_img_seq_length])


def _read_captions(path: str, where) -> list:
    """``(image_id, caption, phrases)`` of the records at ``where`` = ``[(line, byte offset), ...]`` (a JSON list
    file: ``line`` is the record's 1-based position)."""
    with open(path, "rb") as f:
        if f.read(4096).lstrip().startswith(b"["):
            data = read_json_no_dup(path)
            return [validate_caption(data[line - 1], path, line) for line, _ in where]
        out = []
        for line, offset in where:
            f.seek(offset)
            try:
                rec = json.loads(f.readline())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(path, f"malformed JSON ({e}; changed since the text store was made?)", line, "json",
                                "line") from None
            out.append(validate_caption(rec, path, line))
        return out


def convert_text(data_dir: str, tokenizer: Optional[str] = None, labels: Optional[str] = None,
                 out: Optional[str] = None, progress: bool = True) -> dict:
    """Write the text store of a data directory (``DIR/text`` unless ``out``): every caption and tag row
    validated and encoded once (:func:`~mvptr_ds.data.text_store.write_text_store`)."""
    data_dir = str(data_dir)
    tok = load_tokenizer(tokenizer or os.path.join(data_dir, "tokenizer"))
    encoder = CaptionEncoder(tok, read_id2phrase(os.path.join(data_dir, "id2phrase.json")), labels=labels)
    return write_text_store(_caption_file(data_dir), os.path.join(data_dir, "predictions.tsv"), encoder,
                            out or os.path.join(data_dir, "text"), progress=progress)
