"""benchmarks/learnability.py end to end at a few steps: every figure present and in range (no bound on them)."""
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import learnability  # noqa: E402


@pytest.mark.parametrize("objectives, negatives, extra", [
    ("vsc,itm,wpg", "joint", ["--train_images", "4"]),
    ("vsc,wpg", "separate", ["--world", "images=40,held_out=16"])])
def test_learnability_sweep_reports_every_figure(tmp_path, objectives, negatives, extra, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --threads must not change this process
    out = tmp_path / "r.json"
    result = learnability.main(["--seed", "3", "--stage1_steps", "2", "--objectives", objectives,
                                "--wpg_negative_encoding", negatives, "--loss_weights", "wpg=2", "--steps", "4",
                                "--eval_every", "2", "--micro_batch", "8", "--threads", "1", "--out", str(out)] + extra)
    assert out.exists() and [row["step"] for row in result["history"]] == [2, 4]
    last = result["history"][-1]
    expected = {"coarse_tr_r1", "coarse_ir_r1", "r1_chance", "grounding", "grounding_chance", "vsc", "wpg"}
    if "itm" in objectives:
        expected |= {"itm_tr_r1", "itm_ir_r1", "itm"}
    assert expected <= set(last), set(last)
    assert ("itm_tr_r1" in last) == ("itm" in objectives)
    for key in ("coarse_tr_r1", "coarse_ir_r1", "grounding", "grounding_chance"):
        assert 0 <= last[key] <= 100
    held_out = 16 if "--world" in extra else 64  # --world's keys reach the world
    assert last["r1_chance"] == pytest.approx(100 / held_out, abs=0.01)
    # --train_images: the same retrieval figures on that many training images (the memorisation gap)
    train_keys = {"train_coarse_tr_r1", "train_coarse_ir_r1", "train_r1_chance", "train_itm_tr_r1", "train_itm_ir_r1"}
    if "--train_images" in extra:
        assert train_keys <= set(last) and last["train_r1_chance"] == pytest.approx(100 / 4, abs=0.01)
    else:
        assert not train_keys & set(last)
    assert torch.get_num_threads() == threads
