"""Typed configuration: the one place where every default, and every option's description, lives.

The command line (``mvptr_ds/run.py``) generates its options from these dataclasses' fields (declared with
:func:`~mvptr_ds.config_types.option`: default and help text in one place); the JSON presets, the run
folder's ``config.json`` and every checkpoint share them. ``RunConfig.from_dict`` rejects unknown keys and
values of the wrong type with a message that names the key, so a typo never passes silently.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from mvptr_ds.config_types import (ConfigError, at_least, build, in_range, keyword_or_text, name_values, option,
                                   parse_names, read_json)

OBJECTIVES = ("mcr", "vsc", "itm", "mlm", "wpg")
# Objectives each stage can run. Stage 1 has no cross-modal encoder: MCR (the release's stage-1 objective) and
# VSC (it reads only the uni-modal [CLS] embeddings; a contrastive stage 1 is beyond the release) apply.
STAGE_OBJECTIVES = {1: ("mcr", "vsc"), 2: OBJECTIVES}
DEFAULT_OBJECTIVES = {1: ("mcr",), 2: OBJECTIVES}
PRECISIONS = ("fp32", "bf16", "fp16")
KERNELS = ("auto", "triton", "torch", "eager", "flex")
WANDB_MODES = ("offline", "online", "disabled")
WPG_NEGATIVE_ENCODINGS = ("joint", "separate", "shared")
ITM_NEGATIVES = ("hardest", "sampled", "random")
FINETUNE_TASKS = ("retrieval", "vqa", "snli_ve", "refcoco")
RESUME_KEYWORDS = ("auto", "none")
PROVENANCE_KEY = "mvptr_ds"  # config.json of a model folder: {"version", "git_commit", ...} beside the settings
DEFAULT_MODEL = "tiny"  # the model preset of the training commands when neither --model nor --config names one


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the MVPTR network (MVPTR.md section 1); chosen on the command line by ``--model`` (a preset or a
    JSON file of these fields), of which only ``kernels`` and ``activation_checkpointing`` are options."""

    hidden_size: int = option(768, "Width of every encoder layer.", cli=False)
    num_attention_heads: int = option(12, "Attention heads per layer.", cli=False)
    intermediate_size: int = option(3072, "Width of the feed-forward layers.", cli=False)
    text_layers: int = option(6, "Layers of the uni-modal text encoder.", cli=False)
    visual_layers: int = option(6, "Layers of the uni-modal visual encoder.", cli=False)
    cross_layers: int = option(6, "Layers of the cross-modal encoder (stage 2).", cli=False)
    vocab_size: Optional[int] = option(
        None, "Rows of the shared word/concept/tag table; None: taken from the data's tokenizer and concept "
        "vocabulary when the run is assembled.", cli=False)
    only_word_size: Optional[int] = option(
        None, "Rows below it are word pieces (the MLM/MCR decoders predict over them); None: from the data.",
        cli=False)
    max_position_embeddings: int = option(512, "Longest stream the position table holds.", cli=False)
    type_vocab_size: int = option(2, "Token type embeddings.", cli=False)
    layer_norm_eps: float = option(1e-12, "LayerNorm epsilon.", cli=False)
    hidden_dropout: float = option(0.1, "Dropout of hidden states.", cli=False)
    attention_dropout: float = option(0.1, "Dropout of attention probabilities.", cli=False)
    img_feature_dim: int = option(2054, "Region feature size (VinVL: 2048 + 6 box coordinates).", cli=False)
    use_img_layernorm: bool = option(
        True, "LayerNorm after the region projection. On by default (without it the built-in world's recipe "
        "learns far less: BENCHMARKS.md, learnability); the release turns it off in pre-training (--recipe "
        "release) and on in retrieval fine-tuning.", cli=False)
    initializer_range: float = option(0.02, "Standard deviation of the initial weights.", cli=False)
    kernels: str = option(
        "auto", "Attention and embedding kernels: auto (fused Triton kernels on CUDA, PyTorch elsewhere), "
        "triton, torch, eager (the authors' additive -10000 mask and explicit softmax, for the baseline "
        "benchmark), or flex (attention through torch's flex_attention).", metavar="|".join(KERNELS))
    skip_padding: bool = option(
        True, "Compute real positions only: the position-wise parts of every layer on the real tokens, the "
        "cross-modal sequences packed; off, every padded position goes through every layer as in the authors' "
        "code (the baseline benchmark). The outputs at real positions are the same.", cli=False)
    activation_checkpointing: bool = option(
        False, "Recompute each encoder layer in backward (non-reentrant torch.utils.checkpoint): less memory, "
        "about a third more compute.")

    def validate(self) -> None:
        at_least(self, "model", ("hidden_size", "num_attention_heads", "intermediate_size", "text_layers",
                                 "visual_layers", "cross_layers", "max_position_embeddings", "type_vocab_size",
                                 "img_feature_dim"), 1)
        for name in ("vocab_size", "only_word_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("hidden_dropout", "attention_dropout"):
            in_range(self, "model", name, 0.0, 1.0, what=" (a dropout probability)")
        in_range(self, "model", "layer_norm_eps", 0.0, low_open=True)
        in_range(self, "model", "initializer_range", 0.0, low_open=True)
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

    source: str = option(
        "synthetic", 'Training data: "synthetic" (the built-in scene world; options as in '
        '"synthetic:seed=3,images=200,captions_per_image=2") or a data directory in the real formats (README).',
        flag="data", metavar="SOURCE")
    tokenizer: Optional[str] = option(
        None, "Local Hugging Face tokenizer directory for real data (BERT uncased); the built-in world has its "
        "own.", metavar="DIR")
    max_seq_length: int = option(35, "Word pieces of a caption, [CLS] and [SEP] included.")
    max_phrases: int = option(5, "Concept ids appended to the text stream.")
    max_tag_length: int = option(20, "Length of the visual stream's [CLS] tags [SEP].")
    max_img_seq_length: int = option(50, "Regions per image.")
    mask_prob: float = option(
        0.15, "Corruption rate of MLM, MCR and concepts (80% [MASK], 10% random, 10% kept).")
    join_pairs: float = option(
        0.0, "Pre-training with MCR and/or VSC: probability that a training pair is joined with another image's pair "
        "(captions, concepts, tags and regions concatenated; MixGen-style, data/pair_joining.py), drawn anew each "
        "epoch as a function of seed, epoch and index (0: off).")
    num_workers: int = option(0, "DataLoader worker processes per rank.")
    prefetch_factor: int = option(2, "Batches each worker prepares ahead.")

    def validate(self) -> None:
        in_range(self, "data", "mask_prob", 0.0, 1.0, high_open=False, what=" (a probability)")
        in_range(self, "data", "join_pairs", 0.0, 1.0, high_open=False, what=" (a probability)")
        for name in ("max_seq_length", "max_tag_length", "max_img_seq_length"):
            if getattr(self, name) < 3:
                raise ConfigError(f"data.{name} must be >= 3, got {getattr(self, name)}")
        at_least(self, "data", ("max_phrases", "num_workers"), 0)
        at_least(self, "data", ("prefetch_factor",), 1)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which losses run and with what weights (MVPTR.md section 3). All weights are 1 in the release."""

    names: Tuple[str, ...] = option(
        (), f"Comma list out of {','.join(OBJECTIVES)}; empty: the stage's (1: mcr; 2: all five).",
        flag="objectives", parse=parse_names, metavar="LIST")
    weights: Tuple[Tuple[str, float], ...] = option(
        (), 'Loss weights, e.g. "wpg=3" or "mlm=0.5,mcr=0.5" (no spaces); objectives not named weigh 1 (the '
        "release weighs all five 1). Replaces the weights of --config.", flag="loss_weights",
        parse=name_values("--loss_weights", "wpg=3"), metavar="NAME=W,...")
    wpg_margin: float = option(0.2, "Hinge margin of weakly-supervised phrase grounding (WPG).")
    wpg_topk: int = option(3, "Regions each phrase is scored on in WPG.")
    wpg_negative_encoding: str = option(
        "separate", "Whose cross-modal states score WPG's negative (caption i, image j): separate (the release) "
        "reuses the two positive encodings, where a sequence-level shortcut meets the hinge; joint encodes the "
        "pair together (one extra cross-modal pass); shared encodes caption i with the regions of both images in "
        "one sequence, and each phrase's softmax over them must favour image i's (no hinge, margin or top-k; "
        "the best grounding, see objectives/wpg.py).",
        metavar="|".join(WPG_NEGATIVE_ENCODINGS))
    wpg_negatives: str = option(
        "random", "Which image WPG scores as caption i's negative: random, another in-batch pair's (the release); "
        "sampled with probability softmax(scale * similarity) over the other images of the batch (as ITM's "
        "sampled), so that it more often shares objects with image i and the phrases must find the regions "
        "that differ; or hardest, the most similar (this rank's batch in every case).",
        metavar="|".join(ITM_NEGATIVES))
    wpg_temperature: float = option(
        0.1, "Temperature of the phrase-over-regions softmax of --wpg_negative_encoding shared (>= 0.001).")
    itm_negatives: str = option(
        "hardest", "ITM negatives: hardest in-batch (the release); sampled with probability softmax(scale * "
        "similarity) over the other images' pairs (as ALBEF); or random among them (what a small model trained "
        "from scratch, like the built-in demo's, learns from fastest).", metavar="|".join(ITM_NEGATIVES))
    itm_prior: bool = option(
        False, "ITM scores a pair as the head's logit(match) - logit(no match) plus e^tau S, the contrastive "
        "similarity at VSC's temperature (no gradient through it), in training and in re-ranking: the head "
        "learns what the contrastive score misses and re-ranking starts from the coarse ranking (beyond the "
        "release, whose ITM is the head alone).")
    global_negatives: bool = option(
        False, "Contrastive negatives and ITM hard negatives from all ranks (beyond the release).")
    exclude_same_image: bool = option(
        True, "Captions of the same image are never each other's negatives (VSC's softmax, ITM's mined "
        "negative, WPG's negative image); the release treats every other pair of the batch as a negative, even "
        "one showing the same image (a correction of the release; --recipe release turns it off).")
    cap_logit_scale: bool = option(
        True, "VSC's temperature e^tau capped at 100 (tau clamped at ln 100, as CLIP); the release leaves it "
        "uncapped (a correction of the release).")

    def weight(self, name: str) -> float:
        return dict(self.weights).get(name, 1.0)

    def validate(self) -> None:
        if self.wpg_negative_encoding not in WPG_NEGATIVE_ENCODINGS:
            raise ConfigError(f"objectives.wpg_negative_encoding={self.wpg_negative_encoding!r}: expected one of "
                              f"{', '.join(WPG_NEGATIVE_ENCODINGS)}")
        if self.wpg_negatives not in ITM_NEGATIVES:
            raise ConfigError(f"objectives.wpg_negatives={self.wpg_negatives!r}: expected one of "
                              f"{', '.join(ITM_NEGATIVES)}")
        if self.itm_negatives not in ITM_NEGATIVES:
            raise ConfigError(f"objectives.itm_negatives={self.itm_negatives!r}: expected one of "
                              f"{', '.join(ITM_NEGATIVES)}")
        if self.wpg_topk < 1:
            raise ConfigError(f"objectives.wpg_topk={self.wpg_topk}: must be >= 1")
        in_range(self, "objectives", "wpg_margin", 0.0)
        in_range(self, "objectives", "wpg_temperature", 1e-3)
        for name, weight in self.weights:
            if name not in OBJECTIVES:
                raise ConfigError(f"weight given for unknown objective {name!r}")
            if not 0 <= weight < float("inf"):
                raise ConfigError(f"objectives.weights: weight of {name!r} must be a finite number >= 0, got {weight}")


@dataclass(frozen=True)
class TrainConfig:
    """The training run: engine, schedule, cadence, outputs."""

    stage: int = option(
        2, "1: the uni-modal encoders only (the cross-modal encoder is not run), with masked concept recovering "
        "(the release's stage 1) and optionally VSC (--objectives vsc or mcr,vsc); 2: the whole model with VSC, ITM, "
        "MLM, WPG and MCR (the released recipe).")
    output_dir: str = option(
        "runs/mvptr", "Run folder: config.json, metrics.jsonl, checkpoints/, final/, wandb/.", short="-o",
        metavar="DIR")
    ds_config: str = option(
        "zero2", "DeepSpeed template (ZeRO stage, precision, offload): a shipped one by name (zero1, zero2, "
        "zero2_bf16, zero2_fp16, zero2_offload, zero3, zero3_bf16) or a JSON path; batch sizes and lr come "
        "from the options.", metavar="NAME|PATH")
    max_steps: int = option(200, "Optimizer steps to train for.")
    micro_batch: int = option(16, "Examples per rank per forward pass.")
    grad_accum: int = option(1, "Micro batches per optimizer step.")
    lr: float = option(5e-5, "Peak learning rate of AdamW.")
    warmup_steps: int = option(20, "Linear warm-up steps, then linear decay to 0 at max_steps.")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and LayerNorm weights).")
    adam_betas: Tuple[float, float] = option((0.9, 0.999), "AdamW betas.", metavar="B1,B2")
    adam_eps: float = option(1e-8, "AdamW epsilon.")
    grad_clip: float = option(10.0, "Gradient norm clipping (0: none).")
    precision: str = option(
        "fp32", "Training precision (bf16/fp16 blocks of the DeepSpeed config are set from it).",
        metavar="|".join(PRECISIONS))
    save_every: int = option(100, "Checkpoint every N steps (and at the end).")
    log_every: int = option(10, "Log metrics every N steps.")
    keep_last: int = option(3, "Keep the newest K checkpoints.")
    resume: str = option(
        "auto", "auto (the newest complete checkpoint in output_dir, if any), none (start afresh), or a "
        "checkpoint path.", parse=keyword_or_text(RESUME_KEYWORDS), metavar="auto|none|PATH")
    init_from: Optional[str] = option(
        None, "Initial weights: a run, its final/ folder or a checkpoint, or a local Hugging Face BERT folder "
        "(the paper's initialisation: BERT layers 0-5 to the text and visual encoders, 6-11 to the cross-modal "
        "encoder, embeddings, pooler, MLM transform and NSP head; the MLM/MCR decoders cloned from the word "
        "embeddings). What was loaded and what is new is reported by name (init_report.json).", metavar="PATH")
    reset_decoders_on_init: bool = option(
        False, "After --init_from loads a checkpoint, copy the word-embedding rows into the MLM/MCR decoders "
        "again, discarding the checkpoint's decoders, as the release's from_pretrained does (its tie_weights); "
        "off (a correction: trained decoders are kept). Initialising from BERT always does it.")
    seed: int = option(42, "Seed of weights, data order, corruption and dropout.")
    wandb: Optional[str] = option(
        None, "Weights & Biases (offline needs no network); not given: WANDB_MODE, else "
        "offline. A resumed run continues the same W&B run (its id is kept in the output folder).",
        metavar="|".join(WANDB_MODES))
    wandb_project: Optional[str] = option(None, "W&B project; not given: WANDB_PROJECT, else mvptr_ds.")
    wandb_group: Optional[str] = option(None, "W&B run group; not given: WANDB_RUN_GROUP, else none.")
    run_name: Optional[str] = option(None, "W&B run name; not given: WANDB_NAME, else the output folder's name.")
    max_bad_steps: int = option(5, "Consecutive non-finite batches tolerated before the run stops.")
    decay_logit_scale: bool = option(
        False, "Weight decay on VSC's temperature logit_scale; off (a correction): decay pulls the learned "
        "temperature towards e^0 = 1. The release decays it (its no-decay list names only biases and LayerNorm "
        "parameters).")
    stop_after: Optional[int] = option(
        None, "Leave cleanly after this step, with a checkpoint (e.g. a job's time limit); the schedule still "
        "runs to max_steps when the run is continued with --resume auto.")
    deterministic: Optional[bool] = option(
        None, "torch.use_deterministic_algorithms (the same weights run to run at a fixed thread count); not "
        "given: on for CPU runs, off on CUDA.")

    def validate(self) -> None:
        if self.stage not in STAGE_OBJECTIVES:
            raise ConfigError(f"train.stage={self.stage!r}: expected 1 or 2")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.wandb is not None and self.wandb not in WANDB_MODES:
            raise ConfigError(f"train.wandb={self.wandb!r}: expected one of {', '.join(WANDB_MODES)}")
        at_least(self, "train", ("max_steps", "micro_batch", "grad_accum", "save_every", "log_every", "keep_last",
                                 "max_bad_steps"), 1)
        at_least(self, "train", ("warmup_steps",), 0)
        in_range(self, "train", "lr", 0.0, low_open=True)
        in_range(self, "train", "weight_decay", 0.0)
        in_range(self, "train", "adam_eps", 0.0, low_open=True)
        in_range(self, "train", "grad_clip", 0.0, what=" (0: no clipping)")
        for k, beta in enumerate(self.adam_betas):
            if not 0.0 <= beta < 1.0:  # NaN fails too
                raise ConfigError(f"train.adam_betas[{k}]={beta!r}: must be a finite number in [0, 1)")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation and fine-tuning settings (MVPTR.md section 4)."""

    finetune_task: Optional[str] = option(
        None, "The downstream task a finetune run trains (none: pre-training).", flag="task",
        metavar="|".join(FINETUNE_TASKS))
    rerank_captions: int = option(
        128, "Retrieval: captions per image re-ranked by ITM (0: the contrastive ranking alone).")
    rerank_images: int = option(
        64, "Retrieval: images per caption re-ranked by ITM (0: the contrastive ranking alone).")
    batch_size: int = option(64, "Evaluation batch size.", flag="eval_batch_size")
    num_answers: int = option(3129, "VQA answer vocabulary (taken from the data).", cli=False)
    head_dropout: Optional[float] = option(
        None, "Dropout before the task heads; not given: the model's hidden dropout, as the release (which its "
        "fine-tuning sets per task: config.TASK_MODEL_DEFAULTS).")
    eval_data: Optional[str] = option(
        None, "Evaluation data when not the training source's own evaluation split (the built-in world's "
        "held-out images, a data directory's --eval_split files).", metavar="SOURCE")
    eval_split: Optional[str] = option(
        None, "Split of the evaluation files; not given: the task's usual one (val for vqa and refcoco, dev for "
        "snli_ve; retrieval evaluates the whole --eval_data directory).")
    ref_layer: int = option(3, "Cross-modal layer whose states the referring-expression head reads.")

    def validate(self) -> None:
        if self.finetune_task is not None and self.finetune_task not in FINETUNE_TASKS:
            raise ConfigError(f"eval.finetune_task={self.finetune_task!r}: expected one of "
                              f"{', '.join(FINETUNE_TASKS)}")
        at_least(self, "eval", ("rerank_captions", "rerank_images"), 0)
        at_least(self, "eval", ("batch_size", "num_answers", "ref_layer"), 1)
        if self.head_dropout is not None and not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"eval.head_dropout={self.head_dropout} must be in [0, 1)")


# Fine-tuning settings of the release (MVPTR.md section 4) that differ from TrainConfig's defaults.
TASK_TRAIN_DEFAULTS: Dict[str, Dict[str, float]] = {
    "retrieval": {"lr": 4e-5, "weight_decay": 0.05},
    "vqa": {"lr": 5e-5},
    "snli_ve": {"lr": 5e-5},
    "refcoco": {"lr": 5e-5},
}
# Model settings of the release's fine-tuning scripts (run_vqa.py / run_ve.py / run_re.py / run_retrieval.py as its
# README runs them: --drop_out on every BERT dropout; retrieval's --use_img_layernorm 1), applied by the finetune
# command over the model preset unless given. The region LayerNorm of vqa / snli_ve / refcoco follows the model's
# default (on); the release's scripts inherit it from their pre-training config (off): fine-tune a --recipe release
# pre-training with a --model file that sets use_img_layernorm false to match.
TASK_MODEL_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "retrieval": {"hidden_dropout": 0.1, "use_img_layernorm": True},
    "vqa": {"hidden_dropout": 0.3},
    "snli_ve": {"hidden_dropout": 0.1},
    "refcoco": {"hidden_dropout": 0.1},
}
# Evaluation split of a task directory (retrieval evaluates the whole --eval_data directory instead).
TASK_EVAL_SPLITS = {"vqa": "val", "snli_ve": "dev", "refcoco": "val"}


# Config keys renamed since run folders and checkpoints were first written: (section, old name) -> new name.
RENAMED_KEYS: Dict[Tuple[str, str], str] = {("objectives", "wpg_negatives"): "wpg_negative_encoding"}


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
        if self.objectives.itm_prior and self.eval.finetune_task is None and "itm" not in self.objective_names:
            raise ConfigError(f"objectives.itm_prior: changes ITM's score, and this run does not train ITM "
                              f"(objectives: {','.join(self.objective_names)})")
        if self.data.join_pairs:
            self._check_join_pairs()
        return self

    def _check_join_pairs(self) -> None:
        """``--join_pairs`` serves pre-training runs of MCR and/or VSC only."""
        if self.eval.finetune_task is not None:
            raise ConfigError(f"data.join_pairs={self.data.join_pairs}: joins pre-training pairs only; a fine-tuning "
                              f"task's ({self.eval.finetune_task}) examples are never joined")
        paired = [n for n in ("itm", "wpg") if n in self.objective_names]
        if paired:
            raise ConfigError(f"data.join_pairs={self.data.join_pairs} with {' and '.join(paired)}: a joined pair "
                              "keeps its first image's id, so a batch row showing the second image could be drawn as "
                              "its negative; join pairs in a run of mcr and/or vsc (e.g. --stage 1 --objectives vsc)")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunConfig":
        if isinstance(d, dict):  # what wrote a model folder's config.json (training/weights.provenance): no setting
            d = {k: v for k, v in d.items() if k != PROVENANCE_KEY}
            for (section, old), new in RENAMED_KEYS.items():  # configs written before a rename stay readable
                if isinstance(d.get(section), dict) and old in d[section] and new not in d[section]:
                    d[section] = {(new if k == old else k): v for k, v in d[section].items()}
        return build(cls, d, "").validate()

    def dump(self, path: str) -> None:
        """Write the resolved config as JSON (atomically: a crash never leaves half a file)."""
        from mvptr_ds.files import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "RunConfig":
        d = read_json(path, str(path))
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


# ``--recipe NAME``: a named set of settings applied over the defaults (or a ``--config`` file) before the
# options given on the command line, which win. Each recipe names every setting where the project departs
# from the authors' release, so switching recipes never leaves one behind:
# * "release": the authors' released code exactly: the three corrections off, the region LayerNorm off (their
#   pre-training; finetune's retrieval turns it on as theirs does), and each choice that goes beyond the
#   release (WPG's negative encoding and negatives, ITM's negatives and prior, global negatives, loss weights,
#   the objectives of the stage, joined pairs) at the release's value.
# * "project" (the defaults): the same, with the corrections and the region LayerNorm on.
# The README's recipe table lists these settings with the reason for each correction.
_RELEASE_CHOICES: Dict[str, Dict[str, Any]] = {
    "objectives": {"names": (), "weights": (), "itm_negatives": "hardest", "wpg_negative_encoding": "separate",
                   "wpg_negatives": "random", "global_negatives": False, "itm_prior": False},
    "data": {"join_pairs": 0.0},
}
RECIPES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "release": {"model": {"use_img_layernorm": False}, "data": _RELEASE_CHOICES["data"],
                "objectives": {**_RELEASE_CHOICES["objectives"], "exclude_same_image": False,
                               "cap_logit_scale": False},
                "train": {"decay_logit_scale": True, "reset_decoders_on_init": True}},
    "project": {"model": {"use_img_layernorm": True}, "data": _RELEASE_CHOICES["data"],
                "objectives": {**_RELEASE_CHOICES["objectives"], "exclude_same_image": True,
                               "cap_logit_scale": True},
                "train": {"decay_logit_scale": False, "reset_decoders_on_init": False}},
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
        d = read_json(spec, f"--model {spec}", f" (presets: {', '.join(MODEL_PRESETS)})")
        if isinstance(d, dict) and "model" in d and isinstance(d["model"], dict):
            d = d["model"]  # a whole run config.json: take its model section
        try:
            model = build(ModelConfig, d, "model.")
            model.validate()
        except ConfigError as e:
            raise ConfigError(f"--model {spec}: {e}") from None
        return model
    raise ConfigError(f"--model {spec!r}: unknown preset; expected one of {', '.join(MODEL_PRESETS)} or a JSON path")
