"""Typed configuration: the one place where every default lives.

The CLI (``mvptr_ds/run.py``), the JSON presets, the run folder's ``config.json`` and every checkpoint
share these dataclasses. ``RunConfig.from_dict`` rejects unknown keys and values of the wrong type with
a message that names the key, so a typo never passes silently.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names it."""


def _at_least(owner, section: str, names, low: int) -> None:
    """Each integer field ``names`` of ``owner`` is >= ``low``, else ConfigError naming ``section.name``."""
    for name in names:
        value = getattr(owner, name)
        if value < low:
            raise ConfigError(f"{section}.{name} must be >= {low}, got {value}")


def _in_range(owner, section: str, name: str, low: float, high: float = math.inf, low_open: bool = False,
              high_open: bool = True, what: str = "") -> None:
    """Float field ``name`` of ``owner`` is finite (NaN and inf refused) and in the given interval."""
    value = getattr(owner, name)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        interval = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                    if math.isfinite(high) else f"{'>' if low_open else '>='} {low:g}")
        raise ConfigError(f"{section}.{name}={value!r}: must be a finite number {'in ' if math.isfinite(high) else ''}"
                          f"{interval}{what}")


OBJECTIVES = ("mcr", "vsc", "itm", "mlm", "wpg")
# Objectives each stage can run. Stage 1 has no cross-modal encoder, so only MCR applies.
STAGE_OBJECTIVES = {1: ("mcr",), 2: OBJECTIVES}
DEFAULT_OBJECTIVES = {1: ("mcr",), 2: OBJECTIVES}
PRECISIONS = ("fp32", "bf16", "fp16")
KERNELS = ("auto", "triton", "torch", "eager")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the MVPTR network (MVPTR.md section 1).

    ``vocab_size`` (rows of the shared word/concept/tag table) and ``only_word_size`` (rows below it are
    word pieces; the MLM/MCR decoders predict over them) are properties of the data's tokenizer and
    concept vocabulary: ``None`` means "take them from the data" when the run is assembled.
    """

    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    text_layers: int = 6
    visual_layers: int = 6
    cross_layers: int = 6
    vocab_size: Optional[int] = None
    only_word_size: Optional[int] = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    img_feature_dim: int = 2054
    use_img_layernorm: bool = True
    initializer_range: float = 0.02
    # "auto": fused Triton kernels on CUDA, the PyTorch reference elsewhere; "eager": the authors' way
    # (additive -10000 mask, explicit softmax), kept for the baseline benchmark.
    kernels: str = "auto"
    # Recompute each encoder layer in backward (non-reentrant torch.utils.checkpoint).
    activation_checkpointing: bool = False

    def validate(self) -> None:
        _at_least(self, "model", ("hidden_size", "num_attention_heads", "intermediate_size", "text_layers",
                                  "visual_layers", "cross_layers", "max_position_embeddings", "type_vocab_size",
                                  "img_feature_dim"), 1)
        for name in ("vocab_size", "only_word_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("hidden_dropout", "attention_dropout"):
            _in_range(self, "model", name, 0.0, 1.0, what=" (a dropout probability)")
        _in_range(self, "model", "layer_norm_eps", 0.0, low_open=True)
        _in_range(self, "model", "initializer_range", 0.0, low_open=True)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"model.kernels={self.kernels!r}: expected one of {', '.join(KERNELS)}")
        if self.vocab_size is not None and self.only_word_size is not None:
            if self.only_word_size > self.vocab_size:
                raise ConfigError(
                    f"model.only_word_size={self.only_word_size} exceeds model.vocab_size={self.vocab_size}")


MODEL_PRESETS: Dict[str, ModelConfig] = {
    # CPU demo and tests.
    # No dropout (a tiny model on a small corpus underfits; it does not overfit), and weights initialised at
    # about 1/sqrt(hidden) rather than BERT's 0.02 (tuned for 768): at 0.02 and width 128 every [CLS]
    # output starts as nearly the same vector (cosine 0.9999 across inputs) and VSC stalls at ln(batch).
    "tiny": ModelConfig(hidden_size=128, num_attention_heads=4, intermediate_size=512,
                        text_layers=2, visual_layers=2, cross_layers=2, max_position_embeddings=128,
                        hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.08),
    # The paper's base model: 3 x 6 BERT-base layers.
    "base": ModelConfig(),
}


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they are cut into batches (MVPTR.md section 2)."""

    # "synthetic" or "synthetic:key=value,..." for the built-in scene world; otherwise a data directory.
    source: str = "synthetic"
    # Local Hugging Face tokenizer directory for real data (BERT uncased); unused by the synthetic world.
    tokenizer: Optional[str] = None
    max_seq_length: int = 35       # word pieces of the caption, [CLS]/[SEP] included
    max_phrases: int = 5           # concept ids appended to the text stream
    max_tag_length: int = 20       # visual stream [CLS] tags [SEP]
    max_img_seq_length: int = 50   # regions
    mask_prob: float = 0.15        # MLM / MCR / concept corruption rate (80% [MASK], 10% random, 10% kept)
    num_workers: int = 0
    prefetch_factor: int = 2

    def validate(self) -> None:
        _in_range(self, "data", "mask_prob", 0.0, 1.0, high_open=False, what=" (a probability)")
        for name in ("max_seq_length", "max_tag_length", "max_img_seq_length"):
            if getattr(self, name) < 3:
                raise ConfigError(f"data.{name} must be >= 3, got {getattr(self, name)}")
        _at_least(self, "data", ("max_phrases", "num_workers"), 0)
        _at_least(self, "data", ("prefetch_factor",), 1)


WPG_NEGATIVES = ("joint", "separate")
ITM_NEGATIVES = ("hardest", "sampled", "random")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which losses run and with what weights (MVPTR.md section 3). All weights are 1 in the release."""

    names: Tuple[str, ...] = ()    # empty: the stage's default
    weights: Tuple[Tuple[str, float], ...] = ()
    wpg_margin: float = 0.2
    wpg_topk: int = 3
    # Whose cross-modal states score WPG's negative s(i, j): "separate" reuses the two positive encodings (the
    # release; also what configs written before this option meant), "joint" encodes (caption i, image j)
    # together (one extra cross-modal pass; beyond the release: with "separate" WPG is met by a sequence-level
    # shortcut and grounding does not learn on the built-in world, see objectives/wpg.py).
    wpg_negatives: str = "separate"
    # ITM negatives: "hardest" in-batch (the release), "sampled" with probability softmax(scale * S) over
    # the other images' pairs (as ALBEF: near uniform early, near the hardest once S is sharp), or "random"
    # (uniform over the other images' pairs; what a small model trained from scratch learns from fastest).
    itm_negatives: str = "hardest"
    # Beyond the release, off by default: contrastive negatives and ITM hard negatives from all ranks.
    global_negatives: bool = False
    # Corrections of the release, on by default (``--recipe release`` turns them off):
    # captions of the same image are never each other's negatives (VSC's softmax, ITM's mined negative, WPG's
    # negative image); the release treats every other pair of the batch as a negative, even one showing the
    # same image.
    exclude_same_image: bool = True
    # VSC's temperature e^tau capped at 100 (tau clamped at ln 100, as CLIP); the release leaves it uncapped.
    cap_logit_scale: bool = True

    def weight(self, name: str) -> float:
        return dict(self.weights).get(name, 1.0)

    def validate(self) -> None:
        if self.wpg_negatives not in WPG_NEGATIVES:
            raise ConfigError(f"objectives.wpg_negatives={self.wpg_negatives!r}: expected one of "
                              f"{', '.join(WPG_NEGATIVES)}")
        if self.itm_negatives not in ITM_NEGATIVES:
            raise ConfigError(f"objectives.itm_negatives={self.itm_negatives!r}: expected one of "
                              f"{', '.join(ITM_NEGATIVES)}")
        if self.wpg_topk < 1:
            raise ConfigError(f"objectives.wpg_topk={self.wpg_topk}: must be >= 1")
        _in_range(self, "objectives", "wpg_margin", 0.0)
        for name, weight in self.weights:
            if name not in OBJECTIVES:
                raise ConfigError(f"weight given for unknown objective {name!r}")
            if not 0 <= weight < float("inf"):
                raise ConfigError(f"objectives.weights: weight of {name!r} must be a finite number >= 0, got {weight}")


@dataclass(frozen=True)
class TrainConfig:
    """The training run: engine, schedule, cadence, outputs."""

    stage: int = 2
    output_dir: str = "runs/mvptr"
    ds_config: str = "ds_configs/zero2.json"
    max_steps: int = 200
    micro_batch: int = 16
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 20
    weight_decay: float = 0.01
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 10.0
    precision: str = "fp32"
    save_every: int = 100
    log_every: int = 10
    keep_last: int = 3
    resume: str = "auto"           # "auto" | "none" | a checkpoint directory
    init_from: Optional[str] = None
    seed: int = 42
    # Weights & Biases. None: what the standard variables say (WANDB_MODE, WANDB_PROJECT, WANDB_RUN_GROUP,
    # WANDB_NAME), else offline, project "mvptr_ds", no group, the output folder's name. A resumed run continues
    # the same W&B run (its id is kept in the output folder).
    wandb: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_group: Optional[str] = None
    run_name: Optional[str] = None
    max_bad_steps: int = 5         # consecutive non-finite steps before the run stops
    stop_after: Optional[int] = None  # leave cleanly (with a checkpoint) after this step, e.g. for a job time limit
    # Weight decay on VSC's temperature logit_scale. Off (a correction): decay pulls the learned temperature
    # towards e^0 = 1. The release decays it (its no-decay list names only biases and LayerNorm parameters).
    decay_logit_scale: bool = False
    # torch.use_deterministic_algorithms: the same weights run to run at any fixed thread count. None: on for
    # CPU runs (index_put's accumulating backward otherwise sums in a thread-dependent order), off on CUDA.
    deterministic: Optional[bool] = None

    def validate(self) -> None:
        if self.stage not in STAGE_OBJECTIVES:
            raise ConfigError(f"train.stage={self.stage!r}: expected 1 or 2")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.wandb is not None and self.wandb not in WANDB_MODES:
            raise ConfigError(f"train.wandb={self.wandb!r}: expected one of {', '.join(WANDB_MODES)}")
        _at_least(self, "train", ("max_steps", "micro_batch", "grad_accum", "save_every", "log_every", "keep_last",
                                  "max_bad_steps"), 1)
        _at_least(self, "train", ("warmup_steps",), 0)
        _in_range(self, "train", "lr", 0.0, low_open=True)
        _in_range(self, "train", "weight_decay", 0.0)
        _in_range(self, "train", "adam_eps", 0.0, low_open=True)
        _in_range(self, "train", "grad_clip", 0.0, what=" (0: no clipping)")
        for k, beta in enumerate(self.adam_betas):
            if not 0.0 <= beta < 1.0:  # NaN fails too
                raise ConfigError(f"train.adam_betas[{k}]={beta!r}: must be a finite number in [0, 1)")


TASKS = ("pretrain", "retrieval", "vqa", "snli_ve", "refcoco")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation and downstream-task settings (MVPTR.md section 4)."""

    task: str = "pretrain"         # what the run trains: pre-training or one downstream task
    rerank_captions: int = 128     # retrieval: captions per image re-ranked by ITM
    rerank_images: int = 64        # retrieval: images per caption re-ranked by ITM
    batch_size: int = 64           # evaluation batch size
    num_answers: int = 3129        # VQA answer vocabulary (taken from the data when it says otherwise)
    head_dropout: float = 0.3      # VQA head dropout
    # Fine-tuning (``finetune`` command): evaluation data when it is not the training source's own split
    # (the built-in world's held-out images; a real directory's ``eval_split`` files), the split name
    # (None: the task's usual one, TASK_EVAL_SPLITS) and the cross-modal layer the referring head reads.
    eval_data: Optional[str] = None
    eval_split: Optional[str] = None
    ref_layer: int = 3

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"eval.task={self.task!r}: expected one of {', '.join(TASKS)}")
        for name in ("rerank_captions", "rerank_images", "batch_size", "num_answers", "ref_layer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"eval.head_dropout={self.head_dropout} must be in [0, 1)")


# Fine-tuning settings of the release (MVPTR.md section 4) that differ from TrainConfig's defaults.
TASK_TRAIN_DEFAULTS: Dict[str, Dict[str, float]] = {
    "retrieval": {"lr": 4e-5, "weight_decay": 0.05},
    "vqa": {"lr": 5e-5},
    "snli_ve": {"lr": 5e-5},
    "refcoco": {"lr": 5e-5},
}
# Evaluation split of a task directory (retrieval evaluates the whole --eval_data directory instead).
TASK_EVAL_SPLITS = {"vqa": "val", "snli_ve": "dev", "refcoco": "val"}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def objective_names(self) -> Tuple[str, ...]:
        return self.objectives.names or DEFAULT_OBJECTIVES[self.train.stage]

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.eval.validate()
        self.objectives.validate()
        allowed = STAGE_OBJECTIVES[self.train.stage]
        for name in self.objectives.names:
            if name not in OBJECTIVES:
                raise ConfigError(f"objective {name!r} is unknown: expected some of {', '.join(OBJECTIVES)}")
            if name not in allowed:
                raise ConfigError(
                    f"objective {name!r} needs the cross-modal encoder, which stage {self.train.stage} "
                    f"does not run (stage {self.train.stage} can run: {', '.join(allowed)})")
        if not self.objective_names:
            raise ConfigError("no objective selected")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunConfig":
        return _build(cls, d, "").validate()

    def dump(self, path: str) -> None:
        """Write the resolved config as JSON (atomically: a crash never leaves half a file)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "RunConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read ({_reason(e)})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


# ``--recipe NAME``: a named set of settings applied over the defaults (or a ``--config`` file) before the
# options given on the command line, which win. Each recipe names every setting where the project departs
# from the authors' release, so switching recipes never leaves one behind:
# * "release": the authors' released code exactly: the three corrections off, and each choice that goes
#   beyond the release (WPG's negative encoding, ITM's negatives, global negatives, loss weights, the
#   objectives of the stage) at the release's value.
# * "project" (the defaults): the same, with the corrections on.
# The README's recipe table lists these settings with the reason for each correction.
_RELEASE_CHOICES: Dict[str, Dict[str, Any]] = {
    "objectives": {"names": (), "weights": (), "itm_negatives": "hardest", "wpg_negatives": "separate",
                   "global_negatives": False},
}
RECIPES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "release": {"objectives": {**_RELEASE_CHOICES["objectives"], "exclude_same_image": False,
                               "cap_logit_scale": False},
                "train": {"decay_logit_scale": True}},
    "project": {"objectives": {**_RELEASE_CHOICES["objectives"], "exclude_same_image": True,
                               "cap_logit_scale": True},
                "train": {"decay_logit_scale": False}},
}


def apply_recipe(cfg: RunConfig, name: str) -> RunConfig:
    """``cfg`` with the settings of recipe ``name`` (see ``RECIPES``); ConfigError naming the known recipes."""
    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r}: expected one of {', '.join(RECIPES)}")
    sections = {section: dataclasses.replace(getattr(cfg, section), **values)
                for section, values in RECIPES[name].items()}
    return dataclasses.replace(cfg, **sections)


def model_config_from(spec: str) -> ModelConfig:
    """A preset name (``tiny``, ``base``) or the path of a JSON file of ModelConfig fields."""
    if spec in MODEL_PRESETS:
        return MODEL_PRESETS[spec]
    if spec.endswith(".json") or os.path.sep in spec:
        try:
            with open(spec, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"--model {spec}: file not found (presets: {', '.join(MODEL_PRESETS)})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model {spec}: not valid JSON (line {e.lineno}: {e.msg})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--model {spec}: cannot be read ({_reason(e)})") from None
        if isinstance(d, dict) and "model" in d and isinstance(d["model"], dict):
            d = d["model"]  # a whole run config.json: take its model section
        try:
            model = _build(ModelConfig, d, "model.")
            model.validate()
        except ConfigError as e:
            raise ConfigError(f"--model {spec}: {e}") from None
        return model
    raise ConfigError(f"--model {spec!r}: unknown preset; expected one of {', '.join(MODEL_PRESETS)} or a JSON path")


def _reason(e: BaseException) -> str:
    """The short reason of an OSError / UnicodeDecodeError, for one-line messages."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start}"
    return e.strerror or type(e).__name__


def _build(cls, d: Any, prefix: str):
    """Construct dataclass ``cls`` from a plain dict, recursively, checking keys and types."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in d.items()}
    return cls(**kwargs)


def _coerce(tp, v, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, key + ".")
    if origin is typing.Union:  # Optional[X]
        if v is None:
            return None
        return _coerce([a for a in args if a is not type(None)][0], v, key)
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {v!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], x, key) for x in v)
        if len(args) != len(v):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(v)}")
        return tuple(_coerce(a, x, key) for a, x in zip(args, v))
    if tp is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        raise ConfigError(f"{key}: expected true/false, got {v!r}")
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}: expected an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{key}: expected a string, got {v!r}")
        return v
    return v
