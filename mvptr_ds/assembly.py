"""Composition root of pre-training: a RunConfig becomes data, model + objectives and this rank's loader
(:func:`build`), which :func:`pretrain` hands to the training loop. ``finetune.runner`` is the same for tasks.

(``data.pipeline`` is the data side's entry point; this module wires every side together.)
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

from mvptr_ds.config import ConfigError, DataConfig, ModelConfig, RunConfig
from mvptr_ds.training.trainer import RunParts, TrainResult, train


def resolve_model_config(model: ModelConfig, vocab, data: Optional[DataConfig] = None) -> ModelConfig:
    """Fill ``vocab_size``/``only_word_size`` from the data's vocabulary, or check explicit values against it.

    With ``data``, also check that the position table holds the longest streams the data settings allow
    (:func:`check_positions`).
    """
    if data is not None:
        check_positions(model, data)
    vocab_size = model.vocab_size if model.vocab_size is not None else vocab.vocab_size
    only_word = model.only_word_size if model.only_word_size is not None else vocab.only_word_size
    if vocab_size < vocab.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the data's vocabulary ({vocab.vocab_size} ids)")
    if only_word != vocab.only_word_size:
        raise ConfigError(f"model.only_word_size={only_word} differs from the data's word vocabulary "
                          f"({vocab.only_word_size} word pieces)")
    resolved = dataclasses.replace(model, vocab_size=vocab_size, only_word_size=only_word)
    resolved.validate()
    return resolved


def check_positions(model: ModelConfig, data: DataConfig) -> None:
    """ConfigError unless ``model.max_position_embeddings`` covers the longest text stream (``[CLS]`` words
    concepts ``[SEP]``: ``max_seq_length + max_phrases``) and tag stream (``max_tag_length``) of ``data``."""
    longest = {"text (data.max_seq_length + data.max_phrases)": data.max_seq_length + data.max_phrases,
               "tag (data.max_tag_length)": data.max_tag_length}
    for what, length in longest.items():
        if length > model.max_position_embeddings:
            raise ConfigError(f"model.max_position_embeddings={model.max_position_embeddings} is shorter than the "
                              f"longest {what} stream, {length} tokens; raise it or shorten the data limits")


def training_loader(dataset, collator, cfg: RunConfig, info, source: Optional[str] = None, check_size: bool = True):
    """This rank's :class:`~mvptr_ds.data.batching.ResumableLoader` over ``dataset``.

    ``check_size``: ConfigError when one step (``micro_batch x world size`` samples) asks for more samples than
    ``dataset`` holds: the step would wrap around the data several times (and an absurd micro batch would
    never finish). ``source`` names the data in that message (default ``cfg.data.source``).
    """
    from mvptr_ds.data.batching import ResumableLoader

    n, micro, world = len(dataset), cfg.train.micro_batch, info.world_size
    if check_size and micro * world > n:
        fits = (f"use --micro_batch {n // world} or less" if n >= world
                else f"it holds fewer samples than the {world} ranks")
        raise ConfigError(f"--micro_batch {micro} x world size {world} = {micro * world} samples per step is more than "
                          f"the {n} training samples of {source or cfg.data.source}; {fits}")
    return ResumableLoader(dataset, collator, micro_batch=micro, rank=info.rank, world_size=world,
                           seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                           prefetch_factor=cfg.data.prefetch_factor)


def build(cfg: RunConfig, info) -> RunParts:
    """Data bundle, resolved config, pre-training module and this rank's loader."""
    from mvptr_ds.data.pipeline import build_data
    from mvptr_ds.objectives import build_pretraining_module
    from mvptr_ds.training.gather import global_gather_fn

    data = build_data(cfg.data, cfg.objective_names, cfg.objectives.exclude_same_image)
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, data.vocab, cfg.data)).validate()
    train = data.train
    if cfg.data.join_pairs:
        from mvptr_ds.data.pair_joining import JoinedPairs

        train = JoinedPairs(train, cfg.data.join_pairs, cfg.train.seed)
    loader = training_loader(train, data.collator, cfg, info)
    gather = global_gather_fn() if cfg.objectives.global_negatives else None
    module = build_pretraining_module(cfg.model, cfg.objective_names, cfg.objectives, gather=gather)
    module.to(info.device)
    return RunParts(config=cfg, data=data, module=module, loader=loader, fresh_start_notes=fresh_start_notes(cfg))


def fresh_start_notes(cfg: RunConfig) -> List[str]:
    """Lines the run log shows when the weights start untrained (no ``--init_from``, no resume)."""
    from mvptr_ds.objectives import itm, wpg

    return [n for n in (itm.cold_start_note(cfg.objective_names, cfg.objectives.itm_negatives),
                        wpg.cold_start_note(cfg.objective_names, cfg.objectives.wpg_negatives)) if n]


def pretrain(cfg: RunConfig) -> TrainResult:
    """Pre-train (or resume) as ``cfg`` says, on every rank of the launch (``training.trainer.train``)."""
    return train(cfg, build)
