"""The CLI's contract: defaults, --help, and one clear line (no traceback) for bad input."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, clean_env, run_cli

from mvptr_ds.run import parse_objectives


def test_parse_objectives_accepts_fire_forms():
    assert parse_objectives("mcr,vsc") == ("mcr", "vsc")
    assert parse_objectives(("MLM", "wpg")) == ("mlm", "wpg")
    assert parse_objectives(None) == ()


def test_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "mvptr_ds.run", "--help"], cwd=REPO, env=clean_env(PAGER="cat"),
                          capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    for option in ("stage", "objectives", "model", "data", "ds_config", "output_dir", "max_steps", "micro_batch",
                   "grad_accum", "lr", "warmup_steps", "save_every", "log_every", "resume", "init_from", "seed",
                   "wandb", "precision", "itm_negatives", "wpg_negatives", "loss_weights"):
        assert f"--{option}" in text, option


def _error_line(args, tmp_path):
    proc = run_cli(list(args) + ["--output_dir", str(tmp_path / "out"), "--wandb", "disabled"], check=False,
                   timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--model", "huge"], "unknown preset"),
    (["--stage", "1", "--objectives", "itm"], "needs the cross-modal encoder"),
    (["--objectives", "mcr,foo"], "'foo' is unknown"),
    (["--stage", "3"], "train.stage=3"),
    (["--ds_config", "nope.json"], "nope.json: file not found"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no such directory"),
    (["--precision", "fp8"], "train.precision='fp8'"),
    (["--itm_negatives", "easy"], "itm_negatives='easy'"),
    (["--wpg_negatives", "both"], "wpg_negatives='both'"),
    (["--loss_weights", "wpg"], "'wpg' is not NAME=WEIGHT"),
    (["--loss_weights", "wpg=-2"], "must be a finite number >= 0"),
    (["--loss_weights", "foo=2"], "unknown objective 'foo'"),
    (["--loss_weights", "1"], "expected NAME=WEIGHT pairs"),
    (["--loss_weights", "wpg=2", "mlm=0.5"], "--stage 'mlm=0.5' is not an integer"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, expected):
    assert expected in _error_line(args, tmp_path)


def test_bad_ds_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}))
    line = _error_line(["--ds_config", str(bad), "--micro_batch", "4"], tmp_path)
    assert "train_micro_batch_size_per_gpu=8 disagrees" in line
    bad.write_text('{"zero_optimization": {"stage": 2},}')
    assert "not valid JSON" in _error_line(["--ds_config", str(bad)], tmp_path)


def test_unknown_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mvptr_ds.run", "pretrian"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown command 'pretrian'" in proc.stderr


def test_convert_original_command(tmp_path, shared_data):
    import torch
    from safetensors.torch import load_file

    fixture = torch.load(shared_data / "fixtures" / "mvptr_original_tiny.pt", weights_only=False)
    src = tmp_path / "authors.pt"
    torch.save({"state_dict": fixture["state_dict"], "config": fixture["config"]}, src)
    proc = run_cli(["convert_original", "--src", str(src), "--dst", str(tmp_path / "conv")])
    assert "124 tensors mapped" in proc.stdout and "qa_head.weight" in proc.stdout
    weights = load_file(str(tmp_path / "conv" / "model.safetensors"))
    assert "backbone.cross_encoder.layer.0.attention.self.query.weight" in weights
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 1300 and cfg["model"]["only_word_size"] == 1100
    missing = run_cli(["convert_original", "--src", str(tmp_path / "nope.pt"), "--dst", str(tmp_path / "x")],
                      check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "nope.pt" in missing.stderr


def test_options_not_given_keep_the_config_files_values(tmp_path):
    from mvptr_ds.config import DEFAULT_OBJECTIVES, TrainConfig, model_config_from
    from mvptr_ds.run import pretraining_config

    first = pretraining_config(stage=1, max_steps=7, lr=3e-4, micro_batch=5, output_dir=str(tmp_path / "a"),
                               ds_config="ds_configs/zero1.json", seed=11)
    path = tmp_path / "config.json"
    first.dump(str(path))
    again = pretraining_config(config=str(path), max_steps=9)
    assert again.train.max_steps == 9                       # given: overrides
    assert (again.train.lr, again.train.micro_batch, again.train.seed, again.train.stage) == (3e-4, 5, 11, 1)
    assert again.train.ds_config == first.train.ds_config and again.model == first.model
    other_stage = pretraining_config(config=str(path), stage=2)
    assert other_stage.objective_names == DEFAULT_OBJECTIVES[2]  # another stage: its own default objectives
    plain = pretraining_config()                            # nothing given: the dataclass defaults
    assert (plain.train.max_steps, plain.train.lr, plain.train.seed) == (TrainConfig.max_steps, TrainConfig.lr,
                                                                         TrainConfig.seed)
    assert plain.model == model_config_from("tiny")


def test_negatives_and_loss_weights_reach_the_config_and_survive_a_config_file(tmp_path):
    from mvptr_ds.config import ObjectiveConfig, RunConfig
    from mvptr_ds.run import pretraining_config

    cfg = pretraining_config(itm_negatives="random", wpg_negatives="separate", loss_weights="wpg=2, mlm=0.5")
    assert (cfg.objectives.itm_negatives, cfg.objectives.wpg_negatives) == ("random", "separate")
    assert cfg.objectives.weight("wpg") == 2.0 and cfg.objectives.weight("mlm") == 0.5
    assert cfg.objectives.weight("vsc") == 1.0
    path = tmp_path / "config.json"
    cfg.dump(str(path))
    assert RunConfig.load(str(path)).objectives == cfg.objectives
    again = pretraining_config(config=str(path), max_steps=3)  # not given: the file's values
    assert again.objectives == cfg.objectives
    plain = pretraining_config()
    assert (plain.objectives.itm_negatives, plain.objectives.wpg_negatives) == (
        ObjectiveConfig.itm_negatives, ObjectiveConfig.wpg_negatives)
