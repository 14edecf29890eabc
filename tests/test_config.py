import json

import pytest

from mvptr_ds.config import (MODEL_PRESETS, ConfigError, DataConfig, ModelConfig, ObjectiveConfig, RunConfig,
                             TrainConfig, model_config_from)
from mvptr_ds.training.ds_config import build_ds_config, template_precision


def test_presets_have_the_issue_sizes():
    tiny, base = MODEL_PRESETS["tiny"], MODEL_PRESETS["base"]
    assert (tiny.hidden_size, tiny.num_attention_heads, tiny.intermediate_size) == (128, 4, 512)
    assert (tiny.text_layers, tiny.visual_layers, tiny.cross_layers) == (2, 2, 2)
    assert (base.hidden_size, base.num_attention_heads, base.intermediate_size) == (768, 12, 3072)
    assert (base.text_layers, base.visual_layers, base.cross_layers) == (6, 6, 6)


def test_round_trip_through_json(tmp_path):
    cfg = RunConfig(model=MODEL_PRESETS["tiny"], objectives=ObjectiveConfig(names=("mlm", "vsc")),
                    train=TrainConfig(stage=2, micro_batch=3)).validate()
    cfg.dump(tmp_path / "c.json")
    assert RunConfig.load(str(tmp_path / "c.json")) == cfg


def test_unknown_key_and_wrong_type_are_named(tmp_path):
    with pytest.raises(ConfigError, match="train.micro_bach"):
        RunConfig.from_dict({"train": {"micro_bach": 4}})
    with pytest.raises(ConfigError, match="train.micro_batch: expected an integer"):
        RunConfig.from_dict({"train": {"micro_batch": "four"}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        RunConfig.load(str(bad))


def test_objectives_checked_against_stage():
    with pytest.raises(ConfigError, match="'itm' needs the cross-modal encoder"):
        RunConfig(objectives=ObjectiveConfig(names=("itm",)), train=TrainConfig(stage=1)).validate()
    with pytest.raises(ConfigError, match="'foo' is unknown"):
        RunConfig(objectives=ObjectiveConfig(names=("foo",))).validate()
    assert RunConfig(train=TrainConfig(stage=1)).validate().objective_names == ("mcr",)
    # Stage 1 runs exactly the objectives that do not need the cross-modal encoder (two homes, kept in step)
    from mvptr_ds.config import OBJECTIVES, STAGE_OBJECTIVES
    from mvptr_ds.objectives.pretraining import NEEDS_CROSS
    assert STAGE_OBJECTIVES[1] == tuple(n for n in OBJECTIVES if n not in NEEDS_CROSS)
    # VSC reads only the uni-modal [CLS] embeddings: a contrastive stage 1 (beyond the release) is allowed
    for names in (("vsc",), ("mcr", "vsc")):
        assert RunConfig(objectives=ObjectiveConfig(names=names), train=TrainConfig(stage=1)).validate()
    assert set(RunConfig(train=TrainConfig(stage=2)).validate().objective_names) == {"mcr", "vsc", "itm", "mlm", "wpg"}


def test_model_spec_preset_or_json(tmp_path):
    assert model_config_from("tiny") == MODEL_PRESETS["tiny"]
    with pytest.raises(ConfigError, match="unknown preset"):
        model_config_from("huge")
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    assert model_config_from(str(p)).hidden_size == 64
    p.write_text(json.dumps({"hidden": 64}))
    with pytest.raises(ConfigError, match="model.hidden"):
        model_config_from(str(p))
    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(hidden_size=100, num_attention_heads=3).validate()


def _write(tmp_path, d):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(d))
    return str(p)


def test_ds_config_merges_typed_values(tmp_path):
    train = TrainConfig(micro_batch=4, grad_accum=2, precision="bf16")
    cfg = build_ds_config(_write(tmp_path, {"zero_optimization": {"stage": 2}}), train, world_size=3)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 24 and cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["gradient_clipping"] == 10.0


def test_ds_config_disagreements_name_the_key(tmp_path):
    train = TrainConfig(micro_batch=4, grad_accum=1)
    with pytest.raises(ConfigError, match="train_batch_size=64 disagrees"):
        build_ds_config(_write(tmp_path, {"train_batch_size": 64}), train, world_size=2)
    with pytest.raises(ConfigError, match="key 'optimizer' is not allowed"):
        build_ds_config(_write(tmp_path, {"optimizer": {"type": "AdamW"}}), train, 1)
    with pytest.raises(ConfigError, match="unknown key 'zero_optimisation'"):
        build_ds_config(_write(tmp_path, {"zero_optimisation": {"stage": 2}}), train, 1)
    with pytest.raises(ConfigError, match="zero_optimization.stage=7"):
        build_ds_config(_write(tmp_path, {"zero_optimization": {"stage": 7}}), train, 1)
    with pytest.raises(ConfigError, match="--precision fp32 disagrees"):
        build_ds_config(_write(tmp_path, {"fp16": {"enabled": True}}), train, 1)
    with pytest.raises(ConfigError, match="file not found"):
        build_ds_config(str(tmp_path / "missing.json"), train, 1)


def test_shipped_ds_configs_are_valid():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "ds_configs"
    names = sorted(p.name for p in root.glob("*.json"))
    assert {"zero1.json", "zero2.json", "zero3.json", "zero2_offload.json", "zero2_bf16.json",
            "zero2_fp16.json"} <= set(names)
    for p in root.glob("*.json"):
        precision = template_precision(json.loads(p.read_text()))
        cfg = build_ds_config(str(p), TrainConfig(precision=precision), world_size=2, check_device=False)
        assert cfg["train_batch_size"] == 2 * TrainConfig().micro_batch


def test_recipes_switch_every_correction():
    from mvptr_ds.config import RECIPES, apply_recipe

    release = apply_recipe(RunConfig(objectives=ObjectiveConfig(itm_negatives="random", wpg_negatives="sampled",
                                                                weights=(("wpg", 2.0),), itm_prior=True),
                                     data=DataConfig(join_pairs=0.5)), "release").validate()
    assert (release.objectives.exclude_same_image, release.objectives.cap_logit_scale,
            release.train.decay_logit_scale) == (False, False, True)
    assert (release.objectives.itm_negatives, release.objectives.wpg_negatives, release.objectives.weights,
            release.objectives.itm_prior) == ("hardest", "random", (), False)
    assert release.data.join_pairs == 0.0
    assert release.model.use_img_layernorm is False and RunConfig().model.use_img_layernorm is True
    # "project" is the defaults, whatever came before; both recipes name the same settings.
    assert apply_recipe(release, "project") == RunConfig()
    assert {s: set(v) for s, v in RECIPES["release"].items()} == {s: set(v) for s, v in RECIPES["project"].items()}
    with pytest.raises(ConfigError, match="--recipe 'paper': expected one of release, project"):
        apply_recipe(RunConfig(), "paper")


def test_a_config_written_before_a_rename_is_read():
    old = RunConfig().to_dict()
    old["objectives"]["wpg_negatives"] = old["objectives"].pop("wpg_negative_encoding")
    old["objectives"]["wpg_negatives"] = "joint"
    assert RunConfig.from_dict(old).objectives.wpg_negative_encoding == "joint"
