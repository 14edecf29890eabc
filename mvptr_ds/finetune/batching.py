"""Task examples and batches: an image-text :class:`~mvptr_ds.data.types.Example` plus the task's target.

The text stream carries the task's text (the caption for retrieval, the question for VQA, the hypothesis
for SNLI-VE, the referring expression for RefCOCO); images are the usual tags + regions. For VQA the image's
tag pieces also follow the question's ``[SEP]`` in the text stream, with token type 1, up to
``max_seq_length + max_phrases`` positions in all (the release's README runs VQA with ``--use_b_text``). Targets:

* ``answers``: VQA, ``{answer index: soft score}`` (answers outside the vocabulary are not stored);
* ``label``: SNLI-VE, 0 entailment, 1 neutral, 2 contradiction;
* ``region_iou``: RefCOCO, float ``[num_regions]``, each detected region's IoU with the target box.

:class:`TaskCollator` pads with the pre-training collator (no corruption) and adds the targets, truncated
the way the collator truncates regions. :class:`TaskBatch` offers what the training loop reads from a
batch (``to``, ``size``, ``sample_ids``, ``num_real_tokens``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mvptr_ds.data.batching import BatchContext, Collator, TruncationCounts
from mvptr_ds.data.types import Batch, Example

SNLI_LABELS = ("entailment", "neutral", "contradiction")


@dataclass
class TaskExample:
    example: Example
    answers: Dict[int, float] = field(default_factory=dict)
    label: int = -1
    region_iou: Optional[np.ndarray] = None


@dataclass
class TaskBatch:
    """A padded :class:`Batch` and the targets of its task (None when the task has none of that kind).

    answer_scores ``[B, A]`` float; labels ``[B]`` long; region_iou ``[B, Lr]`` float (0 at padding).
    """

    batch: Batch
    answer_scores: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    region_iou: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        return self.batch.size

    @property
    def sample_ids(self) -> torch.Tensor:
        return self.batch.sample_ids

    def num_real_tokens(self) -> int:
        return self.batch.num_real_tokens()

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "TaskBatch":
        out = {"batch": self.batch.to(device, dtype=dtype)}
        for f in fields(self)[1:]:
            v = getattr(self, f.name)
            out[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return TaskBatch(**out)


class TaskCollator:
    """``collate(task_examples, ctx) -> (TaskBatch, TruncationCounts)``; ``num_answers`` sizes VQA targets."""

    def __init__(self, data_cfg, vocab, task: str, num_answers: int = 0):
        self.base = Collator.from_config(data_cfg, vocab, objectives=())  # clean inputs: nothing is corrupted
        self.text_limit = data_cfg.max_seq_length + data_cfg.max_phrases
        self.task = task
        self.num_answers = num_answers
        self.counters = self.base.counters

    def __call__(self, examples: Sequence[TaskExample], ctx: BatchContext = BatchContext()) -> TaskBatch:
        batch, counts = self.collate(examples, ctx)
        self.counters.add(counts)
        return batch

    def collate(self, examples: Sequence[TaskExample], ctx: BatchContext = BatchContext()
                ) -> Tuple[TaskBatch, TruncationCounts]:
        batch, counts = self.base.collate([t.example for t in examples], ctx)
        b = len(examples)
        if self.task == "vqa":
            batch = tags_in_text(batch, [t.example.tag_ids for t in examples], self.text_limit)
        out = TaskBatch(batch)
        if self.task == "vqa":
            scores = torch.zeros(b, self.num_answers)
            for i, t in enumerate(examples):
                for a, s in t.answers.items():
                    scores[i, a] = s
            out.answer_scores = scores
        elif self.task == "snli_ve":
            out.labels = torch.tensor([t.label for t in examples], dtype=torch.long)
        elif self.task == "refcoco":
            lr = batch.region_mask.shape[1]
            iou = torch.zeros(b, lr)
            for i, t in enumerate(examples):
                n = min(lr, len(t.region_iou))
                iou[i, :n] = torch.from_numpy(np.asarray(t.region_iou[:n], dtype=np.float32))
            out.region_iou = iou
        return out, counts


def tags_in_text(batch: Batch, tags: Sequence[Sequence[int]], limit: int) -> Batch:
    """``batch`` with each row's ``tags`` (word pieces) appended after its text, token type 1, as many as fit in
    ``limit`` text positions; every ``[B, Lt]`` field padded to the new length (tags are never concepts, never
    labelled)."""
    lengths = batch.text_mask.sum(dim=1).tolist()
    kept = [list(t[:max(limit - n, 0)]) for t, n in zip(tags, lengths)]
    lt = max([batch.text_ids.shape[1]] + [n + len(t) for n, t in zip(lengths, kept)])
    grow = lambda x, value: F.pad(x, (0, lt - x.shape[1]), value=value)  # noqa: E731 (B, Lt) -> (B, lt)
    text_ids, text_mask = grow(batch.text_ids, 0), grow(batch.text_mask, False)
    types = torch.zeros_like(text_ids)
    for i, (n, t) in enumerate(zip(lengths, kept)):
        text_ids[i, n:n + len(t)] = torch.tensor(t, dtype=text_ids.dtype)
        text_mask[i, n:n + len(t)] = True
        types[i, n:n + len(t)] = 1
    return dataclasses.replace(
        batch, text_ids=text_ids, text_mask=text_mask, text_type_ids=types,
        phrase_mask=grow(batch.phrase_mask, False), mlm_labels=grow(batch.mlm_labels, -1),
        wpg_pick_positive=grow(batch.wpg_pick_positive, 0.0), wpg_pick_negative=grow(batch.wpg_pick_negative, 0.0),
        phrase_regions=None if batch.phrase_regions is None else grow(batch.phrase_regions, -1))
