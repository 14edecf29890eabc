"""Issue 17: every bad input is one clear line. Each case below gave a traceback (or trained silently on bad
values); now ``mvptr_ds.run.main`` prints exactly one ``error:`` line naming the file (row/line, field where
there is one), returns 2, and writes no file into the run folder.

The CLI cases run in this process: ``distributed.setup`` is replaced by a single-process stand-in (no process
group is created here) and reaching the DeepSpeed engine fails the test, so every case must stop during
validation or data building. Resume cases need a real checkpoint and engine: they run through the fault
harness's forked CLI processes.
"""
import hashlib
import json
import math
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from conftest import main_one_error

from mvptr_ds.config import ConfigError, DataConfig
from mvptr_ds.data.batching import Collator, ResumableLoader
from mvptr_ds.data.export import write_real_formats
from mvptr_ds.data.readers import DataError, encode_feature_row
from mvptr_ds.data.synthetic import SceneSpec, SceneWorld, parse_synthetic_source
from mvptr_ds.run import main
from mvptr_ds.training import checkpoint

FAST = ["--max_steps", "1", "--micro_batch", "2", "--warmup_steps", "0", "--wandb", "disabled"]
FINETUNE = ["finetune"] + FAST
TINY_MODEL = {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512, "text_layers": 2,
              "visual_layers": 2, "cross_layers": 2, "max_position_embeddings": 128}


@pytest.fixture(autouse=True)
def engine_never_reached(no_process_group):
    """Every test here: rank 0 of 1 without torch.distributed, and the engine is never reached (conftest)."""


one_error = main_one_error


def train_error(capsys, tmp_path, args, *must_contain):
    out = tmp_path / "out"
    return one_error(capsys, FAST + list(args) + ["--output_dir", out], *must_contain, out=out)  # args win


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# ---------------------------------------------------------------- options and config files (case 7, 8, 9)

@pytest.mark.parametrize("args, value", [(["--lr", "nan"], "nan"), (["--lr", "inf"], "inf"), (["--lr=-inf"], "-inf")])
def test_learning_rate_must_be_finite(capsys, tmp_path, args, value):
    train_error(capsys, tmp_path, args, f"train.lr={value}:", "finite number > 0")


def test_option_without_a_value(capsys, tmp_path):
    """Fire reads "--lr -inf" (and a bare "--lr") as lr=True, which was float(True) = 1.0: trained silently."""
    train_error(capsys, tmp_path, ["--lr", "-inf"], "--lr has no value", "--lr=VALUE")


@pytest.mark.parametrize("key, value, expected", [
    ("num_attention_heads", 0, "model.num_attention_heads must be >= 1, got 0"),
    ("hidden_dropout", 1.5, "model.hidden_dropout=1.5: must be a finite number in [0, 1)"),
    ("attention_dropout", -0.1, "model.attention_dropout=-0.1"),
    ("hidden_size", -128, "model.hidden_size must be >= 1"),
])
def test_model_file_ranges(capsys, tmp_path, key, value, expected):
    model = write_json(tmp_path / "model.json", dict(TINY_MODEL, **{key: value}))
    train_error(capsys, tmp_path, ["--model", model], f"--model {model}", expected)


def test_position_table_must_hold_the_longest_stream(capsys, tmp_path):
    """Failed at the first forward before; now at build time, before any step (and before config.json)."""
    model = write_json(tmp_path / "model.json", dict(TINY_MODEL, max_position_embeddings=8))
    train_error(capsys, tmp_path, ["--model", model], "model.max_position_embeddings=8",
                "data.max_seq_length + data.max_phrases", "40 tokens")


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "adam_betas", [1.5, 0.999], "train.adam_betas[0]=1.5"),
    ("train", "adam_betas", [0.9, 1.0], "train.adam_betas[1]=1.0"),
    ("train", "weight_decay", -0.01, "train.weight_decay=-0.01"),
    ("train", "adam_eps", 0.0, "train.adam_eps=0.0"),
    ("train", "grad_clip", -1.0, "train.grad_clip=-1.0"),
    ("data", "num_workers", -1, "data.num_workers must be >= 0, got -1"),
    ("data", "prefetch_factor", 0, "data.prefetch_factor must be >= 1"),
    ("objectives", "wpg_margin", -0.2, "objectives.wpg_margin=-0.2"),
])
def test_config_file_ranges(capsys, tmp_path, section, key, value, expected):
    from mvptr_ds.run import config_of

    cfg = config_of([]).to_dict()
    cfg[section][key] = value
    path = write_json(tmp_path / "config.json", cfg)
    train_error(capsys, tmp_path, ["--config", path], str(path), expected)


def test_dataclass_validation_refuses_nan_directly():
    from mvptr_ds.config import ModelConfig, TrainConfig

    for bad in (TrainConfig(lr=math.nan), TrainConfig(adam_betas=(math.nan, 0.999)), DataConfig(mask_prob=math.nan),
                ModelConfig(layer_norm_eps=math.inf)):
        with pytest.raises(ConfigError, match="nan|inf"):
            bad.validate()


@pytest.mark.parametrize("source, key", [("synthetic:seed=-1", "seed=-1"), ("synthetic:world_seed=-3", "world_seed=-3"),
                                         ("synthetic:noise=inf", "noise=inf")])
def test_synthetic_source_ranges(capsys, tmp_path, source, key):
    train_error(capsys, tmp_path, ["--data", source], "--data synthetic", key)


@pytest.mark.parametrize("template, expected", [
    ({"zero_optimization": {"stage": 2}, "bf16": True}, "field 'bf16' must be an object, got true"),
    ({"zero_optimization": 2}, "field 'zero_optimization' must be an object"),
    ({"fp16": {"enabled": "yes"}}, "field 'fp16.enabled' must be true or false"),
])
def test_ds_config_field_types(capsys, tmp_path, template, expected):
    path = write_json(tmp_path / "ds.json", template)
    train_error(capsys, tmp_path, ["--ds_config", path], f"--ds_config {path}", expected)


def test_fp16_on_an_accelerator_without_it(capsys, tmp_path):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this accelerator trains in fp16")
    line = train_error(capsys, tmp_path, ["--ds_config", "ds_configs/zero2_fp16.json"], "precision fp16",
                       "zero2_fp16.json", "not supported by DeepSpeed's", "bf16 or fp32")
    assert get_accelerator().device_name() in line


def test_output_dir_naming_a_file(capsys, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("keep me\n")
    one_error(capsys, FAST + ["--output_dir", path], f"--output_dir {path}", "not a directory")
    assert path.read_text() == "keep me\n"


def test_micro_batch_larger_than_the_data(capsys, tmp_path):
    """Hung before (one step wrapped around 1024 samples a million times)."""
    train_error(capsys, tmp_path, ["--micro_batch", "1000000000", "--data", "synthetic:images=8,held_out=0"],
                "--micro_batch 1000000000 x world size 1", "16 training samples")


# ---------------------------------------------------------------- data directories (case 5)

@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    """A small data directory in the real formats (4 images, 1 caption each), copied by each test."""
    world = SceneWorld(SceneSpec(images=4, held_out=0, captions_per_image=1))
    out = tmp_path_factory.mktemp("real") / "data"
    write_real_formats(world, str(out))
    return out, world


def copy_dir(real_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(real_dir[0], data)
    return data


@pytest.mark.parametrize("name, expected", [("predictions.tsv", "file not found"),
                                            ("id2phrase.json", "file not found")])
def test_data_directory_missing_file(capsys, tmp_path, real_dir, name, expected):
    data = copy_dir(real_dir, tmp_path)
    os.remove(data / name)
    train_error(capsys, tmp_path, ["--data", data], f"{data / name}: {expected}")


def test_empty_captions(capsys, tmp_path, real_dir):
    data = copy_dir(real_dir, tmp_path)
    (data / "captions.jsonl").write_text("")
    train_error(capsys, tmp_path, ["--data", data], str(data / "captions.jsonl"), "no caption records")


def test_non_utf8_id2phrase_names_the_line(capsys, tmp_path, real_dir):
    data = copy_dir(real_dir, tmp_path)
    (data / "id2phrase.json").write_bytes(b'{"200": ["dog"],\n "201": ["r\xffed"]}')
    train_error(capsys, tmp_path, ["--data", data], str(data / "id2phrase.json"), "line 2", "not UTF-8", "0xff")


# ---------------------------------------------------------------- fine-tuning files (cases 2, 3, 4)

def refcoco_dir(real_dir, tmp_path, edit=None, refs_bytes=None):
    data = copy_dir(real_dir, tmp_path)
    refs, inst = [], {"images": [], "annotations": []}
    for k, im in enumerate(real_dir[1].images):
        x1, y1, x2, y2 = (float(v) for v in im.boxes[im.objects[0].region])
        for split in ("train", "val"):
            refs.append({"ref_id": len(refs), "ann_id": 10 + k, "image_id": im.image_id, "split": split,
                         "sentences": [{"sent": f"the {im.objects[0].name}"}]})
        inst["images"].append({"id": im.image_id, "width": im.width, "height": im.height})
        inst["annotations"].append({"id": 10 + k, "image_id": im.image_id, "bbox": [x1, y1, x2 - x1, y2 - y1]})
    if edit:
        edit(inst)
    raw = pickle.dumps(refs)
    (data / "refcoco").mkdir()
    (data / "refcoco" / "refs(unc).p").write_bytes(refs_bytes(raw) if refs_bytes else raw)
    (data / "refcoco" / "instances.json").write_text(json.dumps(inst))
    return data


def finetune_error(capsys, tmp_path, task, data, *must_contain):
    out = tmp_path / "out"
    return one_error(capsys, FINETUNE + ["--task", task, "--data", data, "--output_dir", out], *must_contain, out=out)


def test_refcoco_truncated_pickle(capsys, tmp_path, real_dir):
    data = refcoco_dir(real_dir, tmp_path, refs_bytes=lambda raw: raw[:len(raw) // 2])
    finetune_error(capsys, tmp_path, "refcoco", data, str(data / "refcoco" / "refs(unc).p"), "truncated")


def test_refcoco_width_given_as_a_string(capsys, tmp_path, real_dir):
    def edit(inst):
        inst["images"][1]["width"] = str(inst["images"][1]["width"])
    data = refcoco_dir(real_dir, tmp_path, edit)
    finetune_error(capsys, tmp_path, "refcoco", data, "instances.json, row 1, field 'width'", "positive number")


def test_refcoco_nan_box_is_an_error_not_zero_accuracy(capsys, tmp_path, real_dir):
    def edit(inst):
        inst["annotations"][2]["bbox"][0] = float("nan")   # json writes NaN, which Python's json reads back
    data = refcoco_dir(real_dir, tmp_path, edit)
    finetune_error(capsys, tmp_path, "refcoco", data, "instances.json, row 2, field 'bbox'", "finite")


def test_vqa_answers_with_mixed_id_types(capsys, tmp_path, real_dir):
    data = copy_dir(real_dir, tmp_path)
    write_json(data / "vqa" / "answers.json", {"yes": 0, "no": "1"})
    finetune_error(capsys, tmp_path, "vqa", data, "answers.json, field 'no'", "must be an integer, got '1'")


def test_snli_ve_non_utf8_byte(capsys, tmp_path, real_dir):
    data = copy_dir(real_dir, tmp_path)
    (data / "snli_ve").mkdir()
    good = json.dumps({"Flikr30kID": "1.jpg", "sentence2": "there is a man", "gold_label": "entailment"})
    (data / "snli_ve" / "train.jsonl").write_bytes(
        good.encode() + b'\n{"Flikr30kID": "2.jpg", "sentence2": "the man \xff", "gold_label": 0}\n')
    finetune_error(capsys, tmp_path, "snli_ve", data, "snli_ve/train.jsonl, line 2", "not UTF-8", "0xff")


# ---------------------------------------------------------------- convert_features (case 6)

def test_convert_features_missing_tsv(capsys, tmp_path):
    one_error(capsys, ["convert_features", "--tsv", tmp_path / "nope.tsv", "--out", tmp_path / "store"],
              str(tmp_path / "nope.tsv"), "file not found", out=tmp_path / "store")


def test_convert_features_value_beyond_fp16(capsys, tmp_path):
    feats = np.zeros((2, 2054), np.float32)
    feats[1, 5] = 1e6
    tsv = tmp_path / "features.tsv"
    tsv.write_bytes(encode_feature_row("a", np.zeros((1, 2054), np.float32)) + encode_feature_row("b", feats))
    store = tmp_path / "store"
    one_error(capsys, ["convert_features", "--tsv", tsv, "--out", store], f"{tsv}, row 2, field 'features'",
              "'b'", "region 1, column 5", "float16 range", "--dtype float32", out=store)
    assert not store.exists()
    # the same file converts in float32 (the first try left nothing behind that would block this)
    assert main(["convert_features", "--tsv", str(tsv), "--out", str(store), "--dtype", "float32"]) == 0


# ---------------------------------------------------------------- resume state (cases 1, 10), direct calls

def _loader(images=4):
    world = SceneWorld(parse_synthetic_source(f"synthetic:images={images},held_out=0"))
    return ResumableLoader(world.train, Collator(world.vocab, ("mcr",)), 2, 0, 1, seed=0)


GOOD_STATE = {"step": 2, "skipped_batches": 0, "loader": {"epoch": 0, "position": 4}, "rng": [{}]}


@pytest.mark.parametrize("field, value", [("step", "abc"), ("step", -1), ("step", 2.5), ("step", None),
                                          ("skipped_batches", "0"), ("loader", [0, 4]),
                                          ("loader", {"epoch": 0, "position": "4"}), ("rng", None)])
def test_restore_train_state_names_checkpoint_and_field(field, value):
    state = dict(GOOD_STATE, **{field: value})
    with pytest.raises(ConfigError, match=rf"checkpoint /ck/step2: train_state field '{field}'"):
        checkpoint.restore_train_state(state, "/ck/step2", _loader())


def test_restore_train_state_on_smaller_data():
    with pytest.raises(ConfigError, match=r"checkpoint /ck/step2: train_state field 'loader'.*position must be "
                                          r"in \[0, 4\).*different data"):
        checkpoint.restore_train_state(dict(GOOD_STATE, loader={"epoch": 0, "position": 6}), "/ck/step2", _loader(2))
    loader = _loader()
    assert checkpoint.restore_train_state(dict(GOOD_STATE, step=torch.tensor(2)), "/ck/step2", loader) == (2, 0)
    assert loader.state_dict() == {"epoch": 0, "position": 4}


# ---------------------------------------------------------------- resume through the CLI (cases 1, 10)

RESUME_DATA = "synthetic:seed=3,images=16,held_out=2,captions_per_image=1"


def resume_args(out, data=RESUME_DATA):
    return ["--data", data, "--output_dir", str(out), "--max_steps", "4", "--micro_batch", "4", "--save_every", "2",
            "--warmup_steps", "0", "--wandb", "disabled"]


@pytest.mark.slow
def test_resume_with_bad_train_state_or_smaller_data(tmp_path):
    from test_fault_harness import launch
    from test_fault_harness import one_error as launch_error

    run = tmp_path / "run"
    launch(resume_args(run) + ["--stop_after", "2"], log_dir=str(tmp_path)).ok()
    step = run / "checkpoints" / "step2"

    smaller = tmp_path / "smaller"
    shutil.copytree(run, smaller)
    launch_error(launch(resume_args(smaller, "synthetic:seed=3,images=6,held_out=2,captions_per_image=1"),
                        log_dir=str(tmp_path)),
                 f"checkpoint {smaller / 'checkpoints' / 'step2'}", "position must be in [0, 6)", "different data")

    # train_state.step a string, the manifest updated to match (a consistent but wrong checkpoint)
    model = step / "mp_rank_00_model_states.pt"
    saved = torch.load(model, weights_only=False)   # our own file, written by the run above
    saved["train_state"]["step"] = "abc"
    torch.save(saved, model)
    manifest = json.loads((step / "COMPLETE").read_text())
    manifest["files"][model.name] = {"size": model.stat().st_size,
                                     "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    (step / "COMPLETE").write_text(json.dumps(manifest))
    launch_error(launch(resume_args(run), log_dir=str(tmp_path)),
                 f"checkpoint {step}", "train_state field 'step'", "'abc'")
