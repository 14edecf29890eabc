"""benchmarks/report.py --all: BENCHMARKS.md is exactly what the recorded runs (benchmarks/results/runs/) and the
hand-written notes (benchmarks/notes/) give, so the two cannot drift; the run-folder rules it enforces."""
import json
import shutil
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import report  # noqa: E402

MEMORY_RUN = report.RUNS / "2026-11-29_558c9f7_cpu-2core"


def test_benchmarks_md_is_what_the_runs_and_notes_give():
    assert report.check_runs(report.RUNS, report.NOTES) == []
    generated = report.render_all()
    assert generated == report.TARGET.read_text(), "run: python benchmarks/report.py --all"
    for name in report.plot_names(report.load([str(MEMORY_RUN)])):  # the plots it links are committed
        assert (report.PLOTS / "throughput" / name).is_file()


def test_tables_line_becomes_the_tables_of_its_runs(tmp_path):
    notes, runs = tmp_path / "notes", tmp_path / "runs"
    notes.mkdir()
    run = runs / "2026-11-29_abcdef0_cpu-test"
    run.mkdir(parents=True)
    shutil.copy(MEMORY_RUN / "memory_z2_w2.json", run)
    (notes / "00_intro.md").write_text("# T\n\nintro\n")
    (notes / "10_mem.md").write_text(f"## Memory\n\nhand text\n\n<!-- tables: {run.name} -->\n")
    text = report.render_all(notes, runs, tmp_path / "plots", tmp_path / "B.md")
    assert text.startswith(report.GENERATED) and "intro\n\n## Memory\n\nhand text\n\n### Model-state memory" in text
    assert "| 2 | - | 2 | 82.7 MiB | 41.9 MiB |" in text and "![memory_per_rank](plots/mem/memory_per_rank.png)" in text
    assert report.check_runs(runs, notes) == []
    (notes / "10_mem.md").write_text("<!-- tables: 2026-11-29_0000000_gone -->\n")
    with pytest.raises(SystemExit, match="error: .*10_mem.md: tables line names 2026-11-29_0000000_gone"):
        report.render_all(notes, runs, tmp_path / "plots", tmp_path / "B.md")


def test_run_folders_are_named_by_date_commit_device_and_reported(tmp_path):
    notes, runs = tmp_path / "notes", tmp_path / "runs"
    notes.mkdir()
    for name in ("2026-11-29_abcdef0_cpu", "2026-11-30_abcdef0_cpu", "results_of_today", "2026-12-01_1234567_gpu"):
        (runs / name).mkdir(parents=True)
    (runs / "2026-11-29_abcdef0_cpu" / "a.json").write_text(json.dumps({"date": "2026-11-29 03:00 UTC"}))
    (runs / "2026-11-30_abcdef0_cpu" / "b.json").write_text(json.dumps({"date": "2026-11-29", "command": "x",
                                                                        "commit": "1234567"}))
    (notes / "10_x.md").write_text("see 2026-11-29_abcdef0_cpu and 2026-11-30_abcdef0_cpu and results_of_today\n")
    errors = report.check_runs(runs, notes)
    assert all(e.startswith("error: ") for e in errors) and len(errors) == 6, errors
    assert "a.json: field 'command' missing" in errors[0]
    assert "b.json: field 'date' is '2026-11-29', not the folder's 2026-11-30" in errors[1]
    assert "b.json: field 'commit' is '1234567', not the folder's abcdef0" in errors[2]
    assert "2026-12-01_1234567_gpu: no result JSON" in errors[3] and "no note" in errors[4]
    assert "results_of_today: run folders are named" in errors[5]
