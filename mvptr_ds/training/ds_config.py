"""DeepSpeed config: a JSON template (ZeRO stage, precision, offload, DeepSpeed's own features) merged with the
typed config, and parsed by DeepSpeed itself before any process group exists.

Batch sizes, accumulation, clipping and precision have one source, ``TrainConfig``. A template may omit them
(ours do); if it sets one, it must agree with the typed config, otherwise the run stops with a message naming
the key. The optimizer and scheduler are built by mvptr_ds (AdamW with the release's decay groups, linear
warm-up/decay), so ``optimizer``/``scheduler`` blocks in a template are refused.

Anything else DeepSpeed understands may be in a template (``autotuning``, ``flops_profiler``,
``wall_clock_breakdown``, ``tensor_parallel``, ``comms_logger``, ...). DeepSpeed's own parser is the schema
(:func:`check_with_deepspeed`): a top-level key it never reads, a key its pydantic models refuse inside a block
(``zero_optimization.overlap_com``) or a value it refuses is one error line, before any process starts work.
DeepSpeed's monitors: ``tensorboard`` and ``csv_monitor`` write their own files beside the project's logs (under
``<output_dir>/monitor`` unless the block names an ``output_path``); its ``wandb`` monitor is refused: it would
log into the project's W&B run at its own step numbers, and W&B would drop the project's metrics.
"""
from __future__ import annotations

import collections.abc
import copy
import difflib
import importlib.util
import json
import logging
import os
from typing import Any, Dict, List

from mvptr_ds import ds_configs
from mvptr_ds.config import ConfigError, TrainConfig
from mvptr_ds.config_types import read_json

# Keys this module reads itself before DeepSpeed does: their values must be objects.
_OBJECT_KEYS = ("zero_optimization", "bf16", "bfloat16", "fp16")
_REJECTED = {
    "optimizer": "the optimizer is built by mvptr_ds (AdamW, decay groups); set --lr instead",
    "scheduler": "the schedule is built by mvptr_ds (linear warm-up/decay); set --warmup_steps instead",
}
MONITOR_DIR = "monitor"
_MONITOR_PACKAGES = {"tensorboard": "tensorboard", "comet": "comet_ml"}


def read_template(path: str) -> Dict[str, Any]:
    """The template ``path`` names (a JSON file, or a shipped template's name: ``mvptr_ds.ds_configs.resolve``)."""
    path = ds_configs.resolve(path)
    d = read_json(path, f"--ds_config {path}")
    if not isinstance(d, dict):
        raise ConfigError(f"--ds_config {path}: expected a JSON object at the top level")
    for key in (k for k in _OBJECT_KEYS if k in d):
        if not isinstance(d[key], dict):
            hint = f' (e.g. "{key}": {{"enabled": true}})' if key != "zero_optimization" else ""
            raise ConfigError(f"--ds_config {path}: field {key!r} must be an object, got {json.dumps(d[key])}{hint}")
    for key in ("bf16", "bfloat16", "fp16"):
        enabled = d.get(key, {}).get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"--ds_config {path}: field '{key}.enabled' must be true or false, got "
                              f"{json.dumps(enabled)}")
    return d


def template_precision(template: Dict[str, Any]) -> str:
    """The precision a template asks for: "bf16", "fp16" or "fp32"."""
    bf16 = template.get("bf16", template.get("bfloat16", {})).get("enabled", False)
    fp16 = template.get("fp16", {}).get("enabled", False)
    if bf16 and fp16:
        raise ConfigError("ds_config enables both bf16 and fp16")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def check_device_precision(precision: str, path: str) -> None:
    """ConfigError when DeepSpeed's accelerator of this process cannot train in ``precision`` (DeepSpeed's own
    check, made before any process group exists): its CPU accelerator has no fp16, for instance."""
    if precision == "fp32":
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp16": accelerator.is_fp16_supported(), "bf16": accelerator.is_bf16_supported(), "fp32": True}
    if not supported[precision]:
        others = " or ".join(p for p in ("bf16", "fp16", "fp32") if p != precision and supported[p])
        raise ConfigError(f"precision {precision} (--precision, or enabled by --ds_config {path}) is not supported by "
                          f"DeepSpeed's {accelerator.device_name()} accelerator; use {others} (--precision, with a "
                          f"ds_config that does not enable {precision})")


def build_ds_config(path: str, train: TrainConfig, world_size: int, check_device: bool = True) -> Dict[str, Any]:
    """Read the template at ``path`` and merge the typed training settings into it.

    Raises ConfigError naming the offending key when the template is invalid or disagrees with ``train``, and
    (``check_device``) when this process's accelerator cannot train in ``train.precision``.
    """
    template = read_template(path)
    for key in template:
        if key in _REJECTED:
            raise ConfigError(f"--ds_config {path}: key {key!r} is not allowed: {_REJECTED[key]}")
    ds_wandb = template.get("wandb")
    if isinstance(ds_wandb, dict) and ds_wandb.get("enabled"):
        raise ConfigError(f"--ds_config {path}: DeepSpeed's \"wandb\" monitor would log into this run's W&B run at "
                          f"its own step numbers (W&B then drops the run's metrics); remove the block and use --wandb "
                          f"online|offline (with --wandb_project, --wandb_group, --run_name)")
    zero = template.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--ds_config {path}: zero_optimization.stage={stage!r}: expected 0, 1, 2 or 3")
    offload = zero.get("offload_optimizer", {}).get("device", "none") if isinstance(
        zero.get("offload_optimizer", {}), dict) else "none"
    if offload not in ("none", "cpu", "nvme"):
        raise ConfigError(f"--ds_config {path}: zero_optimization.offload_optimizer.device={offload!r}")
    if offload != "none" and stage < 2:
        raise ConfigError(f"--ds_config {path}: optimizer offload needs zero_optimization.stage 2 or 3, got {stage}")

    precision = template_precision(template)
    if train.precision != precision and precision != "fp32":
        raise ConfigError(
            f"--precision {train.precision} disagrees with --ds_config {path}, which enables {precision}")
    if check_device:
        check_device_precision(train.precision, path)

    expected = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
    }
    for key, value in expected.items():
        if key in template and template[key] != value:
            raise ConfigError(
                f"--ds_config {path}: {key}={template[key]} disagrees with the run "
                f"(micro batch {train.micro_batch} x accumulation {train.grad_accum} x world size {world_size}"
                f"{'' if key != 'gradient_clipping' else f', clipping {train.grad_clip}'}: expects {value}); "
                f"remove the key from the template or pass matching options")

    cfg = copy.deepcopy(template)
    cfg.update(expected)
    cfg.pop("bfloat16", None)
    cfg["bf16"] = {**template.get("bf16", template.get("bfloat16", {})), "enabled": train.precision == "bf16"}
    cfg["fp16"] = {**template.get("fp16", {}), "enabled": train.precision == "fp16"}
    if train.precision == "fp16":
        cfg["fp16"].setdefault("loss_scale", 0)
        cfg["fp16"].setdefault("initial_scale_power", 16)
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg["zero_allow_untested_optimizer"] = True
    if world_size == 1 and stage in (1, 2) and offload == "none" and train.precision == "fp32":
        set_zero_stage(cfg, 0)  # see ONE_PROCESS_NOTE
    for monitor in ("tensorboard", "csv_monitor"):
        block = cfg.get(monitor)
        if isinstance(block, dict) and block.get("enabled") and not block.get("output_path"):
            cfg[monitor] = {**block, "output_path": os.path.join(os.path.abspath(train.output_dir), MONITOR_DIR)}
    for monitor, package in _MONITOR_PACKAGES.items():  # DeepSpeed would fail at engine start, on every rank
        block = cfg.get(monitor)
        if isinstance(block, dict) and block.get("enabled") and importlib.util.find_spec(package) is None:
            raise ConfigError(f"--ds_config {path}: the {monitor!r} monitor needs the {package} package (pip install "
                              f"{package}), which is not installed")
    check_with_deepspeed(cfg, path)
    return cfg


class _ReadKeys(dict):
    """A config dict that records which of its keys are asked for (``get``, ``[]``, ``in``, ``in keys()``)."""

    def __init__(self, d: Dict[str, Any], read: List[str]):
        super().__init__(d)
        self.read = read

    def _note(self, key):
        self.read.append(key)
        return key

    def get(self, key, *default):
        return super().get(self._note(key), *default)

    def __getitem__(self, key):
        return super().__getitem__(self._note(key))

    def __contains__(self, key):
        return super().__contains__(self._note(key))

    def keys(self):
        return _ReadKeysView(self)


class _ReadKeysView(collections.abc.KeysView):
    def __contains__(self, key):
        return key in self._mapping


def check_with_deepspeed(cfg: Dict[str, Any], path: str) -> None:
    """Parse ``cfg`` with DeepSpeed's own ``DeepSpeedConfig`` (its pydantic models included), in this process,
    before any process group exists. ConfigError, one line naming the key, for a top-level key DeepSpeed never
    asks for (so ignores), a key one of its models refuses inside a block, or a value DeepSpeed refuses."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as ds_logger

    # A copy (DeepSpeed fills defaults into nested blocks), without the batch size it checks against world size 1.
    probe = {k: copy.deepcopy(v) for k, v in cfg.items() if k != "train_batch_size"}
    read: List[str] = []
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)
    try:
        DeepSpeedConfig(_ReadKeys(probe, read))
    except pydantic.ValidationError as e:
        raise ConfigError(f"--ds_config {path}: {_schema_error(e, read[-1] if read else '')}") from None
    except Exception as e:  # DeepSpeed's own checks: DeepSpeedConfigError, AssertionError, ValueError, TypeError
        key = read[-1] if read else None
        if isinstance(e, (TypeError, AttributeError)) and key in cfg and not isinstance(cfg[key], dict):
            raise ConfigError(f"--ds_config {path}: field {key!r} must be an object, got "
                              f"{json.dumps(cfg[key])}") from None
        where = f" the {key!r} setting" if key else ""
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--ds_config {path}: DeepSpeed refuses{where}: {message}") from None
    finally:
        ds_logger.setLevel(level)
    for key in cfg:
        if key not in read:
            close = difflib.get_close_matches(key, sorted(set(read)), n=1)
            raise ConfigError(f"--ds_config {path}: unknown key {key!r} (DeepSpeed does not read it"
                              + (f"; did you mean {close[0]!r}?)" if close else ")"))


def _schema_error(error, block: str) -> str:
    """One line for the first problem a DeepSpeed pydantic model found in ``block``, with a suggestion for a
    misspelt key."""
    first = error.errors()[0]
    loc = ".".join(str(x) for x in (block, *first["loc"]) if x != "")
    line = f"{loc}: {first['msg']} (DeepSpeed's {error.title})"
    if first["type"] == "extra_forbidden" and len(first["loc"]) == 1:
        close = difflib.get_close_matches(str(first["loc"][0]), _model_keys(error.title), n=1)
        if close:
            line += f"; did you mean {block + '.' if block else ''}{close[0]}?"
    return line


def _model_keys(title: str) -> List[str]:
    """The field names and aliases of DeepSpeed's config model called ``title``."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo, keys = [DeepSpeedConfigModel], []
    while todo:
        model = todo.pop()
        todo.extend(model.__subclasses__())
        if model.__name__ == title:
            for name, f in model.model_fields.items():
                keys += [name] + ([f.alias] if f.alias else [])
    return keys


# ZeRO-1/2 partition optimizer state and gradients across ranks; one process has nothing to partition, and
# DeepSpeed's flat-partition bookkeeping (gradient copies into buckets, per-tensor overflow and norm passes,
# fp32 master copies) then costs more than the update itself: at the paper's size on a 2-core CPU the
# optimizer phase took several times the plain fused AdamW. One fp32 process therefore runs stage 0 (the same
# fused AdamW, with clipping and the non-finite guard of ``guard.guard_client_optimizer``). bf16/fp16 runs,
# ZeRO-3 and offloading templates are kept as given (at stage 0 DeepSpeed would wrap a half-precision run in
# another optimizer and export bf16-rounded weights).
ONE_PROCESS_NOTE = "one process: ZeRO stage {stage} of {path} partitions nothing here; running stage 0 (same update)"


def stage_note(path: str, cfg: Dict[str, Any]) -> str:
    """The log line for a one-process run whose template's ZeRO stage was set to 0, else ""."""
    asked = read_template(path).get("zero_optimization", {}).get("stage", 0)
    one_process = cfg.get("train_batch_size") == cfg.get("train_micro_batch_size_per_gpu", 0) * cfg.get(
        "gradient_accumulation_steps", 1)
    return ONE_PROCESS_NOTE.format(stage=asked, path=path) if one_process and asked != zero_stage(cfg) else ""


def precision_warning(precision: str, device_type: str) -> str:
    """A warning line when bf16 is asked for on a CPU without bf16 instructions (avx512_bf16 or AMX), else "".

    Measured on an AVX2-only CPU (BENCHMARKS.md): a base-size bf16 step took about 38x the fp32 one.
    """
    if precision != "bf16" or device_type != "cpu":
        return ""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, name, lambda: True)() for name in probes):
        return ""
    return ("warning: --precision bf16 on a CPU without bf16 instructions (no avx512_bf16 or AMX): bf16 kernels "
            "run emulated here, many times slower than fp32 (see BENCHMARKS.md); use --precision fp32 on this CPU")


def set_zero_stage(cfg: Dict[str, Any], stage: int) -> None:
    """Set ``zero_optimization.stage`` of a built config (its other ZeRO keys are ignored by DeepSpeed at 0)."""
    zero = dict(cfg.get("zero_optimization", {}))
    zero["stage"] = stage
    cfg["zero_optimization"] = zero


def zero_stage(ds_config: Dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: Dict[str, Any]) -> bool:
    off = ds_config.get("zero_optimization", {}).get("offload_optimizer", {})
    return isinstance(off, dict) and off.get("device", "none") not in ("none", None)
