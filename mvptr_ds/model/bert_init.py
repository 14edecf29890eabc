"""Initialise MVPTR from a local Hugging Face BERT directory (no hub access): the paper's initialisation.

Default mapping (MVPTR.md; the authors' recipe): BERT layers 0-5 -> textual encoder, 6-11 -> cross-modal
encoder, 0-5 -> visual encoder (for a BERT of N layers: the first N/2 to both uni-modal encoders, the rest to
the cross-modal one); embeddings (the first rows of the word table: concept rows keep their
initialisation) and the pooler are copied too. A model with fewer layers than a range takes the first N
entries of that range; layers beyond a range stay newly initialised. Both cases are noted in the report.

With the pre-training heads (``heads``): a ``BertForPreTraining`` checkpoint's MLM transform and output bias
(``cls.predictions.*``, the first ``only_word_size`` entries) start the MLM head, its next-sentence head
(``cls.seq_relationship``, index 0 = "is next") the ITM head with its rows swapped (label 1 = matched here);
then both MLM/MCR decoders are cloned from the word-embedding rows just loaded, as the release's
``tie_weights`` does. The MCR transform stays newly initialised (the release's ``half_mlm`` has no BERT
counterpart).

Reads ``model.safetensors`` (or a sharded ``model.safetensors.index.json``) or ``pytorch_model.bin``
(with ``torch.load(weights_only=True)``: no pickle code runs). Accepts ``BertModel`` names, names under a
``bert.`` prefix (``BertForPreTraining``) and the legacy ``LayerNorm.gamma/beta`` names.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from mvptr_ds.model.heads import clone_decoder
from mvptr_ds.model.mvptr import MVPTRModel


class BertInitError(ValueError):
    """The BERT directory cannot initialise this model; the message names the file or parameter."""


@dataclass
class InitReport:
    """Where each backbone parameter came from."""

    sources: Dict[str, str] = field(default_factory=dict)  # our parameter -> BERT key (row range if partial)
    new: List[str] = field(default_factory=list)           # our parameters left at their fresh initialisation
    unused: List[str] = field(default_factory=list)        # BERT keys not copied anywhere
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.sources)} parameters from BERT, {len(self.new)} newly initialised, "
                 f"{len(self.unused)} BERT tensors unused"]
        lines += [f"  {ours} <- {src}" for ours, src in self.sources.items()]
        lines += [f"  new: {k}" for k in self.new]
        lines += [f"  unused: {k}" for k in self.unused]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def load_bert_state(bert_dir: str) -> Dict[str, torch.Tensor]:
    """BERT tensors of ``bert_dir`` with normalised names (``embeddings.*``, ``encoder.layer.N.*``, ``pooler.*``)."""
    st = os.path.join(bert_dir, "model.safetensors")
    index = os.path.join(bert_dir, "model.safetensors.index.json")
    binary = os.path.join(bert_dir, "pytorch_model.bin")
    if os.path.isfile(st):
        raw = load_file(st)
    elif os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        raw = {}
        for shard in shards:
            raw.update(load_file(os.path.join(bert_dir, shard)))
    elif os.path.isfile(binary):
        try:
            raw = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:  # the restricted unpickler's error types vary
            raise BertInitError(f"{binary}: not a plain dict of tensors ({str(e).splitlines()[0]})") from None
    else:
        raise BertInitError(f"{bert_dir}: no model.safetensors or pytorch_model.bin (a local Hugging Face "
                            f"BERT directory is expected)")
    out = {}
    for key, tensor in raw.items():
        name = key[len("bert."):] if key.startswith("bert.") else key
        if ".LayerNorm." in name or name.startswith("LayerNorm."):
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[name] = tensor
    return out


def _bert_layer_count(state: Dict[str, torch.Tensor]) -> int:
    ids = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")}
    return max(ids) + 1 if ids else 0


def is_bert_directory(path: str) -> bool:
    """True when ``path`` is a Hugging Face BERT folder: its ``config.json`` says ``"model_type": "bert"`` (this
    project's checkpoints hold a run config there instead)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "bert"


# (our head parameter, BERT tensor, rows: "words" for the first only_word_size rows, "swap" for the NSP rows)
_HEAD_SOURCES = (
    ("mlm", "transform.dense.weight", "cls.predictions.transform.dense.weight", None),
    ("mlm", "transform.dense.bias", "cls.predictions.transform.dense.bias", None),
    ("mlm", "transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.weight", None),
    ("mlm", "transform.LayerNorm.bias", "cls.predictions.transform.LayerNorm.bias", None),
    ("mlm", "bias", "cls.predictions.bias", "words"),
    ("itm", "classifier.weight", "cls.seq_relationship.weight", "swap"),
    ("itm", "classifier.bias", "cls.seq_relationship.bias", "swap"),
)


def init_from_bert(model: MVPTRModel, bert_dir: str, text_layers: Optional[Sequence[int]] = None,
                   cross_layers: Optional[Sequence[int]] = None, visual_layers: Optional[Sequence[int]] = None,
                   heads: Optional[nn.ModuleDict] = None) -> InitReport:
    """Copy BERT weights from ``bert_dir`` into ``model`` (and the pre-training ``heads``, named ``mlm``, ``mcr``,
    ``itm``, if given) in place; return what came from where (backbone names as in ``model``, heads as
    ``heads.<name>.*``).

    ``*_layers[i]`` is the BERT layer copied into layer ``i`` of that encoder; None: the module docstring's
    default.
    """
    bert = load_bert_state(bert_dir)
    n_bert = _bert_layer_count(bert)
    half = range(0, n_bert // 2)
    text_layers = half if text_layers is None else text_layers
    visual_layers = half if visual_layers is None else visual_layers
    cross_layers = range(n_bert // 2, n_bert) if cross_layers is None else cross_layers
    params = dict(model.named_parameters())
    if heads is not None:
        params.update({f"heads.{k}": v for k, v in heads.named_parameters()})
    report = InitReport()
    used = set()

    def copy(ours: str, theirs: str, rows: Optional[int] = None) -> None:
        if theirs not in bert:
            raise BertInitError(f"{bert_dir}: BERT tensor {theirs} not found (needed for {ours})")
        src, dst = bert[theirs], params[ours]
        if rows is None and src.shape != dst.shape:
            raise BertInitError(f"{bert_dir}: {theirs} has shape {tuple(src.shape)}, model's {ours} has "
                                f"{tuple(dst.shape)} (hidden sizes must agree)")
        if rows is not None and src.shape[1:] != dst.shape[1:]:
            raise BertInitError(f"{bert_dir}: {theirs} rows have shape {tuple(src.shape[1:])}, model's {ours} "
                                f"rows {tuple(dst.shape[1:])}")
        with torch.no_grad():
            if rows is None:
                dst.copy_(src)
                report.sources[ours] = theirs
            else:
                dst[:rows].copy_(src[:rows])
                report.sources[ours] = f"{theirs}[0:{rows}]"
        used.add(theirs)

    def copy_swapped(ours: str, theirs: str) -> None:
        src, dst = bert[theirs], params[ours]
        if src.shape != dst.shape:
            raise BertInitError(f"{bert_dir}: {theirs} has shape {tuple(src.shape)}, model's {ours} has "
                                f"{tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(src.flip(0))
        report.sources[ours] = f"{theirs} (rows swapped: BERT's 0 = is next, ours 1 = matched)"
        used.add(theirs)

    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        ours, theirs = f"embeddings.{table}.weight", f"embeddings.{table}.weight"
        if theirs not in bert:
            raise BertInitError(f"{bert_dir}: BERT tensor {theirs} not found")
        have, want = bert[theirs].shape[0], params[ours].shape[0]
        rows = min(have, want)
        copy(ours, theirs, rows=rows)
        if want > have:
            report.notes.append(f"{ours}: rows {have}..{want - 1} keep their initialisation (not in BERT)")
        elif have > want:
            report.notes.append(f"{ours}: BERT has {have} rows, the model {want}: rows {want}.. not copied")
    for part in ("weight", "bias"):
        copy(f"embeddings.LayerNorm.{part}", f"embeddings.LayerNorm.{part}")

    encoders = {"text_encoder": text_layers, "visual_encoder": visual_layers, "cross_encoder": cross_layers}
    for enc_name, mapping in encoders.items():
        encoder = getattr(model, enc_name)
        if encoder is None:
            report.notes.append(f"{enc_name}: not built (with_cross=False), mapping {list(mapping)} not applied")
            continue
        mapping = list(mapping)
        n = len(encoder.layer)
        bad = [j for j in mapping[:n] if not 0 <= j < n_bert]
        if bad:
            raise BertInitError(f"{bert_dir}: {enc_name} mapping uses BERT layers {bad}, BERT has {n_bert} "
                                f"layers (0..{n_bert - 1})")
        if n < len(mapping):
            report.notes.append(f"{enc_name}: {n} layers, takes the first {n} of BERT layers {mapping}: "
                                f"{mapping[:n]}")
        elif n > len(mapping):
            report.notes.append(f"{enc_name}: {n} layers, BERT layers {mapping} initialise layers "
                                f"0..{len(mapping) - 1}; the rest stay newly initialised")
        for i, j in enumerate(mapping[:n]):
            prefix = f"{enc_name}.layer.{i}."
            for ours in [k for k in params if k.startswith(prefix)]:
                copy(ours, f"encoder.layer.{j}." + ours[len(prefix):])

    if model.pooler is not None:
        if "pooler.dense.weight" in bert:
            copy("pooler.dense.weight", "pooler.dense.weight")
            copy("pooler.dense.bias", "pooler.dense.bias")
        else:
            report.notes.append("BERT has no pooler: the pooler stays newly initialised")

    if heads is not None:
        for head, ours, theirs, rows in _HEAD_SOURCES:
            name = f"heads.{head}.{ours}"
            if name not in params or theirs not in bert:
                continue
            if rows == "swap":
                copy_swapped(name, theirs)
            else:
                copy(name, theirs, rows=min(params[name].shape[0], bert[theirs].shape[0]) if rows == "words" else None)
        for head in ("mlm", "mcr"):
            if head in heads:
                clone_decoder(heads[head], model.embeddings.word_embeddings.weight)
                report.sources[f"heads.{head}.decoder.weight"] = "clone of embeddings.word_embeddings.weight rows " \
                    f"0..{heads[head].decoder.weight.shape[0] - 1} after the copy"
        if not any(k.startswith("cls.") for k in bert):
            report.notes.append("BERT has no pre-training heads (cls.*): the MLM transform and the ITM head stay "
                                "newly initialised")
    report.new = [k for k in params if k not in report.sources]
    report.unused = sorted(k for k in bert if k not in used)
    return report
