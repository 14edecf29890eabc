"""Command line of mvptr_ds (Fire). Pre-training is the default command.

    python -m mvptr_ds.run --stage 1 --model tiny              # one process, no launcher needed
    deepspeed --num_gpus 2 mvptr_ds/run.py --stage 2            # DeepSpeed launcher
    python -m mvptr_ds.run COMMAND --help                      # other commands, see COMMANDS below

Commands only translate options into the typed config and call the function that does the work.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does this): import the package, not siblings
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.path.insert(0, _root)

import dataclasses
from typing import Optional, Sequence, Union

from mvptr_ds.config import (ConfigError, DataConfig, ModelConfig, ObjectiveConfig, RunConfig, TrainConfig,
                             model_config_from)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(stage: Optional[int] = None,
          objectives: Optional[Union[str, Sequence[str]]] = None,
          model: Optional[str] = None,
          data: Optional[str] = None,
          ds_config: Optional[str] = None,
          output_dir: Optional[str] = None,
          max_steps: Optional[int] = None,
          micro_batch: Optional[int] = None,
          grad_accum: Optional[int] = None,
          lr: Optional[float] = None,
          warmup_steps: Optional[int] = None,
          save_every: Optional[int] = None,
          log_every: Optional[int] = None,
          keep_last: Optional[int] = None,
          resume: Optional[str] = None,
          init_from: Optional[str] = None,
          seed: Optional[int] = None,
          wandb: Optional[str] = None,
          wandb_project: Optional[str] = None,
          wandb_group: Optional[str] = None,
          run_name: Optional[str] = None,
          precision: Optional[str] = None,
          kernels: Optional[str] = None,
          tokenizer: Optional[str] = None,
          global_negatives: Optional[bool] = None,
          itm_negatives: Optional[str] = None,
          wpg_negatives: Optional[str] = None,
          loss_weights: Optional[str] = None,
          max_bad_steps: Optional[int] = None,
          stop_after: Optional[int] = None,
          config: Optional[str] = None,
          local_rank: Optional[int] = None):
    """Pre-train MVPTR (the default command).

    Args:
        stage: (default {stage}) 1 = uni-modal encoders only, masked concept recovering (the cross-modal encoder is not run);
            2 = the whole model with VSC, ITM, MLM, WPG and MCR (the released recipe).
        objectives: comma list out of mcr,vsc,itm,mlm,wpg; default: the stage's (1: mcr; 2: all five).
        model: preset name (tiny, base) or the path of a JSON file of model settings; default: tiny
            (the model of --config when one is given). Use base for the paper's model.
        data: "synthetic" (built-in scene world; "synthetic:seed=3,images=200,captions_per_image=2"),
            or a data directory in the real formats (see README).
        ds_config: DeepSpeed template (ZeRO stage, precision, offload; default {ds_config}); batch sizes and lr
            come from the options.
        output_dir: run folder: config.json, metrics.jsonl, checkpoints/, final/, wandb/ (default {output_dir}).
        max_steps: optimizer steps to train for (default {max_steps}).
        micro_batch: examples per rank per forward pass (default {micro_batch}).
        grad_accum: micro batches per optimizer step (default {grad_accum}).
        lr: peak learning rate of AdamW (default {lr}).
        warmup_steps: linear warm-up steps, then linear decay to 0 at max_steps (default {warmup_steps}).
        save_every: checkpoint every N steps (and at the end; default {save_every}).
        log_every: log metrics every N steps (default {log_every}).
        keep_last: keep the newest K checkpoints (default {keep_last}).
        resume: "auto" (newest complete checkpoint in output_dir, if any), "none", or a checkpoint path.
        init_from: initial weights (e.g. a stage-1 run or its final/ folder); new weights are reported by name.
        seed: seed of weights, data order, corruption and dropout (default {seed}).
        wandb: offline (default, unless WANDB_MODE says otherwise; no network), online or disabled.
        wandb_project: W&B project (default: WANDB_PROJECT, else mvptr_ds).
        wandb_group: W&B run group (default: WANDB_RUN_GROUP, else none).
        run_name: W&B run name (default: WANDB_NAME, else the output folder's name).
        precision: fp32, bf16 or fp16; default: what the ds_config enables, else fp32.
        kernels: auto (fused Triton kernels on CUDA, PyTorch elsewhere), triton or torch.
        tokenizer: local Hugging Face tokenizer directory for real data (BERT uncased).
        global_negatives: contrastive and ITM negatives from all ranks (beyond the release; off by default).
        itm_negatives: "hardest" in-batch negative (the release; default {itm_negatives}), "sampled" in
            proportion to softmax(scale * similarity) (as ALBEF), or "random" among the other images (what a
            model trained from scratch, like the built-in demo's, learns from fastest).
        wpg_negatives: "separate" (the release; default {wpg_negatives}): WPG scores caption i against image
            j on the two positive encodings (a sequence-level shortcut meets the hinge); "joint": on the
            joint cross-modal encoding of (caption i, image j) (one extra pass; phrase grounding learns).
        loss_weights: weights of the objectives' losses, comma-separated without spaces, e.g. "wpg=3" or
            "mlm=0.5,mcr=0.5"; objectives not named weigh 1 (the release weighs all five 1). Replaces the
            weights of --config; a name given twice keeps its last value.
        max_bad_steps: consecutive non-finite batches tolerated before the run stops (default {max_bad_steps}).
        stop_after: leave cleanly after this step with a checkpoint (e.g. a job's time limit); the schedule
            still runs to max_steps when the run is continued with --resume auto.
        config: a run config.json (e.g. from an earlier run): options not given keep its values (otherwise
            the defaults of mvptr_ds/config.py, shown here).
        local_rank: set by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment).
    """
    from mvptr_ds.training.trainer import train as run_training

    options = dict(locals())
    options.pop("local_rank")
    options.pop("run_training")
    run_cfg = pretraining_config(**options)
    result = run_training(run_cfg)
    if result is not None and result.stopped_by:
        return f"stopped by {result.stopped_by} after step {result.steps} (checkpoint saved); resume with --resume auto"
    return None if result is None else f"trained {result.steps} steps; final weights in {result.final_dir}"


def pretraining_config(stage=None, objectives=None, model=None, data=None, ds_config=None, output_dir=None,
                       max_steps=None, micro_batch=None, grad_accum=None, lr=None, warmup_steps=None,
                       save_every=None, log_every=None, keep_last=None, resume=None, init_from=None, seed=None,
                       wandb=None, wandb_project=None, wandb_group=None, run_name=None, precision=None,
                       kernels=None, tokenizer=None, global_negatives=None,
                       itm_negatives=None, wpg_negatives=None, loss_weights=None, max_bad_steps=None,
                       stop_after=None, config=None) -> RunConfig:
    """The validated RunConfig of ``train``'s options: given options override ``config``, else the defaults."""
    from mvptr_ds.training.ds_config import read_template, template_precision

    base = RunConfig.load(config) if config else RunConfig(model=ModelConfig(), data=DataConfig(),
                                                            objectives=ObjectiveConfig(), train=TrainConfig())
    if model is None:
        model_cfg = base.model if config else model_config_from("tiny")
    else:
        model_cfg = model_config_from(str(model))
    if kernels is not None:
        model_cfg = dataclasses.replace(model_cfg, kernels=kernels)
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731 (options given on the line)
    train_over = given(stage=stage, output_dir=output_dir, max_steps=max_steps, micro_batch=micro_batch,
                       grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps, save_every=save_every,
                       log_every=log_every, keep_last=keep_last, resume=resume, init_from=init_from, seed=seed,
                       wandb=wandb, wandb_project=wandb_project, wandb_group=wandb_group, run_name=run_name,
                       max_bad_steps=max_bad_steps, stop_after=stop_after)
    for name, kind in (("stage", int), ("max_steps", int), ("micro_batch", int), ("grad_accum", int),
                       ("warmup_steps", int), ("save_every", int), ("log_every", int), ("keep_last", int),
                       ("seed", int), ("max_bad_steps", int), ("stop_after", int), ("lr", float)):
        if name in train_over:
            if isinstance(train_over[name], bool):  # Fire's reading of "--lr" without a value, or of "--lr -inf"
                raise ConfigError(f"--{name} has no value (a negative value that is not a plain number, such as "
                                  f"-inf, must be written --{name}=VALUE)")
            try:
                train_over[name] = kind(train_over[name])
            except (TypeError, ValueError):
                raise ConfigError(f"--{name} {train_over[name]!r} is not {'an integer' if kind is int else 'a number'}"
                                  " (a value with spaces or a stray word on the command line lands here too)") from None
    for name in ("resume", "wandb", "wandb_project", "wandb_group", "run_name"):
        if name in train_over:
            train_over[name] = str(train_over[name])
    ds_path = resolve_path(ds_config if ds_config is not None else base.train.ds_config)
    if precision is None:
        precision = template_precision(read_template(ds_path)) if (ds_config or not config) else base.train.precision
    names = parse_objectives(objectives) if objectives is not None else (base.objectives.names if config else ())
    if stage is not None and objectives is None and config and int(stage) != base.train.stage:
        names = ()  # another stage: its default objectives, not the config's
    run_cfg = RunConfig(
        model=model_cfg,
        data=dataclasses.replace(base.data, **given(source=data, tokenizer=tokenizer)),
        objectives=dataclasses.replace(base.objectives, names=names,
                                       **given(global_negatives=None if global_negatives is None
                                               else bool(global_negatives),
                                               itm_negatives=None if itm_negatives is None else str(itm_negatives),
                                               wpg_negatives=None if wpg_negatives is None else str(wpg_negatives),
                                               weights=None if loss_weights is None
                                               else parse_loss_weights(loss_weights))),
        train=dataclasses.replace(base.train, ds_config=ds_path, precision=precision, **train_over),
    ).validate()
    return run_cfg


train.__doc__ = train.__doc__.format(**{f.name: getattr(TrainConfig, f.name) for f in dataclasses.fields(TrainConfig)
                                         if not isinstance(getattr(TrainConfig, f.name, None), (list, dict))},
                                      itm_negatives=ObjectiveConfig.itm_negatives,
                                      wpg_negatives=ObjectiveConfig.wpg_negatives)


def parse_loss_weights(value) -> tuple:
    """``"wpg=3,itm=0.5"`` (or Fire's dict/tuple forms) -> ``(("itm", 0.5), ("wpg", 3.0))``.

    Raises ConfigError naming the item when it is malformed or not a number; names and ranges are checked by
    ``ObjectiveConfig.validate``.
    """
    if isinstance(value, dict):
        items = [(str(k).strip().lower(), v) for k, v in value.items()]
    elif isinstance(value, (str, tuple, list)):
        text = value if isinstance(value, str) else ",".join(str(x) for x in value)
        items = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, weight = part.partition("=")
            if not eq:
                raise ConfigError(f"--loss_weights: {part!r} is not NAME=WEIGHT (e.g. wpg=3)")
            items.append((name.strip().lower(), weight))
    else:
        raise ConfigError(f"--loss_weights {value!r}: expected NAME=WEIGHT pairs, e.g. wpg=3,mlm=0.5")
    out = {}
    for name, weight in items:
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"--loss_weights: weight of {name!r} is {weight!r}, not a number") from None
        out[name] = w
    return tuple(sorted(out.items()))


def parse_objectives(value) -> tuple:
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(x).strip().lower() for x in items if str(x).strip())


def resolve_path(path: str) -> str:
    from mvptr_ds import ds_configs

    return ds_configs.resolve(path)


def convert_original(src: str, dst: str, config: Optional[str] = None, strict: bool = True):
    """Convert a checkpoint in the authors' format into this project's (model.safetensors + config.json).

    Args:
        src: the authors' checkpoint: a .pt/.bin file (a state dict, or a dict with state_dict and config),
            or a directory holding pytorch_model.bin.
        dst: output directory of the converted checkpoint.
        config: the authors' model config JSON, when the checkpoint does not carry one and no config.json
            lies next to it.
        strict: stop (and name them) on missing, unexpected or mis-shaped keys; --nostrict converts anyway
            and reports them.
    """
    from mvptr_ds.compat import convert_original as convert

    report = convert(src, dst, config=config, strict=strict)
    print(report.summary())
    return None


def convert_features(tsv: str, out: str, dtype: str = "float16", shard_size: int = 4096):
    """Convert VinVL region features (features.tsv + features.lineidx) into a memory-mapped store.

    Streams with bounded memory and can be re-run after an interruption: it resumes from the last
    complete shard. Read the result with ``mvptr_ds.data.FeatureStore(out)`` or pass the data directory.

    Args:
        tsv: path of features.tsv (rows: image_id, num_boxes, base64 float32[num_boxes x 2054]).
        out: output directory of the store.
        dtype: float16 (default) or float32.
        shard_size: images per shard file.
    """
    from mvptr_ds.data.feature_store import convert_features as convert

    return _summary(convert(tsv, out, dtype=dtype, shard_size=shard_size))


def build_vocab(captions: str, out: str, min_sentences: int = 50, labels: Optional[str] = None,
                tokenizer: Optional[str] = None):
    """Build a concept vocabulary (id2phrase.json) from caption tuples occurring in >= min_sentences captions.

    Args:
        captions: captions JSON/JSONL ({"image_id", "caption", "phrases"?}); tuples are extracted when absent.
        out: output id2phrase.json.
        min_sentences: keep tuples found in at least this many captions (the authors used 50).
        labels: detector label map JSON (VG-SGG-dicts) to widen the extractor's lexicon.
        tokenizer: local Hugging Face tokenizer directory: single-word concepts then reuse its word ids.
    """
    from mvptr_ds.data.concepts import build_vocab as build

    return _summary(build(captions, out, min_sentences=min_sentences, labels=labels, tokenizer=tokenizer))


def extract_concepts(captions: str, vocab: str, out: str, labels: Optional[str] = None):
    """Extract (object), (object, attribute), (subject, relation, object) tuples in the vocabulary, offline.

    Args:
        captions: captions JSON/JSONL.
        vocab: id2phrase.json (e.g. the authors' id2phrase_new.json).
        out: output JSONL with a "phrases" field per caption.
        labels: detector label map JSON (VG-SGG-dicts) to widen the lexicon.
    """
    from mvptr_ds.data.concepts import extract_concepts as extract

    return _summary(extract(captions, vocab, out, labels=labels))


def synth(out: str, data: str = "synthetic", phrases: bool = True):
    """Write the built-in scene world in the real formats (VinVL TSV + lineidx, predictions.tsv,
    captions.jsonl, id2phrase.json, tokenizer/), e.g. to try the real-data path: ``--data OUT``.

    Args:
        out: output directory.
        data: which world: synthetic[:seed=..,images=..,captions_per_image=..].
        phrases: include the concept tuples in captions.jsonl (otherwise they are extracted when read).
    """
    from mvptr_ds.data.export import synth as write

    return _summary(write(out, data=data, phrases=phrases))


def evaluate(checkpoint: str, output: Optional[str] = None, data: Optional[str] = None,
             tasks: Union[str, Sequence[str]] = "retrieval,grounding", rerank_captions: Optional[int] = None,
             rerank_images: Optional[int] = None, batch_size: Optional[int] = None,
             max_images: Optional[int] = None, progress: bool = True, local_rank: Optional[int] = None):
    """Evaluate a checkpoint: coarse-to-fine retrieval (R@1/5/10 both ways) and phrase grounding accuracy.

    Args:
        checkpoint: a final/ export (model.safetensors + config.json), a run directory, or a DeepSpeed
            step<N> checkpoint directory.
        output: JSON file to write (recalls and accuracies in percent, with the chance levels).
        data: default: the checkpoint's training source; the built-in world is evaluated on its held-out
            images, a data directory whole.
        tasks: comma list out of retrieval,grounding.
        rerank_captions: captions per image re-ranked by ITM (default EvalConfig: 128).
        rerank_images: images per caption re-ranked by ITM (default EvalConfig: 64).
        batch_size: evaluation batch size (default EvalConfig: 64).
        max_images: evaluate only the first N images of the split (and their captions).
        progress: progress bars on stderr.
        local_rank: set by the deepspeed launcher; ignored.
    """
    from mvptr_ds.config import EvalConfig
    from mvptr_ds.evaluation.evaluate import evaluate as run_evaluation

    given = {k: int(v) for k, v in dict(rerank_captions=rerank_captions, rerank_images=rerank_images,
                                         batch_size=batch_size).items() if v is not None}
    eval_cfg = dataclasses.replace(EvalConfig(), **given)
    eval_cfg.validate()
    result = run_evaluation(str(checkpoint), data=data, tasks=tasks, output=output, eval_cfg=eval_cfg,
                            max_images=max_images, show_progress=bool(progress))
    if int(os.environ.get("RANK", "0")) == 0:
        _summary({k: v for k, v in result.items() if k in ("retrieval", "grounding")})
    return None


def embed(checkpoint: str, output: str, data: Optional[str] = None, split: str = "held_out",
          limit: Optional[int] = None, batch_size: int = 64):
    """Write uni-modal and cross-modal representations of image-caption pairs to an .npz file.

    Arrays: sample_ids, image_ids, text_embed, visual_embed (contrastive, unit norm), similarity,
    text_cls, visual_cls (uni-modal [CLS] outputs), pooled and itm_score (stage-2 models). From Python:
    ``mvptr_ds.encode(checkpoint, ...)``.

    Args:
        checkpoint: a final/ export, a run directory or a DeepSpeed step<N> checkpoint.
        output: the .npz file to write.
        data: default: the checkpoint's training source.
        split: held_out or train (built-in world); a data directory is read whole.
        limit: only the first N pairs.
        batch_size: pairs per forward pass.
    """
    from mvptr_ds.evaluation.encode import encode

    enc = encode(str(checkpoint), data=data, split=split, limit=limit, batch_size=batch_size, show_progress=True)
    enc.save(output)
    _summary({"output": output, "pairs": int(enc.sample_ids.shape[0]),
              "arrays": {k: list(v.shape) for k, v in enc.arrays().items()}})
    return None


def finetune(task: str, data: Optional[str] = None, eval_data: Optional[str] = None,
             eval_split: Optional[str] = None, model: Optional[str] = None, init_from: Optional[str] = None,
             ds_config: Optional[str] = None, output_dir: Optional[str] = None, max_steps: Optional[int] = None,
             micro_batch: Optional[int] = None, grad_accum: Optional[int] = None, lr: Optional[float] = None,
             weight_decay: Optional[float] = None, warmup_steps: Optional[int] = None,
             save_every: Optional[int] = None, log_every: Optional[int] = None, keep_last: Optional[int] = None,
             resume: Optional[str] = None, seed: Optional[int] = None, wandb: Optional[str] = None,
             precision: Optional[str] = None, kernels: Optional[str] = None, tokenizer: Optional[str] = None,
             eval_batch_size: Optional[int] = None, ref_layer: Optional[int] = None,
             head_dropout: Optional[float] = None, eval_only: bool = False, config: Optional[str] = None,
             local_rank: Optional[int] = None):
    """Fine-tune on a downstream task with the pre-training engine and loop, then evaluate (eval.json).

    Args:
        task: retrieval (VSC + ITM; recalls), vqa (soft accuracy), snli_ve (3-way accuracy) or refcoco
            (accuracy at IoU >= 0.5).
        data: "synthetic[:k=v,..]" (the built-in world's small version of the task) or a data directory
            with the task's files (README, "Fine-tuning").
        eval_data: evaluation data when not the training source's own evaluation split.
        eval_split: split of the evaluation files (default: val for vqa/refcoco, dev for snli_ve; retrieval
            evaluates the whole --eval_data directory).
        model: preset (tiny, base) or JSON; default tiny (the model of --config / --init_from must match).
        init_from: initial weights, e.g. a pre-training run or its final/ folder (the task head is new).
        ds_config: DeepSpeed template (default ds_configs/zero2.json).
        output_dir: run folder (default runs/finetune_TASK).
        max_steps: optimizer steps (default 200).
        micro_batch: examples per rank per forward pass (default 16).
        grad_accum: micro batches per optimizer step (default 1).
        lr: peak learning rate (default: the release's for the task, 4e-5 retrieval, else 5e-5).
        weight_decay: AdamW weight decay (default 0.05 retrieval, else 0.01).
        warmup_steps: linear warm-up steps (default 20).
        save_every: checkpoint every N steps (default 100).
        log_every: log every N steps (default 10).
        keep_last: checkpoints kept (default 3).
        resume: auto, none or a checkpoint path.
        seed: seed of weights, data order and dropout (default 42).
        wandb: offline (default), online or disabled.
        precision: fp32, bf16 or fp16 (default: what the ds_config enables).
        kernels: auto, triton or torch.
        tokenizer: local Hugging Face tokenizer directory for real data.
        eval_batch_size: evaluation batch size (default 64).
        ref_layer: cross-modal layer whose states the referring-expression head reads (default 3).
        head_dropout: dropout before the VQA / SNLI-VE heads (default 0.3).
        eval_only: evaluate the weights of --init_from without training.
        config: a run config.json whose values the options not given keep.
        local_rank: set by the deepspeed launcher; ignored.
    """
    from mvptr_ds.finetune.runner import finetune as run_finetune
    from mvptr_ds.finetune.runner import finetune_config

    options = dict(locals())
    for name in ("local_rank", "run_finetune", "finetune_config", "eval_only"):
        options.pop(name)
    report = run_finetune(finetune_config(**options), eval_only=bool(eval_only))
    if int(os.environ.get("RANK", "0")) == 0:
        _summary(report)
    return None


def bench(*argv: str):
    """Training throughput benchmark: benchmarks/throughput.py with the same options (``bench --help`` lists them).

    Takes its options verbatim (argparse, not Fire): ``python -m mvptr_ds.run bench --device cpu --model tiny``.
    """
    bench_dir = os.path.join(_REPO_ROOT, "benchmarks")
    if not os.path.isfile(os.path.join(bench_dir, "throughput.py")):
        raise ConfigError(f"bench needs the repository's benchmarks/ folder ({bench_dir} not found)")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    import throughput

    throughput.main([str(a) for a in argv])


def _summary(report: dict) -> None:
    import json

    print(json.dumps(report, indent=1, sort_keys=True, default=str))


COMMANDS = {"train": train, "convert_original": convert_original, "convert_features": convert_features,
            "build_vocab": build_vocab, "extract_concepts": extract_concepts, "synth": synth,
            "evaluate": evaluate, "embed": embed, "finetune": finetune, "bench": bench}


def main(argv=None) -> int:
    import errno

    import fire

    from mvptr_ds.data.batching import BatchError
    from mvptr_ds.data.readers import DataError
    from mvptr_ds.training.guard import TrainingStopped
    from mvptr_ds.training.signals import EXIT_INTERRUPTED

    user_errors = (ConfigError, DataError, BatchError, TrainingStopped)
    argv = list(sys.argv[1:] if argv is None else argv)
    # Launchers put --local_rank=N (or --local-rank=N) before the command; LOCAL_RANK is read from the
    # environment instead, so drop it here and let "deepspeed mvptr_ds/run.py COMMAND ..." find the command.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if not argv or argv[0].startswith("-"):
        argv = ["train"] + argv  # pre-training is the default command
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        if argv[0] == "bench":  # argparse options, passed through untouched
            bench(*argv[1:])
            return 0
        fire.Fire(COMMANDS, command=argv, name="mvptr_ds.run")
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C twice in training (signals.Interrupted), or once elsewhere
        print(f"error: {str(e) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {'the disk is full' if e.errno == errno.ENOSPC else 'the disk quota is exceeded'} ({e})",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
