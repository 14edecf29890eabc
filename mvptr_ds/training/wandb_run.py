"""One Weights & Biases run per output folder, continued across resumes.

The run's id is kept in ``<output_dir>/wandb/run_id``. A run that resumes from a checkpoint continues that id
(``wandb.init(id=..., resume="allow")``: online, W&B appends to the run; offline, each session writes its own
``wandb/offline-run-*-<id>`` folder and ``wandb sync`` uploads them, in order, into the one run). A run that
starts from scratch gets a new id (``WANDB_RUN_ID`` when set), so its steps never land in an older run's.

Settings follow W&B's own variables unless an option says otherwise: ``--wandb`` > ``WANDB_MODE`` > offline;
``--wandb_project`` > ``WANDB_PROJECT`` > "mvptr_ds"; ``--wandb_group`` > ``WANDB_RUN_GROUP``; ``--run_name`` >
``WANDB_NAME`` > the output folder's name. ``WANDB_ENTITY``, ``WANDB_TAGS``, ``WANDB_NOTES``, ``WANDB_DIR`` and
the rest are read by W&B itself. W&B's cache, config and data folders default to ``<output_dir>/wandb/.*`` (not
``~/.cache``) unless their variables are set. Nothing secret is written: the logged config is the run config.
"""
from __future__ import annotations

import os
import secrets
import string
from dataclasses import dataclass
from typing import Any, Dict, Optional

from mvptr_ds.files import atomic_write_text

DEFAULT_PROJECT = "mvptr_ds"
ID_FILE = "run_id"


@dataclass(frozen=True)
class WandbSettings:
    mode: str              # "offline", "online", "disabled" (or another value WANDB_MODE gave)
    project: str
    group: Optional[str]
    name: str


def settings(train_cfg, env=None) -> WandbSettings:
    """The W&B settings of a run: the options of ``train_cfg`` first, then the standard variables."""
    env = os.environ if env is None else env
    return WandbSettings(
        mode=train_cfg.wandb or env.get("WANDB_MODE") or "offline",
        project=train_cfg.wandb_project or env.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        group=train_cfg.wandb_group or env.get("WANDB_RUN_GROUP") or None,
        name=train_cfg.run_name or env.get("WANDB_NAME") or os.path.basename(os.path.abspath(train_cfg.output_dir)))


def run_id(output_dir: str, resumed: bool) -> str:
    """The W&B run id of this run: the folder's when it resumes from a checkpoint, else a new one (kept)."""
    path = os.path.join(output_dir, "wandb", ID_FILE)
    if resumed and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = f.read().strip()
        if saved:
            return saved
    new = os.environ.get("WANDB_RUN_ID") or "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                    for _ in range(8))  # W&B's own id alphabet and length
    atomic_write_text(path, new + "\n")
    return new


def start(output_dir: str, train_cfg, config: Dict[str, Any], resumed: bool) -> Optional[Any]:
    """The W&B run of this output folder (rank 0 only), or None when W&B is disabled."""
    s = settings(train_cfg)
    if s.mode == "disabled":
        return None
    import wandb

    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        os.environ.setdefault(var, os.path.join(output_dir, "wandb", f".{sub}"))
    os.makedirs(os.path.join(output_dir, "wandb"), exist_ok=True)
    return wandb.init(project=s.project, group=s.group, name=s.name, mode=s.mode, config=config,
                      dir=os.environ.get("WANDB_DIR") or output_dir, id=run_id(output_dir, resumed), resume="allow",
                      reinit="finish_previous")
