"""benchmarks/learnability.py end to end at a few steps: every figure present and in range (no bound on them)."""
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import learnability  # noqa: E402


@pytest.mark.parametrize("objectives, negatives, extra", [
    ("vsc,itm,wpg", "shared", ["--train_images", "4", "--wpg_negatives", "sampled"]),
    ("vsc,wpg", "separate", ["--world", "images=40,held_out=16", "--mix_pairs", "0.5"])])
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


def test_stage1_objectives_and_mix_stages(monkeypatch):
    """--stage1_objectives vsc trains the uni-modal contrastive stage (and evaluates it: coarse figures in
    stage1_history); --mix_stages 1 joins the pairs of stage 1 only; a cross-modal stage-1 objective and a stage
    other than 1 and 2 are refused."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    mixed = []
    real = learnability.JoinedPairs

    def recording(base, p, seed):
        mixed.append(p)
        return real(base, p, seed)

    monkeypatch.setattr(learnability, "JoinedPairs", recording)
    common = ["--seed", "3", "--world", "images=40,held_out=16", "--objectives", "vsc,wpg", "--steps", "2",
              "--eval_every", "2", "--micro_batch", "8", "--threads", "1", "--mix_pairs", "0.5"]
    result = learnability.main(common + ["--stage1_objectives", "vsc", "--stage1_steps", "2", "--mix_stages", "1"])
    assert mixed == [0.5]  # stage 1 joined, stage 2 not
    (row,) = result["stage1_history"]
    assert row["step"] == 2 and "vsc" in row and 0 <= row["coarse_tr_r1"] <= 100 and "grounding" not in row
    assert result["args"]["mix_stages"] == [1] and result["history"][-1]["step"] == 2
    mixed.clear()
    result = learnability.main(common + ["--stage1_steps", "2"])  # defaults: MCR in stage 1, both stages joined
    assert mixed == [0.5, 0.5]
    (row,) = result["stage1_history"]  # MCR alone: its loss, nothing to evaluate
    assert "mcr" in row and "coarse_tr_r1" not in row
    for bad in (["--stage1_objectives", "mcr,itm"], ["--mix_stages", "1,3"]):
        with pytest.raises(SystemExit) as exit_info:
            learnability.main(common + bad)
        assert exit_info.value.code == 2
