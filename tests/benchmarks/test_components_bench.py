"""benchmarks/components.py end to end at tiny sizes: the batched WPG equals the per-pair loop, every figure
is present and positive (no timing assertion). In a subprocess: the benchmark initialises torch.distributed."""
import json
import subprocess
import sys

from conftest import REPO, clean_env


def test_components_benchmark_runs_and_agrees(tmp_path):
    out = tmp_path / "c.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "components.py"), "--model", "tiny", "--micro_batch", "6",
           "--reps", "1", "--loader_batches", "2", "--loader_micro_batch", "4", "--out", str(out)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["wpg"]["pairs"] > 0 and result["wpg"]["loss_abs_diff"] < 1e-5
    assert result["encoders"]["padded_positions"] > result["encoders"]["real_positions"] > 0
    assert "wpg" in result["wpg_negatives"]["objectives"].split(",")
    for value in (result["wpg"]["speedup"], result["encoders"]["speedup"], *result["loader"].values(),
                  result["wpg_negatives"]["joint_step_ms"], result["wpg_negatives"]["separate_step_ms"],
                  result["wpg_negatives"]["shared_step_ms"]):
        assert value > 0
