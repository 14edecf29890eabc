"""From the options given on the command line to the validated ``RunConfig`` of a training command.

Layers, later wins: the dataclass defaults (or a ``--config`` file) with the ``--model`` preset or file,
``--recipe``, the command's own defaults (``finetune``: the task's release settings, when no ``--config`` is
given), the options given, and what the command fixes (``finetune``: stage 2). ``given`` maps ``section.field``
(and ``sources.*``) to parsed values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

from mvptr_ds.config import (DEFAULT_MODEL, FINETUNE_TASKS, MODEL_PRESETS, RECIPES, TASK_MODEL_DEFAULTS,
                             TASK_TRAIN_DEFAULTS, ConfigError,
                             EvalConfig, RunConfig, TrainConfig, apply_recipe, model_config_from)
from mvptr_ds.config_types import option

SECTIONS = ("model", "data", "objectives", "train", "eval")


@dataclass(frozen=True)
class Sources:
    """Where a training command's settings start from (command line only; ``config.json`` keeps the result)."""

    config: Optional[str] = option(
        None, "A run config.json (e.g. an earlier run's): the options not given keep its values.", short="-c",
        metavar="PATH")
    model: str = option(
        DEFAULT_MODEL, f"Model preset ({', '.join(MODEL_PRESETS)}; base is the paper's) or a JSON file of model "
        "settings; with --config and no --model: the config's model.", metavar="NAME|PATH")
    recipe: Optional[str] = option(
        None, f"Named settings ({', '.join(RECIPES)}) applied over the defaults or --config before the options "
        "given: release is the authors' released code exactly, project the defaults (README, recipes).")


def run_config(given: Dict[str, Any], preset: Optional[Dict[str, Any]] = None,
               fixed: Optional[Dict[str, Any]] = None) -> RunConfig:
    """The validated RunConfig: defaults or ``--config`` with ``--model``, ``--recipe``, ``preset`` (only without ``--config``),
    the options ``given``, then ``fixed``; keys are ``section.field``."""
    from mvptr_ds import ds_configs
    from mvptr_ds.training.ds_config import read_template, template_precision

    config_file = given.get("sources.config")
    base = RunConfig.load(config_file) if config_file else RunConfig()
    if "sources.model" in given or not config_file:
        base = dataclasses.replace(base, model=model_config_from(given.get("sources.model", DEFAULT_MODEL)))
    if given.get("sources.recipe") is not None:
        base = apply_recipe(base, given["sources.recipe"])
    layers = {**({} if config_file else dict(preset or {})), **_settings(given), **dict(fixed or {})}
    train = base.train
    if "train.stage" in layers and layers["train.stage"] != train.stage and "objectives.names" not in layers:
        layers["objectives.names"] = ()  # another stage than the config's: that stage's own objectives
    ds_path = ds_configs.resolve(layers.get("train.ds_config", train.ds_config))
    layers["train.ds_config"] = ds_path
    if "train.precision" not in layers and (not config_file or "train.ds_config" in given):
        layers["train.precision"] = template_precision(read_template(ds_path))
    return _replace(base, layers).validate()


def _settings(given: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in given.items() if k.split(".")[0] in SECTIONS}


def _replace(cfg: RunConfig, layers: Dict[str, Any]) -> RunConfig:
    sections = {}
    for key, value in layers.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in sections.items()})


# What --help shows as the defaults that depend on other options (run_config computes them).
DEFAULT_TEXTS = {"train.precision": "what --ds_config enables, else fp32"}


def pretraining_config(given: Dict[str, Any]) -> RunConfig:
    return run_config(given)


def finetune_defaults(task: str) -> Dict[str, Any]:
    """The ``finetune`` settings of ``task`` that differ from pre-training's (without ``--config``)."""
    return ({f"train.{k}": v for k, v in TASK_TRAIN_DEFAULTS[task].items()}
            | {f"model.{k}": v for k, v in TASK_MODEL_DEFAULTS[task].items()}
            | {"train.output_dir": f"runs/finetune_{task}"})


def finetune_default_texts() -> Dict[str, str]:
    """What ``finetune --help`` shows as the defaults that depend on ``--task``."""
    def per_task(name):
        values = {t: TASK_TRAIN_DEFAULTS[t].get(name, getattr(TrainConfig, name)) for t in FINETUNE_TASKS}
        return "the task's: " + ", ".join(f"{t} {v}" for t, v in values.items())
    return {**DEFAULT_TEXTS, "train.lr": per_task("lr"), "train.weight_decay": per_task("weight_decay"),
            "train.output_dir": "runs/finetune_TASK"}


def finetune_config(given: Dict[str, Any]) -> RunConfig:
    """The RunConfig of ``finetune``: stage 2, the task from ``--task`` (or ``--config``), its release defaults;
    retrieval trains VSC and ITM, the other tasks their head's loss."""
    task = given.get("eval.finetune_task")
    if task is None and given.get("sources.config"):
        task = RunConfig.load(given["sources.config"]).eval.finetune_task
    if task not in FINETUNE_TASKS:
        raise ConfigError(f"--task {task!r}: expected one of {', '.join(FINETUNE_TASKS)}" if task is not None else
                          f"finetune needs --task ({', '.join(FINETUNE_TASKS)})")
    fixed = {"train.stage": 2, "eval.finetune_task": task,
             "objectives.names": ("vsc", "itm") if task == "retrieval" else ()}
    return run_config(given, preset=finetune_defaults(task), fixed=fixed)


def eval_config(given: Dict[str, Any]) -> EvalConfig:
    """EvalConfig with the ``eval.*`` options given (``evaluate``, ``embed``), validated."""
    cfg = dataclasses.replace(EvalConfig(), **{k.split(".", 1)[1]: v for k, v in given.items()
                                               if k.startswith("eval.")})
    cfg.validate()
    return cfg
