"""The data side's single entry point: ``build_data(DataConfig, objectives) -> DataBundle``.

``DataConfig.source`` selects where examples come from:

* ``"synthetic"`` / ``"synthetic:key=value,..."``: the built-in scene world (:mod:`mvptr_ds.data.synthetic`),
  generated in memory at start-up; ``held_out`` holds its held-out images' captions.
* anything else names a data directory in the real formats, read by
  :class:`~mvptr_ds.data.real_dataset.RealDataset` (:func:`build_directory_data`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from mvptr_ds.config import ConfigError, DataConfig
from mvptr_ds.data.batching import Collator
from mvptr_ds.data.synthetic import SceneWorld, parse_synthetic_source
from mvptr_ds.data.vocab import VocabInfo


@dataclass
class DataBundle:
    """Everything the training and evaluation code needs from the data.

    ``train`` / ``held_out``: indexable datasets (``len(ds)``, ``ds[i] -> Example``); ``held_out`` may be empty
    for real data. ``collator(examples, ctx) -> Batch``. ``world`` is the scene world for synthetic sources
    (ground truth for grounding metrics and format writers), else None.
    """

    train: object
    held_out: object
    vocab: VocabInfo
    collator: Collator
    world: Optional[SceneWorld] = None


def is_synthetic(source: str) -> bool:
    return source == "synthetic" or source.startswith("synthetic:")


def build_data(data_cfg: DataConfig, objectives: Sequence[str], exclude_same_image: bool = True) -> DataBundle:
    """Datasets, vocabulary and collator for ``data_cfg.source``; ``objectives`` decides the corruption,
    ``exclude_same_image`` WPG's negative pairs (``ObjectiveConfig.exclude_same_image``)."""
    data_cfg.validate()
    if is_synthetic(data_cfg.source):
        world = SceneWorld(parse_synthetic_source(data_cfg.source))
        return DataBundle(train=world.train, held_out=world.held_out, vocab=world.vocab,
                          collator=Collator.from_config(data_cfg, world.vocab, objectives, exclude_same_image),
                          world=world)
    return build_directory_data(data_cfg, objectives, exclude_same_image)


def build_directory_data(data_cfg: DataConfig, objectives: Sequence[str], exclude_same_image: bool = True
                         ) -> DataBundle:
    """Real data from a directory of VinVL features, tags, captions and concepts (MVPTR.md section 5).

    The layout is documented in :mod:`mvptr_ds.data.real_dataset`. The tokenizer is ``data_cfg.tokenizer``
    or, when that is unset, ``DIR/tokenizer`` (as ``synth`` writes it). Real data has no held-out split here.
    """
    import os

    from mvptr_ds.data.real_dataset import RealDataset

    source = data_cfg.source
    if not os.path.isdir(source):
        raise ConfigError(f"--data {source!r}: neither 'synthetic[:key=value,...]' nor a data directory")
    tokenizer = data_cfg.tokenizer
    if tokenizer is None and os.path.isdir(os.path.join(source, "tokenizer")):
        tokenizer = os.path.join(source, "tokenizer")
    if tokenizer is None:
        raise ConfigError(f"--data {source}: give --tokenizer, a local Hugging Face tokenizer directory "
                          f"(BERT uncased for the released vocabulary), or put one in {source}/tokenizer")
    dataset = RealDataset(source, tokenizer, max_seq_length=data_cfg.max_seq_length,
                          max_phrases=data_cfg.max_phrases, max_tag_length=data_cfg.max_tag_length,
                          max_img_seq_length=data_cfg.max_img_seq_length)
    return DataBundle(train=dataset, held_out=[], vocab=dataset.vocab_info,
                      collator=Collator.from_config(data_cfg, dataset.vocab_info, objectives, exclude_same_image))
