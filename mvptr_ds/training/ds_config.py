"""DeepSpeed config: a small JSON template (ZeRO stage, precision, offload) merged with the typed config.

Batch sizes, accumulation, learning rate, clipping and precision have one source, ``TrainConfig``. A template
may omit them (ours do); if it sets one, it must agree with the typed config, otherwise the run stops with
a message naming the key. The optimizer and scheduler are built by mvptr_ds (AdamW with the release's
decay groups, linear warm-up/decay), so ``optimizer``/``scheduler`` blocks in a template are rejected.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Dict

from mvptr_ds import ds_configs
from mvptr_ds.config import ConfigError, TrainConfig

_KNOWN_TOP_LEVEL = {
    "zero_optimization", "bf16", "fp16", "amp", "steps_per_print", "wall_clock_breakdown", "gradient_clipping",
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "flops_profiler", "activation_checkpointing",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "tensorboard", "wandb", "csv_monitor",
    "comms_logger", "memory_breakdown", "dump_state", "checkpoint", "data_types", "seq_parallel_communication_data_type",
    "timers", "compile", "aio", "elasticity", "monitor_config", "torch_autocast", "bfloat16",
}
# Keys whose value DeepSpeed reads as an object ({...}); anything else there fails deep inside DeepSpeed.
_OBJECT_KEYS = {
    "zero_optimization", "bf16", "bfloat16", "fp16", "amp", "flops_profiler", "activation_checkpointing",
    "tensorboard", "wandb", "csv_monitor", "comms_logger", "checkpoint", "data_types", "compile", "aio",
    "elasticity", "monitor_config", "torch_autocast", "timers",
}
_REJECTED = {
    "optimizer": "the optimizer is built by mvptr_ds (AdamW, decay groups); set --lr instead",
    "scheduler": "the schedule is built by mvptr_ds (linear warm-up/decay); set --warmup_steps instead",
    "sparse_gradients": "DeepSpeed no longer supports sparse_gradients",
}


def read_template(path: str) -> Dict[str, Any]:
    """The template ``path`` names (a JSON file, or a shipped template's name: ``mvptr_ds.ds_configs.resolve``)."""
    path = ds_configs.resolve(path)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--ds_config {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--ds_config {path}: expected a JSON object at the top level")
    for key in sorted(_OBJECT_KEYS & set(d)):
        if not isinstance(d[key], dict):
            hint = f' (e.g. "{key}": {{"enabled": true}})' if key in ("bf16", "bfloat16", "fp16", "amp") else ""
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
        if key not in _KNOWN_TOP_LEVEL:
            raise ConfigError(f"--ds_config {path}: unknown key {key!r}")
    zero = template.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"--ds_config {path}: zero_optimization must be an object")
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
    return cfg


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

    Measured on an AVX2-only CPU (BENCHMARKS.md): a base-size bf16 step took about 27x the fp32 one.
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
