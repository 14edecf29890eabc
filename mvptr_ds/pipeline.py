"""Composition root: turns a RunConfig into data, model + objectives and a loader. The only wiring code."""
from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import List

import torch

from mvptr_ds.config import ConfigError, ModelConfig, RunConfig


@dataclass
class RunParts:
    config: RunConfig      # with the model's vocabulary sizes resolved from the data
    data: object           # mvptr_ds.data.pipeline.DataBundle
    module: torch.nn.Module  # mvptr_ds.objectives.PretrainingModule
    loader: object         # mvptr_ds.data.batching.ResumableLoader


def resolve_model_config(model: ModelConfig, vocab) -> ModelConfig:
    """Fill ``vocab_size``/``only_word_size`` from the data's vocabulary, or check explicit values against it."""
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


def build(cfg: RunConfig, info) -> RunParts:
    """Data bundle, resolved config, pre-training module and this rank's loader."""
    from mvptr_ds.data.batching import ResumableLoader
    from mvptr_ds.data.pipeline import build_data
    from mvptr_ds.objectives import build_pretraining_module
    from mvptr_ds.training.gather import global_gather_fn

    data = build_data(cfg.data, cfg.objective_names)
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, data.vocab)).validate()
    gather = global_gather_fn() if cfg.objectives.global_negatives else None
    module = build_pretraining_module(cfg.model, cfg.objective_names, cfg.objectives, gather=gather)
    module.to(info.device)
    loader = ResumableLoader(data.train, data.collator, micro_batch=cfg.train.micro_batch, rank=info.rank,
                             world_size=info.world_size, seed=cfg.train.seed,
                             num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor)
    return RunParts(config=cfg, data=data, module=module, loader=loader)


def init_weights(module: torch.nn.Module, path: str, report_path: str = None) -> List[str]:
    """Load matching weights from ``path`` into ``module``; report what was loaded and what is new, by name.

    Shape mismatches are errors. Returns human-readable report lines; the full lists go to ``report_path``.
    """
    from mvptr_ds.training.weights import read_model_weights

    source = read_model_weights(path, "--init_from")[0]
    target = module.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(source[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in target.items() if k in source and source[k].shape != v.shape]
    if mismatched:
        raise ConfigError(f"--init_from {path}: shape mismatch for {mismatched[0]}"
                          + (f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
    loaded = [k for k in target if k in source]
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    module.load_state_dict({k: source[k] for k in loaded}, strict=False)
    if report_path:
        with open(report_path, "w") as f:
            json.dump({"source": path, "loaded": loaded, "newly_initialised": missing, "unused": unexpected}, f, indent=1)
    lines = [f"init_from {path}: loaded {len(loaded)} tensors"]
    if missing:
        lines.append(f"  newly initialised ({len(missing)}): {summarise_names(missing)}")
    if unexpected:
        lines.append(f"  in the checkpoint but not used ({len(unexpected)}): {summarise_names(unexpected)}")
    return lines


def summarise_names(names: List[str]) -> str:
    """Group parameter names by module: ``backbone.cross_encoder.layer.{0,1}.* (32)``-style, in order."""
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 else n
        groups.setdefault(key, []).append(n)
    return ", ".join(f"{k}.* ({len(v)})" if len(v) > 1 or v[0] != k else k for k, v in groups.items())
