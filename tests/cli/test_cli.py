"""The CLI's contract: options generated from the typed config, help, and one clear line (no traceback) for bad
input, before any work."""
import dataclasses
import json
import os
import subprocess
import sys
from typing import Optional, Tuple

import pytest
import torch

from conftest import REPO, clean_env

from mvptr_ds import __version__, config
from mvptr_ds.cli.options import build_parser, field_options, parse
from mvptr_ds.config_types import ConfigError, option
from mvptr_ds.run import COMMANDS, config_of, main, parse_command


def error_line(capsys, argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ---------------------------------------------------------------- unknown options: an error before any work

SNIPPET = """
import sys
from mvptr_ds.run import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "deepspeed", "numpy") if m in sys.modules)
print("imported:", ",".join(heavy) or "nothing heavy", file=sys.stderr)
sys.exit(rc)
"""


def test_a_misspelt_option_stops_before_importing_torch_and_writes_nothing(tmp_path):
    """The issue's case: "--lrr" trained 200 steps with the default lr, then Fire complained."""
    env = clean_env(PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "mvptr_ds.run", "--max_steps", "2", "--lrr", "1e-4"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: unknown option --lrr (did you mean --lr?)", proc.stderr
    assert os.listdir(tmp_path) == []
    probe = subprocess.run([sys.executable, "-c", SNIPPET, "--max_steps", "2", "--lrr", "1e-4"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 2 and "imported: nothing heavy" in probe.stderr, probe.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, expected", [
    (["--max_step", "2"], "unknown option --max_step (did you mean --max_steps?)"),  # no silent abbreviations
    (["--lrr=1e-4"], "unknown option --lrr (did you mean --lr?)"),
    (["finetune", "--task", "vqa", "--eval_bach_size", "8"], "unknown option --eval_bach_size (did you mean "
                                                             "--eval_batch_size?)"),
    (["finetune", "--task", "vqa", "--stage", "1"], "unknown option --stage"),  # finetune is stage 2
    (["--zzz"], "unknown option --zzz (--help lists the options)"),
    (["--loss_weights", "wpg=2", "mlm=0.5"], "unexpected argument 'mlm=0.5'"),
    (["--max_steps", "two"], "--max_steps 'two' is not an integer"),
    (["--lr", "-inf"], "--lr has no value"),
    (["--global_negatives", "maybe"], "--global_negatives 'maybe': expected true or false"),
    (["--adam_betas", "0.9"], "--adam_betas '0.9': expected 2 comma-separated values"),
    (["evaluate", "--output", "x.json"], "the following arguments are required: --checkpoint"),
    (["pretrian"], "unknown command 'pretrian' (did you mean train?)"),
])
def test_bad_options_are_one_line(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in error_line(capsys, argv)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- values as typed

def test_values_keep_their_type_and_keywords_one_meaning():
    cfg = config_of(["--output_dir", "2024", "--resume", "None", "--run_name", "007"])
    assert cfg.train.output_dir == "2024" and cfg.train.run_name == "007"  # Fire made ints of these
    assert cfg.train.resume == "none"  # --resume None means none (Fire read it as "not given", i.e. auto)
    assert config_of(["--resume", "AUTO"]).train.resume == "auto"
    assert config_of(["--resume", "runs/x/checkpoints/step3"]).train.resume == "runs/x/checkpoints/step3"
    assert config_of(["--stop_after", "none"]).train.stop_after is None
    cfg = config_of(["--adam_betas", "0.8,0.99", "--max-steps", "7", "--objectives", "MCR, vsc", "-o", "out"])
    assert cfg.train.adam_betas == (0.8, 0.99) and cfg.train.max_steps == 7 and cfg.train.output_dir == "out"
    assert cfg.objectives.names == ("mcr", "vsc")


@pytest.mark.parametrize("argv, value", [(["--global_negatives"], True), (["--global_negatives", "false"], False),
                                         (["--global_negatives", "1"], True), (["--no_global_negatives"], False),
                                         ([], False)])
def test_boolean_options(argv, value):
    assert config_of(argv).objectives.global_negatives is value


def test_a_new_config_field_is_an_option_without_other_edits():
    @dataclasses.dataclass(frozen=True)
    class Section:
        new_knob: Optional[int] = option(None, "A knob added later.")
        pair: Tuple[float, float] = option((1.0, 2.0), "Two numbers.", flag="two")
        hidden: int = option(3, "Config files only.", cli=False)

    opts = field_options("train", Section)
    assert [o.flag for o in opts] == ["new_knob", "two"]
    parser = build_parser("prog", "", [("section", opts)])
    assert parse(parser, opts, ["--new_knob", "5", "--two", "3,4"]) == {"train.new_knob": 5, "train.pair": (3.0, 4.0)}
    assert "A knob added later." in parser.format_help() and "(default: 1.0,2.0)" in parser.format_help()
    every = {o.flag for _, opts in COMMANDS["train"].groups() for o in opts}
    for cls in (config.DataConfig, config.ObjectiveConfig, config.TrainConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("flag", f.name) in every, f.name


# ---------------------------------------------------------------- help, version, program name

def test_help_lists_the_commands_and_real_defaults(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in COMMANDS:
        assert f"\n  {name} " in text, name
    flat = " ".join(text.split())  # argparse wraps to the terminal's width
    assert "Default: None" not in flat and "Optional[" not in flat and "NoneType" not in flat
    assert "--max_steps INT Optimizer steps to train for. (default: 200)" in flat
    assert "(default: tiny)" in flat and f"(default: {config.TrainConfig.ds_config})" in flat
    assert "--precision fp32|bf16|fp16" in flat and "(default: what --ds_config enables, else fp32)" in flat
    assert main([]) == 0  # a bare call lists the commands; it no longer starts a 200-step training
    bare = capsys.readouterr().out
    assert "commands:" in bare and "--max_steps" not in bare


def test_finetune_shares_the_options_and_shows_the_tasks_defaults(capsys):
    train = {o.dest for _, opts in COMMANDS["train"].groups() for o in opts}
    tune = {o.dest for _, opts in COMMANDS["finetune"].groups() for o in opts}
    assert {d for d in train if d.split(".")[0] in ("model", "data", "train")} - {"train.stage"} <= tune
    assert main(["finetune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "retrieval 4e-05" in text and "runs/finetune_TASK" in text and "--eval_batch_size" in text
    assert config_of(["--task", "retrieval"], "finetune").train.lr == config.TASK_TRAIN_DEFAULTS["retrieval"]["lr"]
    cfg = config_of(["--task", "retrieval", "--lr", "1e-3"], "finetune")
    assert cfg.train.lr == 1e-3 and cfg.train.weight_decay == 0.05 and cfg.objectives.names == ("vsc", "itm")
    assert cfg.train.stage == 2 and cfg.eval.finetune_task == "retrieval"
    assert cfg.train.output_dir == "runs/finetune_retrieval"


def test_version_and_the_console_scripts_name(capsys, monkeypatch):
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"mvptr_ds {__version__}"
    assert main(["evaluate", "--version"]) == 0 and __version__ in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["/venv/bin/mvptr_ds", "finetune", "--help"])
    assert main() == 0
    assert capsys.readouterr().out.startswith("usage: mvptr_ds finetune [OPTIONS]")
    monkeypatch.setattr(sys, "argv", ["/repo/mvptr_ds/run.py"])
    assert main([]) == 0 and "usage: python -m mvptr_ds.run [COMMAND]" in capsys.readouterr().out
    setup = (REPO / "setup.py").read_text()
    assert '"0.1.0"' not in setup and "__version__" in setup  # one home for the version


# ---------------------------------------------------------------- configs from options

def test_options_not_given_keep_the_config_files_values(tmp_path):
    first = config_of(["--stage", "1", "--max_steps", "7", "--lr", "3e-4", "--micro_batch", "5", "--output_dir",
                       tmp_path / "a", "--ds_config", "zero1", "--seed", "11"])
    path = tmp_path / "config.json"
    first.dump(str(path))
    again = config_of(["--config", path, "--max_steps", "9"])
    assert again.train.max_steps == 9                       # given: overrides
    assert (again.train.lr, again.train.micro_batch, again.train.seed, again.train.stage) == (3e-4, 5, 11, 1)
    assert again.train.ds_config == first.train.ds_config and again.model == first.model
    other_stage = config_of(["--config", path, "--stage", "2"])
    assert other_stage.objective_names == config.DEFAULT_OBJECTIVES[2]  # another stage: its own objectives
    plain = config_of([])                                   # nothing given: the dataclass defaults
    assert (plain.train.max_steps, plain.train.lr, plain.train.seed) == (config.TrainConfig.max_steps,
                                                                         config.TrainConfig.lr, config.TrainConfig.seed)
    assert plain.model == config.model_config_from(config.DEFAULT_MODEL)


def test_negatives_and_loss_weights_reach_the_config_and_survive_a_config_file(tmp_path):
    cfg = config_of(["--itm_negatives", "random", "--wpg_negative_encoding", "separate", "--loss_weights", "wpg=2, mlm=0.5",
                     "--itm_prior"])
    assert (cfg.objectives.itm_negatives, cfg.objectives.wpg_negative_encoding) == ("random", "separate")
    assert cfg.objectives.itm_prior is True and config_of([]).objectives.itm_prior is False
    with pytest.raises(ConfigError, match="itm_prior: changes ITM's score, and this run does not train ITM"):
        config_of(["--stage", "1", "--itm_prior"])
    assert cfg.objectives.weight("wpg") == 2.0 and cfg.objectives.weight("mlm") == 0.5
    assert cfg.objectives.weight("vsc") == 1.0
    path = tmp_path / "config.json"
    cfg.dump(str(path))
    assert config.RunConfig.load(str(path)).objectives == cfg.objectives
    assert config_of(["--config", path, "--max_steps", "3"]).objectives == cfg.objectives  # not given: the file's
    release = config_of(["--config", path, "--recipe", "release", "--itm_negatives", "sampled"])
    assert release.objectives.itm_negatives == "sampled" and release.objectives.weights == ()  # recipe, then options
    assert release.objectives.exclude_same_image is False
    # The recipe's model setting survives a --model preset (applied before the recipe).
    assert config_of(["--recipe", "release", "--model", "tiny"]).model.use_img_layernorm is False
    assert config_of(["--model", "tiny"]).model.use_img_layernorm is True


def test_rerank_zero_means_zero():
    given = parse_command("evaluate", ["--checkpoint", "x", "--rerank_captions", "0", "--rerank_images", "0"])
    from mvptr_ds.cli.configs import eval_config

    assert (eval_config(given).rerank_captions, eval_config(given).rerank_images) == (0, 0)
    from mvptr_ds.evaluation.retrieval import candidate_pairs, coarse_to_fine_scores

    sim = torch.randn(6, 3)
    pairs = candidate_pairs(sim, 0, 0)
    i2t, t2i = coarse_to_fine_scores(sim, pairs, torch.zeros(0), 0, 0)
    assert pairs.shape == (0, 2) and torch.equal(t2i, sim.double()) and torch.equal(i2t, sim.t().double())


# ---------------------------------------------------------------- bad values: one line, in this process

@pytest.mark.parametrize("args, expected", [
    (["--model", "huge"], "unknown preset"),
    (["--stage", "1", "--objectives", "itm"], "needs the cross-modal encoder"),
    (["--objectives", "mcr,foo"], "'foo' is unknown"),
    (["--stage", "3"], "train.stage=3"),
    (["--ds_config", "nope.json"], "nope.json: file not found (shipped templates: zero1"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no such directory"),
    (["--precision", "fp8"], "train.precision='fp8'"),
    (["--itm_negatives", "easy"], "itm_negatives='easy'"),
    (["--wpg_negative_encoding", "both"], "wpg_negative_encoding='both'"),
    (["--wpg_negatives", "easy"], "wpg_negatives='easy'"),
    (["--join_pairs", "0.5"], "with itm and wpg: a joined pair keeps its first image's id"),
    (["--stage", "1", "--join_pairs", "2"], "data.join_pairs=2.0: must be a finite number in [0, 1]"),
    (["--loss_weights", "wpg"], "'wpg' is not NAME=VALUE (e.g. wpg=3)"),
    (["--loss_weights", "wpg=-2"], "must be a finite number >= 0"),
    (["--loss_weights", "foo=2"], "unknown objective 'foo'"),
    (["--rerank_captions", "5"], "unknown option --rerank_captions"),  # evaluation options are not train's
])
def test_bad_input_is_one_clear_line(capsys, tmp_path, no_process_group, args, expected):
    out = tmp_path / "out"
    assert expected in error_line(capsys, list(args) + ["--output_dir", out, "--wandb", "disabled"])
    assert not out.exists() or not os.listdir(out)


def test_bad_ds_config_names_the_key(capsys, tmp_path, no_process_group):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}))
    common = ["--output_dir", tmp_path / "out", "--wandb", "disabled"]
    assert "train_micro_batch_size_per_gpu=8 disagrees" in error_line(capsys, ["--ds_config", bad, "--micro_batch",
                                                                               "4"] + common)
    bad.write_text('{"zero_optimization": {"stage": 2},}')
    assert "not valid JSON" in error_line(capsys, ["--ds_config", bad] + common)


def test_convert_original_command(capsys, tmp_path, shared_data):
    from safetensors.torch import load_file

    fixture = torch.load(shared_data / "fixtures" / "mvptr_original_tiny.pt", weights_only=False)
    src = tmp_path / "authors.pt"
    torch.save({"state_dict": fixture["state_dict"], "config": fixture["config"]}, src)
    assert main(["convert_original", "--src", str(src), "--dst", str(tmp_path / "conv")]) == 0
    out = capsys.readouterr().out
    assert "124 tensors mapped" in out and "qa_head.weight" in out
    weights = load_file(str(tmp_path / "conv" / "model.safetensors"))
    assert "backbone.cross_encoder.layer.0.attention.self.query.weight" in weights
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 1300 and cfg["model"]["only_word_size"] == 1100
    assert "nope.pt" in error_line(capsys, ["convert_original", "--src", tmp_path / "nope.pt", "--dst", tmp_path / "x"])
