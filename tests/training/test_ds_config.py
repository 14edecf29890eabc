"""DeepSpeed templates are checked by DeepSpeed's own parser (its pydantic models) before any process group
exists: whatever DeepSpeed understands passes, what it would ignore or refuse is one line naming the key; the
keys the typed config owns are still refused when they disagree; its W&B monitor is refused (use --wandb)."""
import importlib.util
import json
import os

import pytest

from mvptr_ds.config import ConfigError, TrainConfig
from mvptr_ds.training.ds_config import MONITOR_DIR, build_ds_config

ZERO2 = {"zero_optimization": {"stage": 2}}


def build(tmp_path, template, world_size=1, **train):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(template))
    return build_ds_config(str(path), TrainConfig(output_dir=str(tmp_path / "run"), **train), world_size,
                           check_device=False)


@pytest.mark.parametrize("extra", [
    {"autotuning": {"enabled": False}}, {"tensor_parallel": {"autotp_size": 1}}, {"data_efficiency": {"enabled": False}},
    {"wall_clock_breakdown": True, "flops_profiler": {"enabled": True, "profile_step": 2}},
    {"comms_logger": {"enabled": True, "verbose": False}}, {"wandb": {"enabled": False}},
])
def test_what_deepspeed_understands_passes(tmp_path, extra):
    cfg = build(tmp_path, {**ZERO2, **extra}, world_size=2)
    assert all(cfg[k] == v for k, v in extra.items())


@pytest.mark.parametrize("template, expected", [
    ({"zero_optimization": {"stage": 2, "overlap_com": True}},
     "zero_optimization.overlap_com: Extra inputs are not permitted (DeepSpeed's DeepSpeedZeroConfig); did you mean "
     "zero_optimization.overlap_comm?"),
    ({"zero_optimisation": {"stage": 2}}, "unknown key 'zero_optimisation' (DeepSpeed does not read it; did you mean "
                                          "'zero_optimization'?)"),
    ({**ZERO2, "comms_logger": {"enabled": True, "verbosee": True}}, "comms_logger.verbosee: Extra inputs"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"devic": "cpu"}}}, "zero_optimization.offload_param.devic"),
    ({**ZERO2, "activation_checkpointing": 3}, "field 'activation_checkpointing' must be an object, got 3"),
    ({**ZERO2, "nebula": {"enabled": True}}, "DeepSpeed refuses the 'nebula' setting: Nebula checkpointing has been "
                                             "removed"),
    ({**ZERO2, "optimizer": {"type": "AdamW"}}, "key 'optimizer' is not allowed"),
    ({**ZERO2, "train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu=3 disagrees with the run"),
])
def test_what_deepspeed_refuses_is_one_line(tmp_path, template, expected):
    with pytest.raises(ConfigError) as e:
        build(tmp_path, template)
    assert expected in str(e.value) and "\n" not in str(e.value) and str(tmp_path / "ds.json") in str(e.value)


def test_deepspeed_wandb_monitor_is_refused_naming_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r'"wandb" monitor .* use --wandb online\|offline'):
        build(tmp_path, {**ZERO2, "wandb": {"enabled": True, "project": "x"}})


def test_file_monitors_write_into_the_run_folder_unless_told(tmp_path):
    cfg = build(tmp_path, {**ZERO2, "csv_monitor": {"enabled": True}})
    assert cfg["csv_monitor"]["output_path"] == os.path.join(str(tmp_path / "run"), MONITOR_DIR)
    cfg = build(tmp_path, {**ZERO2, "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "elsewhere")}})
    assert cfg["csv_monitor"]["output_path"] == str(tmp_path / "elsewhere")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_tensorboard_monitor_without_its_package_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"'tensorboard' monitor needs the tensorboard package \(pip install"):
        build(tmp_path, {**ZERO2, "tensorboard": {"enabled": True}})
