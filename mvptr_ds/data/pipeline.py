"""The data side's single entry point: ``build_data(DataConfig, objectives) -> DataBundle``.

``DataConfig.source`` selects where examples come from:

* ``"synthetic"`` / ``"synthetic:key=value,..."``: the built-in scene world (:mod:`mvptr_ds.data.synthetic`),
  generated in memory at start-up; ``held_out`` holds its held-out images' captions.
* anything else names a data directory; it goes to :func:`build_directory_data`, the one place a reader of
  the real formats plugs in.
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


def build_data(data_cfg: DataConfig, objectives: Sequence[str]) -> DataBundle:
    """Datasets, vocabulary and collator for ``data_cfg.source``; ``objectives`` decides the corruption."""
    data_cfg.validate()
    if is_synthetic(data_cfg.source):
        world = SceneWorld(parse_synthetic_source(data_cfg.source))
        return DataBundle(train=world.train, held_out=world.held_out, vocab=world.vocab,
                          collator=Collator.from_config(data_cfg, world.vocab, objectives), world=world)
    return build_directory_data(data_cfg, objectives)


def build_directory_data(data_cfg: DataConfig, objectives: Sequence[str]) -> DataBundle:
    """Real data from a directory of VinVL features, tags, captions and concepts (MVPTR.md section 5).

    No directory reader is connected to the training pipeline in this version, so any non-synthetic source
    is a configuration error that names it.
    """
    raise ConfigError(f"--data {data_cfg.source!r}: reading a data directory is not supported by this "
                      f"version's training pipeline; use --data synthetic[:key=value,...]")
