"""benchmarks/precision_curve.py: what it computes from two runs' metrics (no training here)."""
import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from precision_curve import compare, losses  # noqa: E402


def test_compare_reports_step_and_window_gaps():
    fp32 = [10.0, 8.0, 6.0, 4.0]
    bf16 = [10.5, 7.5, 6.0, 4.4]
    c = compare(fp32, bf16, window=2)
    assert c["max_step_gap"] == pytest.approx(0.5) and c["median_step_gap"] == pytest.approx(0.45)
    assert c["first_window_fp32"] == 9.0 and c["first_window_bf16"] == 9.0
    assert c["last_window_fp32"] == 5.0 and c["last_window_bf16"] == pytest.approx(5.2)
    assert c["max_window_rel_gap"] == pytest.approx(0.2 / 5.0)


def test_losses_reads_every_step_and_refuses_gaps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)] + [{"step": 3, "event": "checkpoint"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert losses(str(path), 3) == [1.0, 0.5, pytest.approx(1 / 3)]
    with pytest.raises(RuntimeError, match="each of steps 1..4"):
        losses(str(path), 4)
