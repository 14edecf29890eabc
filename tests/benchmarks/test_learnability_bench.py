"""benchmarks/learnability.py end to end at a few steps: every figure present and in range (no bound on them)."""
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import learnability  # noqa: E402


@pytest.mark.parametrize("objectives, negatives, extra", [
    ("vsc,itm,wpg", "shared", ["--train_images", "4"]),
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


def test_pair_mixer_joins_two_images_consistently():
    from mvptr_ds.data.synthetic import SceneSpec, SceneWorld
    world = SceneWorld(SceneSpec(seed=3, images=12, held_out=0))
    for i in range(4):  # p = 0: the pairs as they are
        got, want = learnability.PairMixer(world.train, 0.0, seed=1)[i], world.train[i]
        assert (got.caption_ids, got.concept_ids, got.tag_ids, got.image_id, got.concept_regions) == \
            (want.caption_ids, want.concept_ids, want.tag_ids, want.image_id, want.concept_regions)
        assert np.array_equal(got.regions, want.regions)
    mixer = learnability.PairMixer(world.train, 1.0, seed=1)
    for i in range(len(world.train)):
        a, joined = world.train[i], mixer[i]
        # the partner: the one other example whose caption is the joined caption's tail
        tail = joined.caption_ids[len(a.caption_ids):]
        b = next(e for e in world.train if e.caption_ids == tail and e.image_id != a.image_id)
        assert joined.image_id == a.image_id and joined.sample_id == a.sample_id
        assert joined.caption_ids == a.caption_ids + b.caption_ids
        assert joined.concept_ids == a.concept_ids + b.concept_ids
        assert joined.tag_ids == a.tag_ids + b.tag_ids
        assert np.array_equal(joined.regions, np.concatenate([a.regions, b.regions]))
        r = a.regions.shape[0]
        for k, links in enumerate(joined.concept_word_links):  # every link still names its concept's words
            words = [joined.caption_ids[w] for w in links]
            src, off = (a, 0) if k < len(a.concept_ids) else (b, len(a.concept_ids))
            assert words == [src.caption_ids[w] for w in src.concept_word_links[k - off]]
        assert joined.concept_regions == a.concept_regions + [x + r if x >= 0 else x for x in b.concept_regions]

    lonely = SceneWorld(SceneSpec(seed=3, images=1, held_out=0))  # one image: no partner, one clear error
    with pytest.raises(ValueError, match="another image"):
        learnability.PairMixer(lonely.train, 1.0, seed=1)[0]


def test_stage1_objectives_and_mix_stages(monkeypatch):
    """--stage1_objectives vsc trains the uni-modal contrastive stage (and evaluates it: coarse figures in
    stage1_history); --mix_stages 1 joins the pairs of stage 1 only; a cross-modal stage-1 objective and a stage
    other than 1 and 2 are refused."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    mixed = []
    real = learnability.PairMixer

    def recording(base, p, seed):
        mixed.append(p)
        return real(base, p, seed)

    monkeypatch.setattr(learnability, "PairMixer", recording)
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
