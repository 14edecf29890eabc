"""benchmarks/gpu_check.sh on the CPU: its CHECK_DEVICE=cpu mode runs the same steps at small sizes (Triton
interpreted, tiny model), installs carried wheels offline, respects its time budget, and builds the right
download commands for the wheels. What it cannot check here is the GPU itself."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run_script(*args, timeout=300, **env):
    full = {**os.environ, "PYTHON": sys.executable, **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=timeout)


def steps(summary: str) -> dict:
    """{step: status} from the Markdown step table."""
    out = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2].isdigit():
            out[cells[0]] = cells[1]
    return out


def probe_wheel(tmp_path: Path) -> Path:
    """A one-module wheel built offline, standing in for the carried wheels."""
    src = tmp_path / "probe_src"
    (src / "gpucheck_probe").mkdir(parents=True)
    (src / "gpucheck_probe" / "__init__.py").write_text("VALUE = 7\n")
    (src / "setup.py").write_text("from setuptools import setup\nsetup(name='gpucheck_probe', version='1.0', "
                                  "packages=['gpucheck_probe'])\n")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=120)
    assert list(wheels.glob("gpucheck_probe-1.0-*.whl"))
    return wheels


def test_script_parses_and_rejects_unknown_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = run_script("--bogus")
    assert proc.returncode == 2 and "unknown argument" in proc.stderr
    proc = run_script(CHECK_DEVICE="tpu")
    assert proc.returncode == 2 and "CHECK_DEVICE" in proc.stderr


def test_cpu_dry_run_installs_wheels_and_runs_every_step(tmp_path):
    out, site = tmp_path / "out", tmp_path / "site"
    proc = run_script(CHECK_DEVICE="cpu", OUT=out, WHEELS=probe_wheel(tmp_path), SITE=site,
                      KERNEL_BENCH_ARGS="--only embedding")
    summary = (out / "summary.md").read_text()
    assert summary.strip() in proc.stdout, "the table printed is the one written to $OUT/summary.md"
    status = steps(summary)
    assert (site / "gpucheck_probe" / "__init__.py").is_file(), "carried wheels are installed into $SITE"
    for name in ("install", "imports", "imports_training", "kernel_tests", "kernel_bench"):
        assert status.get(name) == "ok", (name, summary, proc.stdout[-3000:])
    assert (out / "kernels_cpu.json").is_file() and "embedding/text" in summary
    assert (out / "gpu_check.log").stat().st_size > 0
    if (REPO / "benchmarks" / "throughput.py").is_file():
        assert status.get("throughput:2:authors") == "ok", (summary, (out / "gpu_check.log").read_text()[-4000:])
        assert (out / "throughput.tar.gz").is_file() and "speed-up vs authors" in summary
        assert proc.returncode == 0, summary
    else:
        assert status.get("throughput:2:authors", "").startswith("missing"), summary
        assert proc.returncode == 1, "a step that did not run fails the check"


def test_time_budget_is_respected(tmp_path):
    proc = run_script(CHECK_DEVICE="cpu", OUT=tmp_path, WHEELS=tmp_path / "none", GPU_CHECK_BUDGET=5)
    status = steps((tmp_path / "summary.md").read_text())
    assert status["imports"] == "not run (time)" and status["install"].startswith("skipped"), status
    assert proc.returncode == 1


def test_fetch_downloads_for_the_gpu_python_and_builds_deepspeed(tmp_path):
    """With a stand-in ``python`` that records its arguments: what fetch would ask pip for."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake_python.sh"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    proc = run_script("fetch", PYTHON=fake, WHEELS=tmp_path / "whl")
    assert proc.returncode == 0, proc.stderr
    download, build = calls.read_text().splitlines()
    assert download.startswith("-m pip download --no-deps --only-binary=:all: --python-version 3.12")
    assert "pydantic==" in download and "hjson==" in download and "deepspeed" not in download
    assert build.startswith("-m pip wheel --no-deps --no-build-isolation") and build.endswith("deepspeed==0.19.8")
