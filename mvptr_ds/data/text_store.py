"""The captions and tags of a data directory as ids, made once: a memory-mapped text store.

``convert_text`` (``real_dataset.convert_text``) validates every caption and tag row once, encodes them with
:class:`~mvptr_ds.data.caption_text.CaptionEncoder` (untruncated: every word piece, every concept of the
vocabulary with its links; the limits are applied when read, so one store serves any ``max_seq_length``) and
writes::

    DATA_DIR/text/
      meta.json          {"format", "captions", "images", "sources", "report"}: written last
      captions.npy       int64 [N, 3]   per caption: image (row of images.npy), line and byte offset in the
                                        captions file
      images.npy         int64 [I, 2]   per image: Example.image_id, byte offset of its row in predictions.tsv
      image_keys.npy     bytes [I]      the images' ids, sorted
      word_off.npy       int64 [N+1]    caption i's word pieces: words[word_off[i]:word_off[i + 1]]
      words.npy          int32
      concept_off.npy    int64 [N+1]    caption i's concept ids: concepts[concept_off[i]:concept_off[i + 1]]
      concepts.npy       int32
      link_off.npy       int64 [C+1]    concept j's linked word positions: links[link_off[j]:link_off[j + 1]]
      links.npy          int32
      tag_off.npy        int64 [I+1]    image k's tag word pieces: tags[tag_off[k]:tag_off[k + 1]]
      tags.npy           int32

``sources`` fingerprints what the ids came from (the captions and predictions files: size, modification time and
SHA-256; the tokenizer; the concept vocabulary; the label map): :class:`TextStore` refuses a store made from
other files (a file whose size differs, or whose time differs and then its SHA-256: copying the directory costs a
hash of the two files at each opening, editing one is always seen). Opening maps the arrays and checks their
shapes, offsets and id ranges with array operations (milliseconds per million captions); nothing is parsed or
tokenized.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from collections import Counter
from typing import Dict, List, Optional

import numpy as np

from mvptr_ds.files import atomic_write_json

from .caption_text import CaptionEncoder
from .caption_files import CaptionIndex, example_image_ids
from .readers import DataError, PredictionsReader, read_store_meta

FORMAT = "mvptr_ds.text_store.v1"
def file_fingerprint(path: str) -> dict:
    """Size, modification time and SHA-256 of ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def same_file(path: str, made: Optional[dict]) -> bool:
    """``path`` is the file ``made`` (:func:`file_fingerprint`) describes: the same size, and the same modification
    time or else (a copy, a touched file) the same SHA-256."""
    if not isinstance(made, dict):
        return False
    st = os.stat(path)
    if made.get("size") != st.st_size:
        return False
    return made.get("mtime_ns") == st.st_mtime_ns or made.get("sha256") == file_fingerprint(path)["sha256"]


def encoder_fingerprints(encoder: CaptionEncoder) -> dict:
    """What the ids depend on besides the two files: the tokenizer, the concept vocabulary, the label map."""
    t = encoder._pieces.tokenizer                   # its words and ids, and whether it lower-cases
    tok = json.dumps([sorted(t.get_vocab().items()), getattr(t, "do_lower_case", None)])
    vocab = json.dumps(sorted((i, list(t)) for i, t in encoder.vocab.id_to_tuple.items()))
    labels = file_fingerprint(encoder._labels)["sha256"] if encoder._labels else None
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()      # noqa: E731
    return {"tokenizer": digest(tok), "vocabulary": digest(vocab), "labels": labels}


class _Columns:
    """Growing int arrays (``array``: 4 or 8 bytes an id, not a Python object)."""

    def __init__(self, **codes):
        self.data = {name: array(code) for name, code in codes.items()}
        for name in ("word_off", "concept_off", "link_off", "tag_off"):
            if name in self.data:
                self.data[name].append(0)

    def __getitem__(self, name) -> array:
        return self.data[name]

    def add(self, flat: str, off: str, values) -> None:
        self.data[flat].extend(values)
        self.data[off].append(len(self.data[flat]))


def write_text_store(captions_path: str, predictions_path: str, encoder: CaptionEncoder, out: str,
                     chunk: int = 4096, progress: bool = True) -> dict:
    """Validate, encode and write the text store of ``captions_path`` + ``predictions_path`` into the new folder
    ``out`` (layout: module docstring). Returns a summary. Raises :class:`DataError` naming the file, line and
    field of a bad record, an image without tags, or an ``out`` that exists."""
    from tqdm import tqdm

    if os.path.exists(out):
        raise DataError(out, "exists: delete it to make the text store again, or give another --out", field="out")
    preds = PredictionsReader(predictions_path)                     # validates every row
    cols = _Columns(word_off="q", words="i", concept_off="q", concepts="i", link_off="q", links="i",
                    tag_off="q", tags="i")
    unknown, counts, pending = Counter(), Counter(), []
    bar = tqdm(unit=" captions", disable=not progress, desc="encoding captions")

    def encode(batch):
        for (caption, phrases), (ids, offsets) in zip(batch, encoder._pieces.many([c for c, _ in batch])):
            concept_ids, links = encoder.concepts(caption, phrases, offsets)
            cols.add("words", "word_off", ids)
            for w in links:
                cols.add("links", "link_off", w)
            cols.add("concepts", "concept_off", concept_ids)
        bar.update(len(batch))
        batch.clear()

    def check(line, image_id, caption, phrases):
        if phrases is None:
            counts["captions_to_extract"] += 1
        for t in phrases or ():
            counts["tuples_given"] += 1
            if encoder.vocab.lookup(t) is None:
                unknown[t] += 1
        pending.append((caption, phrases))
        if len(pending) >= chunk:
            encode(pending)

    captions = CaptionIndex(captions_path, check=check)              # validates every record
    encode(pending)
    bar.close()
    if len(captions) == 0:
        raise DataError(captions_path, "no caption records (the file is empty)", field="captions")
    keys = [k.decode("utf-8") for k in captions.image_keys]
    rows = np.array([preds.index.find(k) for k in keys], np.int64)
    if (rows < 0).any():
        k = int(np.argmax(rows < 0))
        first = int(np.argmax(captions.image_of == k))
        raise DataError(captions_path, f"image {keys[k]!r} has no tags in {preds.path}", int(captions.lines[first]),
                        "image_id", "line")
    texts = [CaptionEncoder.tag_text(preds.classes(k)) for k in keys]
    for start in range(0, len(texts), chunk):
        for ids, _ in encoder._pieces.many(texts[start:start + chunk]):
            cols.add("tags", "tag_off", ids)
    image_ints = example_image_ids(keys)
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        arrays = {"captions": np.stack([captions.image_of, captions.lines, captions.offsets], 1).astype(np.int64),
                  "images": np.stack([image_ints, preds.offsets[rows]], 1).astype(np.int64),
                  "image_keys": captions.image_keys}
        arrays.update({name: np.frombuffer(a, np.int64 if a.typecode == "q" else np.int32) if len(a)
                       else np.zeros(0, np.int64 if a.typecode == "q" else np.int32) for name, a in cols.data.items()})
        for name, a in arrays.items():
            np.save(os.path.join(tmp, name + ".npy"), a)
        report = {"captions": len(captions), "images": len(keys), "tuples_given": counts["tuples_given"],
                  "tuples_not_in_vocab": sum(unknown.values()),
                  "not_in_vocab_examples": [list(t) for t, _ in unknown.most_common(10)],
                  "captions_to_extract": counts["captions_to_extract"]}
        sources = dict(encoder_fingerprints(encoder), captions=file_fingerprint(captions_path),
                       predictions=file_fingerprint(predictions_path))
        atomic_write_json(os.path.join(tmp, "meta.json"), {"format": FORMAT, "captions": len(captions),
                                                            "images": len(keys), "sources": sources, "report": report})
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "captions": len(captions), "images": len(keys), "word_pieces": len(cols["words"]),
            "concepts": len(cols["concepts"]), "tag_pieces": len(cols["tags"]), "report": report}


class TextStore:
    """A text store (module docstring), memory-mapped and checked; ``caption(i)`` and ``tags(k)`` give the
    untruncated ids.

    Args:
        path: the store folder.
        sources: what the store must have been made from: :func:`encoder_fingerprints`, and the paths of the
            ``captions`` and ``predictions`` files (compared by :func:`same_file`).
        vocab_size: ids must lie in ``[0, vocab_size)``.
    """

    def __init__(self, path: str, sources: Dict[str, Optional[dict]], vocab_size: int):
        self.path = str(path)
        meta_path = os.path.join(self.path, "meta.json")
        self.meta = read_store_meta(self.path, FORMAT, "text store", "no meta.json: not a text store, or "
                                    "convert_text did not finish (delete the folder and run convert_text again)")
        made = self.meta.get("sources") or {}
        for name, want in sources.items():
            if not (same_file(want, made.get(name)) if name in ("captions", "predictions") else made.get(name) == want):
                raise DataError(meta_path, f"the store was made from another {name} than the one in use (it changed "
                                f"since?): delete {self.path} and run convert_text again", field=f"sources.{name}")
        try:
            n, i = int(self.meta["captions"]), int(self.meta["images"])
        except (KeyError, TypeError, ValueError):
            raise DataError(meta_path, "'captions' and 'images' must be integers", field="captions") from None
        self.report = self.meta.get("report") or {}
        self._map(n, i, vocab_size)
        self._check_rows(n, i)

    def _map(self, n: int, i: int, vocab_size: Optional[int]) -> None:
        """Map the arrays (checking shapes, offsets and, with ``vocab_size``, id ranges)."""
        self.captions = self._array("captions", "i", (n, 3))
        self.images = self._array("images", "i", (i, 2))
        self.image_keys = self._array("image_keys", "S", (i,))
        self.word_off, self.words = self._ragged("word_off", "words", n, vocab_size)
        self.concept_off, self.concepts = self._ragged("concept_off", "concepts", n, vocab_size)
        self.link_off, self.links = self._ragged("link_off", "links", len(self.concepts), None)
        self.tag_off, self.tags_flat = self._ragged("tag_off", "tags", i, vocab_size)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name + ".npy")

    def _array(self, name: str, kind: str, shape) -> np.ndarray:
        try:
            a = np.load(self._file(name), mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DataError(self._file(name), "file not found (an incomplete text store?)", field=name) from None
        except (OSError, ValueError, EOFError) as e:
            raise DataError(self._file(name), f"not a readable .npy array ({e})", field=name) from None
        shape = tuple(a.shape[0] if s is None else s for s in shape)
        if a.dtype.kind != kind or a.shape != shape:
            raise DataError(self._file(name), f"expected {'integers' if kind == 'i' else 'byte strings'} of shape "
                            f"{list(shape)}, got {a.dtype} {list(a.shape)}", field=name)
        return a.view(np.ndarray)           # plain arrays: np.memmap's own indexing costs microseconds a call

    def _ragged(self, off_name: str, flat_name: str, rows: int, vocab_size: Optional[int]):
        off = self._array(off_name, "i", (rows + 1,))
        flat = self._array(flat_name, "i", (None,))
        step = np.diff(off)
        bad = np.flatnonzero(step < 0)
        if off[0] != 0 or len(bad) or off[-1] != len(flat):
            row = int(bad[0]) + 1 if len(bad) else (0 if off[0] != 0 else rows)
            raise DataError(self._file(off_name), f"offsets must start at 0, never decrease and end at {len(flat)} "
                            f"(the length of {flat_name}.npy); offset {int(off[row])} at row {row + 1}", row + 1,
                            off_name)
        hi = vocab_size if vocab_size is not None else 2 ** 31
        wrong = np.flatnonzero((flat < 0) | (flat >= hi))
        if len(wrong):
            k = int(wrong[0])
            raise DataError(self._file(flat_name), f"id {int(flat[k])} outside [0, {hi})", k + 1, flat_name)
        return off, flat

    def _check_rows(self, n: int, i: int) -> None:
        image = self.captions[:, 0]
        wrong = np.flatnonzero((image < 0) | (image >= i))
        if len(wrong):
            raise DataError(self._file("captions"), f"image {int(image[wrong[0]])} outside [0, {i})",
                            int(wrong[0]) + 1, "image")
        if i > 1 and not (self.image_keys[1:] > self.image_keys[:-1]).all():
            k = int(np.argmin(self.image_keys[1:] > self.image_keys[:-1]))
            raise DataError(self._file("image_keys"), "image ids must be sorted and distinct", k + 2, "image_keys")
        # each link points at a word piece of its own caption
        words = np.diff(self.word_off)
        owner = np.repeat(np.repeat(np.arange(n), np.diff(self.concept_off)), np.diff(self.link_off))
        wrong = np.flatnonzero(self.links >= words[owner])
        if len(wrong):
            k = int(wrong[0])
            raise DataError(self._file("links"), f"word position {int(self.links[k])} past the "
                            f"{int(words[owner[k]])} word pieces of caption {int(owner[k]) + 1} (line "
                            f"{int(self.captions[owner[k], 1])} of the captions)", k + 1, "links")

    def __len__(self) -> int:
        return len(self.captions)

    def caption(self, i: int):
        """``(word ids, concept ids, links)`` of caption ``i``, untruncated, as lists."""
        c0, c1 = int(self.concept_off[i]), int(self.concept_off[i + 1])
        lo = self.link_off[c0:c1 + 1].tolist()
        links = self.links[lo[0]:lo[-1]].tolist()
        return (self.words[self.word_off[i]:self.word_off[i + 1]].tolist(), self.concepts[c0:c1].tolist(),
                [links[a - lo[0]:b - lo[0]] for a, b in zip(lo, lo[1:])])

    def tags(self, k: int) -> List[int]:
        """Tag word pieces of image ``k`` (row of ``image_keys``), untruncated."""
        return self.tags_flat[self.tag_off[k]:self.tag_off[k + 1]].tolist()

    _ARRAYS = ("captions", "images", "image_keys", "word_off", "words", "concept_off", "concepts", "link_off",
               "links", "tag_off", "tags_flat")

    def __getstate__(self):                 # pickled (spawned workers): the path, not the arrays
        return {k: v for k, v in self.__dict__.items() if k not in self._ARRAYS}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._map(int(self.meta["captions"]), int(self.meta["images"]), None)
