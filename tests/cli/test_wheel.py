"""The wheel carries what a training command needs: built here, installed into a fresh virtual environment and run
from another folder (no repository on the path): ``--ds_config zero3`` is found in the package.

torch and DeepSpeed come from this interpreter's environment (the venv sees the system's site-packages, and a
``.pth`` file adds this environment's), so only mvptr_ds itself is installed: from the wheel, with --no-deps.
The wheel is built offline with this environment's setuptools (and ``wheel``, in the ``test`` extra).
"""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, clean_env, prebuild_deepspeed_ops

pytestmark = pytest.mark.slow

SOURCES = ("mvptr_ds", "ds_configs", "setup.py", "README.md")


def run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_wheel_installs_and_trains_from_another_folder(tmp_path):
    prebuild_deepspeed_ops()
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to setup.py
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name, follow_symlinks=False)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
         src])
    wheel = next((tmp_path / "dist").glob("mvptr_ds-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])  # this pip installs
    python = venv / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    Path(purelib, "_test_parent_env.pth").write_text("\n".join(ours) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env()
    env.pop("PYTHONPATH")
    where = run([python, "-c", "import mvptr_ds, os; print(os.path.dirname(mvptr_ds.__file__))"], cwd=elsewhere,
                env=env).stdout.strip()
    assert where.startswith(purelib), where  # the wheel's copy, not the repository
    script = venv / "bin" / "mvptr_ds"
    assert run([script, "--help"], cwd=elsewhere, env=env).stdout.startswith("usage: mvptr_ds [COMMAND]")
    run([script, "--max_steps", "2", "--micro_batch", "4", "--warmup_steps", "0", "--ds_config", "zero3",
         "--data", "synthetic:images=16,held_out=0", "--output_dir", "out", "--wandb", "disabled"], cwd=elsewhere,
        env=env)
    final = elsewhere / "out" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer" / "vocab.txt").is_file()
    assert sorted(os.listdir(elsewhere)) == ["out"]
