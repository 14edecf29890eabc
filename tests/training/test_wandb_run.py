"""W&B settings: options first, then W&B's standard variables, then the project's defaults; one run id per
output folder, kept across resumes and replaced by a fresh start."""
import dataclasses

from mvptr_ds.config import TrainConfig
from mvptr_ds.training import wandb_run


def test_options_then_standard_variables_then_defaults(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run7"))
    env = {"WANDB_MODE": "online", "WANDB_PROJECT": "p-env", "WANDB_RUN_GROUP": "g-env", "WANDB_NAME": "n-env"}
    assert wandb_run.settings(cfg, {}) == wandb_run.WandbSettings("offline", "mvptr_ds", None, "run7")
    assert wandb_run.settings(cfg, env) == wandb_run.WandbSettings("online", "p-env", "g-env", "n-env")
    given = dataclasses.replace(cfg, wandb="disabled", wandb_project="p", wandb_group="g", run_name="n")
    assert wandb_run.settings(given, env) == wandb_run.WandbSettings("disabled", "p", "g", "n")


def test_run_id_is_kept_across_resumes_and_new_for_a_fresh_start(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = wandb_run.run_id(str(tmp_path), resumed=False)
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == first
    assert wandb_run.run_id(str(tmp_path), resumed=True) == first
    fresh = wandb_run.run_id(str(tmp_path), resumed=False)
    assert fresh != first and wandb_run.run_id(str(tmp_path), resumed=True) == fresh
    monkeypatch.setenv("WANDB_RUN_ID", "given1")
    assert wandb_run.run_id(str(tmp_path / "other"), resumed=False) == "given1"
