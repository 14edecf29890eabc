"""Readers of the downstream tasks' usual files, over a data directory of images in the real formats.

The image side is the pre-training layout (``mvptr_ds.data.real_dataset``): region features
(``features/`` or ``features.tsv``), ``predictions.tsv`` (tags and image sizes), ``id2phrase.json`` and a
tokenizer (``--tokenizer`` or ``DIR/tokenizer``). Task files live in a sub-directory named after the task
(layout in the README, section "Fine-tuning"):

* ``vqa/answers.json``: the answer vocabulary, a JSON list (index = answer id) or ``{"answer": id}``;
  ``vqa/{split}.jsonl`` rows ``{"image_id", "question", "answers": {"answer": soft score}}``, or the
  official VQA v2 pair ``vqa/{split}_questions.json`` (``{"questions": [{"question_id", "image_id",
  "question"}]}``) + ``vqa/{split}_annotations.json`` (``{"annotations": [{"question_id", "answers":
  [{"answer"}, ..]}]}``), whose soft scores are computed with the official formula. In the official pair
  answers outside the vocabulary are simply not targets (as usual); in the JSONL form an unknown answer is
  an error.
* ``snli_ve/{split}.jsonl`` (or ``snli_ve_{split}.jsonl``) rows as released: ``"Flikr30kID"`` (sic; also
  ``"Flickr30kID"``/``"image_id"``; a ``.jpg`` suffix is dropped), ``"sentence2"`` (the hypothesis) and
  ``"gold_label"`` (entailment/neutral/contradiction, or 0/1/2).
* ``refcoco/refs.json`` (the records of ``refs(unc).p``, which is also read: plain data only, nothing in
  it is executed) with ``ref_id``, ``ann_id``, ``image_id``, ``split``, ``sentences: [{"sent"}]`` and
  ``refcoco/instances.json`` (COCO: ``images`` with ``id``/``width``/``height``, ``annotations`` with ``id``
  and ``bbox`` ``[x, y, w, h]`` in pixels). Every sentence is one example.

Bad rows raise :class:`~mvptr_ds.data.readers.DataError` naming the file, the row and the field.
"""
from __future__ import annotations

import json
import math
import os
import pickle
from typing import Dict, List, Tuple

import numpy as np
import torch

from mvptr_ds.data.caption_text import CaptionEncoder
from mvptr_ds.data.feature_store import open_feature_store
from mvptr_ds.data.caption_files import read_id2phrase
from mvptr_ds.data.readers import DataError, PredictionsReader, decode_utf8, open_data_file
from mvptr_ds.data.real_dataset import load_tokenizer, real_vocab_info
from mvptr_ds.data.types import Example
from mvptr_ds.finetune.batching import SNLI_LABELS, TaskExample
from mvptr_ds.finetune.metrics import box_iou, vqa_answer_score


class ImageSource:
    """Regions, tags and sizes of a data directory's images, and text -> :class:`Example` for them."""

    def __init__(self, data_dir: str, tokenizer: str, max_seq_length: int = 35, max_phrases: int = 5,
                 max_tag_length: int = 20, max_img_seq_length: int = 50):
        self.data_dir = data_dir
        self.tokenizer = load_tokenizer(tokenizer)
        self.concepts = read_id2phrase(os.path.join(data_dir, "id2phrase.json"))
        self.vocab = real_vocab_info(self.tokenizer, self.concepts)
        self.text = CaptionEncoder(self.tokenizer, self.concepts, max_seq_length, max_phrases, max_tag_length)
        self.features = open_feature_store(data_dir, progress=False)
        self.predictions = PredictionsReader(os.path.join(data_dir, "predictions.tsv"))
        self.max_regions = max_img_seq_length
        self._ints: Dict[str, int] = {}

    def check(self, image_id: str, path: str, row: int, field: str, unit: str = "row") -> None:
        for source, what in ((self.features, "region features"), (self.predictions, "tags")):
            if image_id not in source:
                raise DataError(path, f"image {image_id!r} has no {what} in {source.path}", row, field, unit)

    def image_int(self, image_id: str) -> int:
        return self._ints.setdefault(image_id, len(self._ints))

    def image_size(self, image_id: str) -> Tuple[float, float]:
        """``(image_w, image_h)`` of ``predictions.tsv`` (0 where a value is absent or 0)."""
        rec = self.predictions[image_id]
        size = []
        for key in ("image_w", "image_h"):
            value = rec.get(key) or 0
            if not _positive(value) and value != 0:
                raise DataError(self.predictions.path, f"{key} {value!r} of image {image_id!r} must be a positive "
                                f"number", self.predictions.index.find(image_id) + 1, key)
            size.append(float(value))
        return size[0], size[1]

    def region_boxes(self, image_id: str, width: float, height: float) -> np.ndarray:
        """Pixel boxes ``[n, 4]`` of the kept regions, from the normalised box columns of the features."""
        regions = self.features[image_id][:self.max_regions]
        return regions[:, -6:-2].astype(np.float64) * np.array([width, height, width, height])

    def example(self, text: str, image_id: str, sample_id: int) -> Example:
        ids, concept_ids, links = self.text.caption(text)
        return Example(sample_id=sample_id, image_id=self.image_int(image_id), caption_ids=ids,
                       concept_ids=concept_ids, concept_word_links=links,
                       tag_ids=self.text.tags(self.predictions.classes(image_id)),
                       regions=self.features[image_id][:self.max_regions])


class TaskDataset:
    """``len(ds)``, ``ds[i] -> TaskExample``; records are validated at read time, images loaded on access."""

    def __init__(self, source: ImageSource, records: List[tuple], task: str):
        self.source, self.records, self.task = source, records, task

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> TaskExample:
        image_id, text, target = self.records[i]
        ex = self.source.example(text, image_id, i)
        if self.task == "vqa":
            return TaskExample(ex, answers=dict(target))
        if self.task == "snli_ve":
            return TaskExample(ex, label=int(target))
        box, width, height = target
        regions = torch.from_numpy(self.source.region_boxes(image_id, width, height))
        iou = box_iou(regions, torch.tensor(box, dtype=torch.float64)[None, :]).float().numpy()
        return TaskExample(ex, region_iou=iou)


def _positive(value) -> bool:
    """A finite number > 0 (not a bool, not a string)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _load_json(path: str):
    with open_data_file(path) as f:
        text = decode_utf8(f.read(), path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg})", e.lineno, unit="line") from None


def _jsonl(path: str):
    with open_data_file(path) as f:
        for line_no, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, line_no)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"not valid JSON ({e.msg})", line_no, unit="line") from None
            if not isinstance(rec, dict):
                raise DataError(path, "a record must be a JSON object", line_no, unit="line")
            yield line_no, rec


def _text(rec: dict, keys, path: str, row: int, unit: str = "line") -> str:
    for k in keys:
        if k in rec:
            if not isinstance(rec[k], str) or not rec[k].strip():
                raise DataError(path, "expected a non-empty string", row, k, unit)
            return rec[k]
    raise DataError(path, f"missing (expected one of {', '.join(keys)})", row, keys[0], unit)


def _image_id(rec: dict, keys, path: str, row: int, unit: str = "line") -> str:
    for k in keys:
        if k in rec and isinstance(rec[k], (str, int)) and not isinstance(rec[k], bool):
            value = str(rec[k]).strip()
            return value[:-4] if value.lower().endswith(".jpg") else value
    raise DataError(path, "missing or invalid image id", row, keys[0], unit)


def normalise_answer(answer: str) -> str:
    """Lower case, single spaces, no trailing period (the official evaluation normalises further)."""
    return " ".join(answer.lower().strip().rstrip(".").split())


def read_answers(path: str) -> List[str]:
    data = _load_json(path)
    if isinstance(data, dict):
        for answer, i in data.items():
            if isinstance(i, bool) or not isinstance(i, int):
                raise DataError(path, f"id of answer {answer!r} must be an integer, got {i!r}", field=answer)
        if sorted(data.values()) != list(range(len(data))):
            raise DataError(path, "answer ids must be 0..N-1, each once", field="answers")
        data = sorted(data, key=data.get)
    if not isinstance(data, list) or not data or not all(isinstance(a, str) for a in data):
        raise DataError(path, "expected a non-empty list of answer strings (or {answer: id})", field="answers")
    return [normalise_answer(a) for a in data]


def read_vqa(source: ImageSource, task_dir: str, split: str, answers: List[str]) -> TaskDataset:
    index = {a: i for i, a in enumerate(answers)}
    jsonl = os.path.join(task_dir, f"{split}.jsonl")
    records = []
    if os.path.isfile(jsonl):
        for line, rec in _jsonl(jsonl):
            image_id = _image_id(rec, ("image_id",), jsonl, line)
            question = _text(rec, ("question",), jsonl, line)
            given = rec.get("answers")
            if not isinstance(given, dict):
                raise DataError(jsonl, "expected {answer: soft score}", line, "answers", "line")
            target = {}
            for a, s in given.items():
                if normalise_answer(a) not in index:
                    raise DataError(jsonl, f"unknown answer {a!r} (not in answers.json, {len(answers)} answers)",
                                    line, "answers", "line")
                if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1:
                    raise DataError(jsonl, f"score of {a!r} must be a number in [0, 1], got {s!r}", line,
                                    "answers", "line")
                target[index[normalise_answer(a)]] = float(s)
            source.check(image_id, jsonl, line, "image_id", "line")
            records.append((image_id, question, tuple(target.items())))
        return TaskDataset(source, records, "vqa")
    qpath = os.path.join(task_dir, f"{split}_questions.json")
    apath = os.path.join(task_dir, f"{split}_annotations.json")
    if not os.path.isfile(qpath):
        raise DataError(task_dir, f"no {split}.jsonl and no {split}_questions.json + {split}_annotations.json")
    questions = _load_json(qpath)
    questions = questions.get("questions") if isinstance(questions, dict) else questions
    annotations = _load_json(apath)
    annotations = annotations.get("annotations") if isinstance(annotations, dict) else annotations
    if not isinstance(questions, list):
        raise DataError(qpath, "expected {\"questions\": [...]}", field="questions")
    if not isinstance(annotations, list):
        raise DataError(apath, "expected {\"annotations\": [...]}", field="annotations")
    given: Dict[str, list] = {}
    for row, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "question_id" not in ann:
            raise DataError(apath, "missing question_id", row, "question_id")
        raw = ann.get("answers")
        if not isinstance(raw, list) or not raw or not all(isinstance(a, dict) and isinstance(a.get("answer"), str)
                                                           for a in raw):
            raise DataError(apath, "expected a non-empty list of {\"answer\": str}", row, "answers")
        given[str(ann["question_id"])] = [normalise_answer(a["answer"]) for a in raw]
    for row, q in enumerate(questions):
        if not isinstance(q, dict) or "question_id" not in q:
            raise DataError(qpath, "missing question_id", row, "question_id")
        image_id = _image_id(q, ("image_id",), qpath, row, "row")
        question = _text(q, ("question",), qpath, row, "row")
        said = given.get(str(q["question_id"]))
        if said is None:
            raise DataError(apath, f"no annotation for question_id {q['question_id']} (row {row} of {qpath})",
                            field="question_id")
        target = {index[a]: vqa_answer_score(said.count(a), len(said)) for a in set(said) if a in index}
        source.check(image_id, qpath, row, "image_id")
        records.append((image_id, question, tuple(target.items())))
    return TaskDataset(source, records, "vqa")


def read_snli_ve(source: ImageSource, task_dir: str, split: str) -> TaskDataset:
    path = next((p for p in (os.path.join(task_dir, f"{split}.jsonl"), os.path.join(task_dir, f"snli_ve_{split}.jsonl"))
                 if os.path.isfile(p)), None)
    if path is None:
        raise DataError(task_dir, f"no {split}.jsonl or snli_ve_{split}.jsonl")
    records = []
    for line, rec in _jsonl(path):
        image_id = _image_id(rec, ("Flikr30kID", "Flickr30kID", "image_id"), path, line)
        hypothesis = _text(rec, ("sentence2", "hypothesis"), path, line)
        label = rec.get("gold_label")
        if isinstance(label, str) and label in SNLI_LABELS:
            label = SNLI_LABELS.index(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(SNLI_LABELS):
            raise DataError(path, f"label {rec.get('gold_label')!r} is out of range: expected one of "
                            f"{', '.join(SNLI_LABELS)} or 0..2", line, "gold_label", "line")
        source.check(image_id, path, line, "Flikr30kID", "line")
        records.append((image_id, hypothesis, label))
    return TaskDataset(source, records, "snli_ve")


class _PlainData(pickle.Unpickler):
    """Unpickles plain data only (lists, dicts, strings, numbers): any class or function is refused."""

    def find_class(self, module, name):
        raise DataError(self.path, f"holds a reference to {module}.{name}; only plain data is read", field="refs")


def _read_refs(task_dir: str) -> Tuple[str, list]:
    path = os.path.join(task_dir, "refs.json")
    if os.path.isfile(path):
        return path, _load_json(path)
    path = os.path.join(task_dir, "refs(unc).p")
    if not os.path.isfile(path):
        raise DataError(task_dir, "no refs.json or refs(unc).p")
    with open_data_file(path) as f:
        reader = _PlainData(f)
        reader.path = path
        try:
            return path, reader.load()
        except DataError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                OverflowError, UnicodeDecodeError) as e:  # what a cut or damaged pickle raises
            raise DataError(path, f"not a readable pickle (truncated or corrupted? {type(e).__name__}: {e})",
                            field="refs") from None


def read_refcoco(source: ImageSource, task_dir: str, split: str) -> TaskDataset:
    rpath, refs = _read_refs(task_dir)
    ipath = os.path.join(task_dir, "instances.json")
    inst = _load_json(ipath)
    if not isinstance(refs, list):
        raise DataError(rpath, "expected a list of refs", field="refs")
    if not isinstance(inst, dict) or not isinstance(inst.get("annotations"), list):
        raise DataError(ipath, "expected a COCO instances file with 'annotations'", field="annotations")
    images = inst.get("images", [])
    if not isinstance(images, list):
        raise DataError(ipath, "'images' must be a list", field="images")
    sizes = {}
    for row, im in enumerate(images):
        if not isinstance(im, dict):
            raise DataError(ipath, "an image must be an object", row, "images")
        for key in ("width", "height"):
            if im.get(key) is not None and not _positive(im[key]):
                raise DataError(ipath, f"{key} of image {im.get('id')!r} must be a positive number, got {im[key]!r}",
                                row, key)
        sizes[str(im.get("id"))] = (im.get("width"), im.get("height"))
    anns = {}
    for row, a in enumerate(inst["annotations"]):
        if not isinstance(a, dict):
            raise DataError(ipath, "an annotation must be an object", row, "annotations")
        if isinstance(a.get("id"), bool) or not isinstance(a.get("id"), (int, str)):
            raise DataError(ipath, f"annotation id {a.get('id')!r} must be an integer or a string", row, "id")
        anns[a["id"]] = (row, a)
    records = []
    for row, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise DataError(rpath, "a ref must be an object", row, "ref")
        if ref.get("split") != split:
            continue
        image_id = _image_id(ref, ("image_id",), rpath, row, "row")
        if not isinstance(ref.get("ann_id"), (int, str)) or ref.get("ann_id") not in anns:
            raise DataError(rpath, f"ann_id {ref.get('ann_id')!r} is not in {ipath}", row, "ann_id")
        arow, ann = anns[ref["ann_id"]]
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise DataError(ipath, f"expected [x, y, w, h] of four finite numbers, got {box!r}", arow, "bbox")
        width, height = sizes.get(image_id, (None, None))
        if not width or not height:
            width, height = source.image_size(image_id) if image_id in source.predictions else (0, 0)
        if not width or not height:
            raise DataError(ipath, f"no width/height for image {image_id!r} (in 'images' or predictions.tsv)",
                            arow, "image_id")
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width + 1 or y + h > height + 1:
            raise DataError(ipath, f"box {box} is empty or outside the image ({width} x {height})", arow, "bbox")
        sentences = ref.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise DataError(rpath, "expected a non-empty list of {\"sent\": str}", row, "sentences")
        source.check(image_id, rpath, row, "image_id")
        for s in sentences:
            text = _text(s if isinstance(s, dict) else {}, ("sent", "raw"), rpath, row, "row")
            records.append((image_id, text, ((x, y, x + w, y + h), width, height)))
    return TaskDataset(source, records, "refcoco")
