"""benchmarks/fine_stage.py: near-miss groups and pairwise orders by hand, then the script on a trained model."""
import json
import subprocess
import sys
from types import SimpleNamespace as NS

import torch

from conftest import REPO, clean_env, run_cli

sys.path.insert(0, str(REPO / "benchmarks"))
import fine_stage  # noqa: E402


def test_near_miss_kind_names_what_the_image_lacks():
    caption = [("dog",), ("dog", "red"), ("dog", "near", "cat"), ("cat",)]
    full = {("dog",), ("dog", "red"), ("dog", "near", "cat"), ("cat",), ("tree",)}
    assert fine_stage.near_miss_kind(caption, full) == "fits"
    assert fine_stage.near_miss_kind(caption, full - {("cat",)}) == "object"
    assert fine_stage.near_miss_kind(caption, full - {("cat",), ("dog", "red")}) == "object"
    assert fine_stage.near_miss_kind(caption, full - {("dog", "red")}) == "attribute"
    assert fine_stage.near_miss_kind(caption, full - {("dog", "red"), ("dog", "near", "cat")}) == "attribute"
    assert fine_stage.near_miss_kind(caption, full - {("dog", "near", "cat")}) == "relation"


def test_near_misses_count_pairs_in_the_coarse_top_k_by_hand():
    """Three captions, four images (3 duplicates image 0's content). Caption 0 (image 0): coarse top 3 = 0, 3, 1;
    image 3 is the same picture (not a wrong one, and its scores count as the caption's image's: the best of the
    two), image 1 lacks an object: coarse right (0.9 > 0.5), ITM right only through the duplicate (2.5 > 2.0 >
    1.0). Caption 1 (image 2): top 3 = 1, 2, 0; image 1 lacks an attribute (coarse wrong, ITM right), image 0
    fits (coarse right, ITM right). Caption 2 (image 1): top 3 = 0, 2, 3, its image is not among them: not
    counted."""
    sim = torch.tensor([[0.9, 0.5, 0.1, 0.8], [0.3, 0.7, 0.6, 0.0], [0.9, 0.0, 0.8, 0.7]])
    itm = torch.tensor([[1.0, 2.0, 0.0, 2.5], [-1.0, 0.5, 3.0, 9.0], [0.0, 5.0, 0.0, 0.0]])
    rset = NS(caption_image=torch.tensor([0, 2, 1]), image_key=torch.tensor([0, 1, 2, 0]))
    tuples = [[("dog",)], [("cat",), ("cat", "black")], [("cat",)]]
    facts = [{("dog",), ("cat",), ("cat", "black")}, {("cat",)}, {("cat",), ("cat", "black")},
             {("dog",), ("cat",), ("cat", "black")}]
    got = fine_stage.near_misses(sim, itm, rset, tuples, facts, top=3)
    assert got == {"captions": 2,
                   "attribute": {"pairs": 1, "coarse_right": 0.0, "itm_right": 1.0},
                   "fits": {"pairs": 1, "coarse_right": 1.0, "itm_right": 1.0},
                   "object": {"pairs": 1, "coarse_right": 1.0, "itm_right": 1.0}}


def test_rankings_fuse_and_centre_on_the_right_axes():
    """Two captions x three images. Image 2 scores high with every caption (a hub): centring per image
    (the IR matrix) removes it, so each caption's best image becomes its own (0, 1); centring per caption (the TR
    matrix) keeps each column's order of captions. Fusion adds w * scale * S."""
    sim = torch.tensor([[0.5, 0.1, 0.0], [0.0, 0.4, 0.2]])
    itm = torch.tensor([[1.0, -1.0, 3.0], [-2.0, 0.0, 2.0]])
    got = fine_stage.rankings(sim, itm, scale=10.0, weights=["0.5"])
    assert torch.equal(got["coarse"], sim) and torch.equal(got["itm"], itm)
    torch.testing.assert_close(got["fused"]["0.5"], torch.tensor([[3.5, -0.5, 3.0], [-2.0, 2.0, 3.0]]))
    for_ir, for_tr = got["centred"]
    torch.testing.assert_close(for_ir, torch.tensor([[1.5, -0.5, 0.5], [-1.5, 0.5, -0.5]]))  # minus column means
    torch.testing.assert_close(for_tr, torch.tensor([[0.0, -2.0, 2.0], [-2.0, 0.0, 2.0]]))  # minus row means
    assert itm.argmax(1).tolist() == [2, 2] and for_ir.argmax(1).tolist() == [0, 1]


def test_script_on_a_trained_model(tmp_path):
    source = "synthetic:seed=3,images=48,held_out=12"
    out_dir = tmp_path / "s2"
    run_cli(["--stage", "2", "--objectives", "vsc,itm", "--max_steps", "3", "--micro_batch", "8", "--data", source,
             "--output_dir", str(out_dir), "--resume", "none", "--wandb", "disabled"])
    out = tmp_path / "fine.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fine_stage.py"), "--checkpoint",
                           str(out_dir / "final"), "--top", "4", "--out", str(out)], env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert (got["images"], got["captions"], got["source"]) == (12, 24, source)
    assert got["date"] and got["command"].startswith("python benchmarks/fine_stage.py --checkpoint")
    for r1 in (got["coarse"], got["itm"], got["centred"], *got["fused"].values()):
        assert len(r1) == 2 and all(0 <= v <= 100 for v in r1)
    assert set(got["fused"]) == {"0.25", "1", "4"}
    groups = {k: v for k, v in got["near_misses"].items() if k != "captions"}
    assert 0 < got["near_misses"]["captions"] <= 24
    pairs = sum(g["pairs"] for g in groups.values())
    assert 0 < pairs <= 3 * got["near_misses"]["captions"]  # at most --top - 1 wrong images per counted caption
    assert set(groups) <= {"object", "attribute", "relation", "fits"}
