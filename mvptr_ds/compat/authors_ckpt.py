"""The authors' checkpoint format (MVPTR.md section 6) <-> this project's state dict.

The mapping is declarative (``KEY_MAP``, ``EXACT_KEYS``, ``DROPPED``, ``ROW_SWAPPED``) and applied in both
directions. This project's canonical keys are ``backbone.<MVPTRModel key>`` and ``heads.{mlm,mcr,itm}.*``.

- Each of the authors' three encoders has ``num_hidden_layers // 2`` layers.
- ``cls.seq_relationship`` (their pre-training ITM head) scores a matched pair at index 0; ours at index 1,
  so its two rows are swapped on the way in and out.
- ``bert.LayerNorm`` is their region LayerNorm; it is used (and kept) only when ``use_img_layernorm`` is set
  (their model reads the attribute with ``hasattr``: a config without it means off).
- ``qa_head`` is not part of this project and is dropped (named in the report).
- ``logit_scale`` is 0-dim in their checkpoints and shape ``(1,)`` in ours.

``authors_to_project`` returns a ``ConversionReport`` listing missing, unexpected and dropped keys and shape
mismatches by name, checked against the model that the converted config builds. The other direction,
``write_original`` (``python -m mvptr_ds.run export_original``), writes ``pytorch_model.bin`` and a
``config.json`` their ``BiBertImgForPreTraining.from_pretrained`` reads (``tests/compat/test_fidelity.py`` loads one
into their code).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from mvptr_ds.config import ConfigError, ModelConfig, RunConfig
from mvptr_ds.config_types import read_json
from mvptr_ds.files import atomic_write_json
from mvptr_ds.model.heads import ITMHead, MaskedTokenHead
from mvptr_ds.model.mvptr import MVPTRModel
from mvptr_ds.training.weights import save_weights

# Prefix rules, authors -> ours (first match wins; the reverse direction uses the same table).
KEY_MAP: Tuple[Tuple[str, str], ...] = (
    ("bert.txt_encoder.layer.", "backbone.text_encoder.layer."),
    ("bert.vis_encoder.layer.", "backbone.visual_encoder.layer."),
    ("bert.mul_encoder.layer.", "backbone.cross_encoder.layer."),
    ("bert.embeddings.", "backbone.embeddings."),
    ("bert.img_embedding.", "backbone.img_embedding."),
    ("bert.LayerNorm.", "backbone.img_layernorm."),
    ("bert.pooler.", "backbone.pooler."),
    ("cls.predictions.", "heads.mlm."),
    ("half_mlm.", "heads.mcr."),
    ("cls.seq_relationship.", "heads.itm.classifier."),
)
EXACT_KEYS: Dict[str, str] = {
    "bert.txt_proj": "backbone.txt_proj.weight",
    "bert.vis_proj": "backbone.vis_proj.weight",
    "logit_scale": "backbone.logit_scale",
}
# Authors' prefixes this project does not use, with the reason given in the report.
DROPPED: Dict[str, str] = {"qa_head.": "the authors' QA head is not part of this project"}
# Our keys whose rows are swapped between the two label conventions of ITM (theirs: 0 = match).
ROW_SWAPPED = ("heads.itm.classifier.weight", "heads.itm.classifier.bias")
# Our keys that hold the transpose of the authors' tensor (their raw projection P applied as x @ P is our
# bias-free Linear with weight P^T).
TRANSPOSED = ("backbone.txt_proj.weight", "backbone.vis_proj.weight")
# Our keys stored 0-dim by the authors and with shape (1,) here (DeepSpeed cannot broadcast 0-dim tensors).
SCALARS = ("backbone.logit_scale",)
IMG_LAYERNORM_PREFIX = "backbone.img_layernorm."
HEAD_NAMES = ("mlm", "mcr", "itm")


@dataclass
class ConversionReport:
    """Outcome of a conversion; ``ok`` when nothing is missing, unexpected or mis-shaped."""

    mapped: Dict[str, str] = field(default_factory=dict)        # authors' key -> our key
    missing: List[str] = field(default_factory=list)            # our keys no source key provided
    unexpected: List[str] = field(default_factory=list)         # authors' keys no rule maps
    dropped: Dict[str, str] = field(default_factory=dict)       # authors' key -> why it is not used
    shape_mismatches: List[str] = field(default_factory=list)   # "key: checkpoint (..) vs model (..)"
    notes: List[str] = field(default_factory=list)              # config choices worth knowing

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def summary(self) -> str:
        lines = [f"{len(self.mapped)} tensors mapped, {len(self.dropped)} dropped, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.shape_mismatches)} shape mismatches"]
        lines += [f"  missing: {k}" for k in self.missing]
        lines += [f"  unexpected: {k}" for k in self.unexpected]
        lines += [f"  shape mismatch: {k}" for k in self.shape_mismatches]
        lines += [f"  dropped: {k} ({why})" for k, why in self.dropped.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"ok": self.ok, "mapped": self.mapped, "missing": self.missing, "unexpected": self.unexpected,
                "dropped": self.dropped, "shape_mismatches": self.shape_mismatches, "notes": self.notes}


def _swap_rows(t: torch.Tensor) -> torch.Tensor:
    return t.flip(0).clone()


def authors_key_to_ours(key: str) -> Optional[str]:
    """Our name for an authors' key, or None when no rule maps it (dropped keys included)."""
    if key in EXACT_KEYS:
        return EXACT_KEYS[key]
    for theirs, ours in KEY_MAP:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def our_key_to_authors(key: str) -> Optional[str]:
    """The authors' name for one of our keys, or None when their format has no place for it."""
    for theirs, ours in EXACT_KEYS.items():
        if key == ours:
            return theirs
    for theirs, ours in KEY_MAP:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return None


def model_config_from_authors(authors_config: Mapping[str, Any], notes: Optional[List[str]] = None) -> ModelConfig:
    """ModelConfig of an authors' config dict (their BERT-style ``config.json`` fields)."""
    notes = notes if notes is not None else []
    cfg = dict(authors_config)
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    absent = [k for k in required if k not in cfg]
    if absent:
        raise ConfigError(f"authors' config lacks {', '.join(absent)}")
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"authors' config hidden_act={act!r}: only 'gelu' (erf form) is supported")
    n = int(cfg["num_hidden_layers"])
    if n < 2:
        raise ConfigError(f"authors' config num_hidden_layers={n}: each encoder gets n // 2 layers, need n >= 2")
    if n % 2:
        notes.append(f"num_hidden_layers={n} is odd: each encoder gets {n // 2} layers")
    if "use_img_layernorm" not in cfg:
        notes.append("authors' config has no use_img_layernorm: off, as their model reads it (hasattr): the region "
                     "LayerNorm is not applied")
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    img_eps = cfg.get("img_layer_norm_eps")
    if img_eps is not None and float(img_eps) != eps:
        notes.append(f"img_layer_norm_eps={img_eps} differs from layer_norm_eps={eps}: this project uses "
                     f"layer_norm_eps for the region LayerNorm too")
    only_word = cfg.get("only_word_size")
    if only_word is None:
        raise ConfigError("authors' config lacks only_word_size (the number of word-piece rows; 30522 for BERT) "
                          "and the checkpoint has no MLM decoder to read it from")
    defaults = ModelConfig()
    out = ModelConfig(
        hidden_size=int(cfg["hidden_size"]), num_attention_heads=int(cfg["num_attention_heads"]),
        intermediate_size=int(cfg["intermediate_size"]),
        text_layers=n // 2, visual_layers=n // 2, cross_layers=n // 2,
        vocab_size=int(cfg["vocab_size"]), only_word_size=int(only_word),
        max_position_embeddings=int(cfg.get("max_position_embeddings", defaults.max_position_embeddings)),
        type_vocab_size=int(cfg.get("type_vocab_size", defaults.type_vocab_size)),
        layer_norm_eps=eps,
        hidden_dropout=float(cfg.get("hidden_dropout_prob", defaults.hidden_dropout)),
        attention_dropout=float(cfg.get("attention_probs_dropout_prob", defaults.attention_dropout)),
        img_feature_dim=int(cfg.get("img_feature_dim", defaults.img_feature_dim)),
        use_img_layernorm=bool(int(cfg.get("use_img_layernorm") or 0)),
        initializer_range=float(cfg.get("initializer_range", defaults.initializer_range)),
    )
    out.validate()
    return out


# What the authors' constructors read beyond the BERT sizes, with the values of their pre-training model:
# region features from a Faster R-CNN (VinVL), a 2-way ITM head, a QA head of VQA's 3,129 answers (not part of
# this project: their model builds it and reports it newly initialised) and ``torchscript`` set, which makes
# their ``tie_weights`` clone the MLM/MCR decoders from the word embeddings (without it, it raises a TypeError on
# current torch).
AUTHORS_CONSTRUCTOR_FIELDS: Dict[str, Any] = {"img_feature_type": "faster_r-cnn", "num_contrast_classes": 2,
                                              "qa_answer_size": 3129, "torchscript": True}


def authors_config_from(model_cfg: ModelConfig) -> Dict[str, Any]:
    """The authors' config dict describing ``model_cfg`` (their format needs three equal encoders), complete
    enough for their ``BiBertImgForPreTraining`` to be built from it."""
    layers = {model_cfg.text_layers, model_cfg.visual_layers, model_cfg.cross_layers}
    if len(layers) != 1:
        raise ConfigError(f"the authors' format needs equal encoder depths, got text/visual/cross = "
                          f"{model_cfg.text_layers}/{model_cfg.visual_layers}/{model_cfg.cross_layers}")
    return {
        "vocab_size": model_cfg.vocab_size, "only_word_size": model_cfg.only_word_size,
        "hidden_size": model_cfg.hidden_size, "num_hidden_layers": 2 * model_cfg.text_layers,
        "num_attention_heads": model_cfg.num_attention_heads, "intermediate_size": model_cfg.intermediate_size,
        "max_position_embeddings": model_cfg.max_position_embeddings,
        "type_vocab_size": model_cfg.type_vocab_size, "layer_norm_eps": model_cfg.layer_norm_eps,
        "hidden_act": "gelu", "hidden_dropout_prob": model_cfg.hidden_dropout,
        "attention_probs_dropout_prob": model_cfg.attention_dropout,
        "initializer_range": model_cfg.initializer_range, "img_feature_dim": model_cfg.img_feature_dim,
        "use_img_layernorm": int(model_cfg.use_img_layernorm), "img_layer_norm_eps": model_cfg.layer_norm_eps,
        **AUTHORS_CONSTRUCTOR_FIELDS,
    }


def expected_shapes(model_cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Canonical key -> shape of the backbone (with cross encoder) and the MLM, MCR and ITM heads.

    Built on the meta device: no memory is allocated.
    """
    with torch.device("meta"):
        backbone = MVPTRModel(model_cfg, with_cross=True)
        heads = torch.nn.ModuleDict({"mlm": MaskedTokenHead(model_cfg), "mcr": MaskedTokenHead(model_cfg),
                                     "itm": ITMHead(model_cfg)})
    shapes = {f"backbone.{k}": tuple(v.shape) for k, v in backbone.state_dict().items()}
    shapes.update({f"heads.{k}": tuple(v.shape) for k, v in heads.state_dict().items()})
    return shapes


def authors_to_project(state_dict: Mapping[str, torch.Tensor], authors_config: Mapping[str, Any]
                       ) -> Tuple[Dict[str, torch.Tensor], ModelConfig, ConversionReport]:
    """Rename an authors' state dict to this project's keys.

    Returns (state dict with ``backbone.*``/``heads.*`` keys, the ModelConfig, the report). Tensors are
    not copied except the ITM rows, which are swapped to this project's label convention (1 = match).
    """
    report = ConversionReport()
    authors_config = dict(authors_config)
    if authors_config.get("only_word_size") is None:
        decoder = next((state_dict[k] for k in ("cls.predictions.decoder.weight", "half_mlm.decoder.weight")
                        if k in state_dict), None)
        if decoder is not None:
            authors_config["only_word_size"] = int(decoder.shape[0])
            report.notes.append(f"only_word_size={decoder.shape[0]} taken from the MLM decoder's rows "
                                f"(absent from the authors' config)")
    cfg = model_config_from_authors(authors_config, report.notes)
    expected = expected_shapes(cfg)
    out: Dict[str, torch.Tensor] = {}
    mismatched = set()
    for key, tensor in state_dict.items():
        dropped = next((why for prefix, why in DROPPED.items() if key.startswith(prefix)), None)
        ours = authors_key_to_ours(key)
        if dropped is None and ours is not None and ours.startswith(IMG_LAYERNORM_PREFIX) \
                and not cfg.use_img_layernorm:
            dropped = "region LayerNorm unused: use_img_layernorm is off"
        if dropped is not None:
            report.dropped[key] = dropped
            continue
        if ours is None or ours not in expected:
            report.unexpected.append(key)
            continue
        if ours in TRANSPOSED and tensor.ndim == 2:
            tensor = tensor.t().contiguous()
        if ours in SCALARS and tensor.numel() == 1:
            tensor = tensor.reshape(expected[ours])  # their 0-dim scalar, our (1,)
        if tuple(tensor.shape) != expected[ours]:
            report.shape_mismatches.append(
                f"{key} -> {ours}: checkpoint {tuple(tensor.shape)} vs model {expected[ours]}")
            mismatched.add(ours)
            continue
        out[ours] = _swap_rows(tensor) if ours in ROW_SWAPPED else tensor
        report.mapped[key] = ours
    report.missing = sorted(k for k in expected if k not in out and k not in mismatched)
    return out, cfg, report


def project_to_authors(state_dict: Mapping[str, torch.Tensor], model_cfg: ModelConfig,
                       strict: bool = True) -> Dict[str, torch.Tensor]:
    """This project's state dict -> the authors' key names (ITM rows back to their 0 = match convention).

    Keys without a place in their format raise ValueError (``strict``) or are left out. Without a region
    LayerNorm (``use_img_layernorm`` off) there is no ``bert.LayerNorm``: their model then builds none either.
    """
    authors_config_from(model_cfg)  # their format needs equal encoder depths
    out: Dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        theirs = our_key_to_authors(key)
        if theirs is None:
            unmapped.append(key)
            continue
        if key in SCALARS:
            tensor = tensor.reshape(())
        if key in TRANSPOSED:
            tensor = tensor.t().contiguous()
        out[theirs] = _swap_rows(tensor) if key in ROW_SWAPPED else tensor
    if unmapped and strict:
        raise ValueError(f"no place in the authors' format for: {', '.join(sorted(unmapped))}")
    return out


def write_original(dst: str, state_dict: Mapping[str, torch.Tensor], model_cfg: ModelConfig) -> Dict[str, Any]:
    """Write this project's weights in the authors' format: ``dst/pytorch_model.bin`` (a plain state dict with
    their key names, :func:`project_to_authors`) and ``dst/config.json`` (:func:`authors_config_from`), the
    layout their ``from_pretrained(dst)`` reads. Keys with no place in their format (fine-tuning heads) raise
    ValueError. Returns a summary: the directory and the number of tensors written."""
    theirs = project_to_authors(state_dict, model_cfg)
    os.makedirs(dst, exist_ok=True)
    weights, config = os.path.join(dst, "pytorch_model.bin"), os.path.join(dst, "config.json")
    tmp = f"{weights}.tmp{os.getpid()}"
    torch.save({k: v.detach().to("cpu").contiguous() for k, v in theirs.items()}, tmp)
    os.replace(tmp, weights)
    atomic_write_json(config, authors_config_from(model_cfg))
    return {"out": dst, "tensors": len(theirs)}


def split_state(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, torch.Tensor]]]:
    """Canonical state dict -> (backbone state dict, {head name: head state dict})."""
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    heads: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if k.startswith("heads."):
            name, rest = k[len("heads."):].split(".", 1)
            heads.setdefault(name, {})[rest] = v
    return backbone, heads


def _read_checkpoint(src: str) -> Any:
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{src}: checkpoint not found") from None
    except Exception as e:  # the restricted unpickler raises UnpicklingError/RuntimeError with varying text
        raise ConfigError(
            f"{src}: cannot be read as plain tensors and dicts (torch.load(weights_only=True) failed: "
            f"{str(e).splitlines()[0]}). Re-save it as a dict of tensors, e.g. "
            f"torch.save(model.state_dict(), path), with the config as a JSON file next to it.") from None


def convert_original(src: str, dst: str, config: Optional[str] = None, strict: bool = True) -> ConversionReport:
    """Convert the authors' checkpoint at ``src`` (.pt/.bin, or a directory holding ``pytorch_model.bin``)
    into this project's portable checkpoint ``dst/model.safetensors`` + ``dst/config.json``.

    ``src`` holds a raw state dict, or a dict with ``state_dict`` and ``config``. The config is taken from
    that dict, else from ``config`` (a JSON path), else from ``config.json`` next to ``src``. With
    ``strict`` (default), missing, unexpected or mis-shaped keys raise ConfigError listing them.
    """
    if os.path.isdir(src):
        src = os.path.join(src, "pytorch_model.bin")
    obj = _read_checkpoint(src)
    if not isinstance(obj, dict):
        raise ConfigError(f"{src}: expected a state dict or a dict with 'state_dict', got {type(obj).__name__}")
    authors_config = None
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        authors_config = obj.get("config")
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{src}: entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    if authors_config is None:
        path = config or os.path.join(os.path.dirname(os.path.abspath(src)), "config.json")
        authors_config = read_json(path, path, f" (the checkpoint {src} holds no config: pass the authors' "
                                               f"config.json with --config)")
    if not isinstance(authors_config, Mapping):
        raise ConfigError(f"{src}: 'config' must be a dict of the authors' config fields")
    state, model_cfg, report = authors_to_project(obj, authors_config)
    if strict and not report.ok:
        raise ConfigError(f"{src}: conversion is incomplete:\n{report.summary()}")
    save_weights(dst, state, RunConfig(model=model_cfg))
    return report


@torch.no_grad()
def original_outputs(checkpoint: Mapping[str, Any], inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The eight outputs of the authors' fixture, computed by this project's model (eval mode, fp32).

    ``checkpoint``: ``{"state_dict": authors' keys, "config": authors' config}``. ``inputs`` in their layout:
    ``input_ids_a``/``attention_mask_a``/``token_type_ids_a`` ``[B, Lt]``; ``input_ids_b``/``token_type_ids_b``
    ``[B, Lg]``; ``attention_mask_b`` ``[B, Lg+Lr]`` (tags then regions); ``img_feats`` ``[B, Lr, F]``.
    Returns ``text_encoder [B,Lt,H]``, ``visual_encoder [B,Lg+Lr,H]``, ``cross_encoder [B,Lt+Lr,H]``,
    ``pooled [B,H]``, ``similarity [B,B]`` (cosine, text x image), ``mlm_logits [B,Lt,V_w]``,
    ``mcr_logits [B,Lg,V_w]``, ``itm_logits [B,2]`` in **their** convention (index 0 = match).
    """
    state, cfg, report = authors_to_project(checkpoint["state_dict"], checkpoint["config"])
    if not report.ok:
        raise ConfigError(f"checkpoint does not convert cleanly:\n{report.summary()}")
    if bool((inputs["token_type_ids_a"] != 0).any()) or bool((inputs["token_type_ids_b"] != 1).any()):
        raise ValueError("token_type_ids_a must be all 0 and token_type_ids_b all 1 (MVPTR.md section 2)")
    backbone_sd, head_sds = split_state(state)
    model = MVPTRModel(cfg).eval()
    model.load_state_dict(backbone_sd, strict=True)
    heads = {"mlm": MaskedTokenHead(cfg), "mcr": MaskedTokenHead(cfg), "itm": ITMHead(cfg)}
    for name, head in heads.items():
        head.load_state_dict(head_sds[name], strict=True)
        head.eval()
    text_ids, text_mask = inputs["input_ids_a"], inputs["attention_mask_a"].bool()
    tag_ids = inputs["input_ids_b"]
    lg = tag_ids.shape[1]
    tag_mask, region_mask = inputs["attention_mask_b"][:, :lg].bool(), inputs["attention_mask_b"][:, lg:].bool()
    feats = inputs["img_feats"].float()
    if feats.shape[1] != region_mask.shape[1]:
        raise ValueError(f"img_feats has {feats.shape[1]} regions but attention_mask_b covers "
                         f"{region_mask.shape[1]} after the {lg} tags")
    text = model.encode_text(text_ids, text_mask)
    visual = model.encode_visual(tag_ids, tag_mask, feats, region_mask)
    cross = model.encode_cross(text, text_mask, visual[:, lg:], region_mask)
    pooled = model.pool(cross)
    return {
        "text_encoder": text,
        "visual_encoder": visual,
        "cross_encoder": cross,
        "pooled": pooled,
        "similarity": model.embed_text(text) @ model.embed_visual(visual).T,  # (B_text, B_image)
        "mlm_logits": heads["mlm"](cross[:, :text.shape[1]]),
        "mcr_logits": heads["mcr"](visual[:, :lg]),
        "itm_logits": heads["itm"](pooled).flip(-1),  # ours: 1 = match -> theirs: 0 = match
    }
