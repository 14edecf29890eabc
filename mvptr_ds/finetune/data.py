"""Task data for ``finetune``: training and evaluation datasets of one task, vocabulary and collator.

``--data synthetic[:...]`` draws the small tasks of the built-in world (:mod:`mvptr_ds.finetune.synthetic`):
training images train, held-out images evaluate (``--eval_data synthetic:seed=..`` evaluates on another
world's held-out images; it must share the vocabulary, i.e. differ only in ``seed``). A directory is read
with :mod:`mvptr_ds.finetune.readers` (split ``train``; evaluation split ``--eval_split``, default the task's
usual one, from ``--eval_data`` or the same directory). Retrieval on real data trains on the directory's
captions (the pre-training format) and needs ``--eval_data``, a second such directory.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional

from mvptr_ds.config import TASK_EVAL_SPLITS, ConfigError, RunConfig
from mvptr_ds.data.pipeline import build_data, is_synthetic
from mvptr_ds.data.synthetic import SceneWorld, parse_synthetic_source
from mvptr_ds.finetune import readers, synthetic
from mvptr_ds.finetune.batching import TaskCollator, TaskExample


class Wrapped:
    """A dataset of image-caption Examples seen as TaskExamples (retrieval)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> TaskExample:
        return TaskExample(self.dataset[i])


@dataclass
class TaskData:
    """``train``/``eval``: datasets of TaskExample; ``eval_pairs``: the evaluation image-caption Examples
    (retrieval only); ``answers``: the VQA answer vocabulary; ``eval_source``: what is evaluated, in words."""

    task: str
    train: object
    eval: object
    vocab: object
    collator: TaskCollator
    eval_source: str
    answers: List[str] = field(default_factory=list)
    eval_pairs: Optional[object] = None


def _tokenizer(cfg: RunConfig, directory: str) -> str:
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if os.path.isdir(os.path.join(directory, "tokenizer")):
        return os.path.join(directory, "tokenizer")
    raise ConfigError(f"--data {directory}: give --tokenizer or put a tokenizer in {directory}/tokenizer")


def _synthetic(cfg: RunConfig, task: str) -> TaskData:
    world = SceneWorld(parse_synthetic_source(cfg.data.source))
    eval_world, eval_source = world, f"{cfg.data.source} (held-out images)"
    if cfg.eval.eval_data:
        if not is_synthetic(cfg.eval.eval_data):
            raise ConfigError(f"--eval_data {cfg.eval.eval_data}: a synthetic training source evaluates on "
                              f"a synthetic world")
        eval_world = SceneWorld(parse_synthetic_source(cfg.eval.eval_data))
        if eval_world.vocab != world.vocab or eval_world.concepts != world.concepts:
            raise ConfigError(f"--eval_data {cfg.eval.eval_data}: its vocabulary differs from --data "
                              f"{cfg.data.source}'s (change only seed=)")
        eval_source = f"{cfg.eval.eval_data} (held-out images)"
    seed = world.spec.seed
    train = synthetic.task_examples(world, task, "train", seed)
    evaluation = synthetic.task_examples(eval_world, task, "held_out", eval_world.spec.seed)
    answers = synthetic.vqa_answers(world) if task == "vqa" else []
    if len(evaluation) == 0:
        raise ConfigError(f"{eval_source}: no held-out images to evaluate on (held_out=0)")
    return TaskData(task, train, evaluation, world.vocab,
                    TaskCollator(cfg.data, world.vocab, task, len(answers)), eval_source, answers,
                    eval_pairs=eval_world.held_out if task == "retrieval" else None)


def _retrieval_directory(cfg: RunConfig) -> TaskData:
    train = build_data(cfg.data, ())
    if not cfg.eval.eval_data:
        raise ConfigError("--task retrieval on a data directory needs --eval_data, a directory of the "
                          "evaluation images and captions in the same format")
    pairs = build_data(dataclasses.replace(cfg.data, source=cfg.eval.eval_data), ())
    if pairs.vocab != train.vocab:
        raise ConfigError(f"--eval_data {cfg.eval.eval_data}: its tokenizer/concept vocabulary differs from "
                          f"--data {cfg.data.source}'s")
    return TaskData("retrieval", Wrapped(train.train), Wrapped(pairs.train), train.vocab,
                    TaskCollator(cfg.data, train.vocab, "retrieval"), cfg.eval.eval_data, eval_pairs=pairs.train)


def _read(task: str, directory: str, split: str, cfg: RunConfig, answers: List[str]):
    d = cfg.data
    source = readers.ImageSource(directory, _tokenizer(cfg, directory), d.max_seq_length, d.max_phrases,
                                 d.max_tag_length, d.max_img_seq_length)
    task_dir = os.path.join(directory, task)
    if task == "vqa":
        return readers.read_vqa(source, task_dir, split, answers), source
    if task == "snli_ve":
        return readers.read_snli_ve(source, task_dir, split), source
    return readers.read_refcoco(source, task_dir, split), source


def build_task_data(cfg: RunConfig) -> TaskData:
    task = cfg.eval.finetune_task
    if is_synthetic(cfg.data.source):
        return _synthetic(cfg, task)
    if not os.path.isdir(cfg.data.source):
        raise ConfigError(f"--data {cfg.data.source!r}: neither 'synthetic[:key=value,...]' nor a directory")
    if task == "retrieval":
        return _retrieval_directory(cfg)
    answers = readers.read_answers(os.path.join(cfg.data.source, "vqa", "answers.json")) if task == "vqa" else []
    split = cfg.eval.eval_split or TASK_EVAL_SPLITS[task]
    train, source = _read(task, cfg.data.source, "train", cfg, answers)
    eval_dir = cfg.eval.eval_data or cfg.data.source
    evaluation, eval_source = _read(task, eval_dir, split, cfg, answers)
    if eval_source.vocab != source.vocab:
        raise ConfigError(f"--eval_data {eval_dir}: its tokenizer/concept vocabulary differs from --data's")
    for name, ds in (("train", train), (split, evaluation)):
        if len(ds) == 0:
            raise ConfigError(f"{os.path.join(eval_dir if name == split else cfg.data.source, task)}: "
                              f"no {task} examples in split {name!r}")
    return TaskData(task, train, evaluation, source.vocab, TaskCollator(cfg.data, source.vocab, task, len(answers)),
                    f"{os.path.join(eval_dir, task)} split {split}", answers)
