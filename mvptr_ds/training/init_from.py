"""``--init_from``: start a run from another run's weights (e.g. stage 2 from stage 1, a task from pre-training),
or from a Hugging Face BERT folder (the paper's initialisation, ``model.bert_init``)."""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional

import torch

from mvptr_ds.config import ConfigError
from mvptr_ds.files import atomic_write_json


def init_weights(module: torch.nn.Module, path: str, report_path: Optional[str] = None,
                 reset_decoders: bool = False) -> List[str]:
    """Load matching weights from ``path`` into ``module``; report what was loaded and what is new, by name.

    ``path`` is anything ``weights.read_model_weights`` reads, or a Hugging Face BERT folder
    (:func:`init_from_bert_folder`). Shape mismatches are errors. ``reset_decoders``: afterwards copy the
    word-embedding rows into the MLM/MCR decoders again (``train.reset_decoders_on_init``, the release's
    ``from_pretrained``). Returns human-readable report lines; the full lists go to ``report_path`` (JSON) when
    given.
    """
    from mvptr_ds.model.bert_init import is_bert_directory
    from mvptr_ds.training.weights import read_model_weights

    if is_bert_directory(path):
        return init_from_bert_folder(module, path, report_path)
    source = read_model_weights(path, "--init_from")[0]
    target = module.state_dict()
    aliases = module.init_aliases() if hasattr(module, "init_aliases") else {}
    origin = {k: k if k in source else aliases[k] for k in target if k in source or aliases.get(k) in source}
    mismatched = [f"{k}: checkpoint {tuple(source[src].shape)} vs model {tuple(target[k].shape)}"
                  for k, src in origin.items() if source[src].shape != target[k].shape]
    if mismatched:
        raise ConfigError(f"--init_from {path}: shape mismatch for {mismatched[0]}"
                          + (f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
    loaded = list(origin)
    renamed = {k: src for k, src in origin.items() if k != src}
    missing = [k for k in target if k not in origin]
    unexpected = [k for k in source if k not in target and k not in renamed.values()]
    module.load_state_dict({k: source[src] for k, src in origin.items()}, strict=False)
    if report_path:
        atomic_write_json(report_path, {"source": path, "loaded": loaded, "loaded_from_other_names": renamed,
                                        "newly_initialised": missing, "unused": unexpected},
                          indent=1, sort_keys=False)
    lines = [f"init_from {path}: loaded {len(loaded)} tensors"]
    if renamed:
        lines.append(f"  from other names ({len(renamed)}): " + ", ".join(f"{k} <- {v}" for k, v in renamed.items()))
    if missing:
        lines.append(f"  newly initialised ({len(missing)}): {summarise_names(missing)}")
    if unexpected:
        lines.append(f"  in the checkpoint but not used ({len(unexpected)}): {summarise_names(unexpected)}")
    if reset_decoders and hasattr(module, "clone_decoders"):
        module.clone_decoders()
        lines.append("  MLM/MCR decoders copied from the word-embedding rows again (train.reset_decoders_on_init)")
    return lines


def init_from_bert_folder(module: torch.nn.Module, path: str, report_path: Optional[str] = None) -> List[str]:
    """The paper's initialisation of ``module`` (``backbone`` and the pre-training ``heads``) from the BERT folder
    ``path`` (``model.bert_init.init_from_bert``); the report as :func:`init_weights`'s, with each tensor's BERT
    source and the notes."""
    from mvptr_ds.model.bert_init import BertInitError, init_from_bert

    if not hasattr(module, "backbone"):
        raise ConfigError(f"--init_from {path}: a BERT folder initialises an MVPTR backbone; this module has none")
    try:
        report = init_from_bert(module.backbone, path, heads=getattr(module, "heads", None))
    except BertInitError as e:
        raise ConfigError(f"--init_from {e}") from None
    ours = lambda k: k if k.startswith("heads.") else f"backbone.{k}"  # noqa: E731 (the module's names)
    loaded = {ours(k): v for k, v in report.sources.items()}
    new = [ours(k) for k in report.new]
    if report_path:
        atomic_write_json(report_path, {"source": path, "kind": "huggingface_bert", "loaded": loaded,
                                        "newly_initialised": new, "unused": report.unused, "notes": report.notes},
                          indent=1, sort_keys=False)
    lines = [f"init_from {path} (Hugging Face BERT): {len(loaded)} tensors from BERT"]
    if new:
        lines.append(f"  newly initialised ({len(new)}): {summarise_names(new)}")
    if report.unused:
        lines.append(f"  BERT tensors not used ({len(report.unused)}): {summarise_names(report.unused)}")
    lines += [f"  note: {n}" for n in report.notes]
    return lines


def summarise_names(names: List[str]) -> str:
    """Group parameter names by module: ``backbone.cross_encoder.layer.{0,1}.* (32)``-style, in order."""
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 else n
        groups.setdefault(key, []).append(n)
    return ", ".join(f"{k}.* ({len(v)})" if len(v) > 1 or v[0] != k else k for k, v in groups.items())
