"""benchmarks/fit_ranking.py: the expected R@1 of a ranking that knows which held-out images fit each caption."""
import sys
from collections import Counter
from types import SimpleNamespace as NS

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import fit_ranking  # noqa: E402

from mvptr_ds.data.synthetic import SceneSpec, SceneWorld  # noqa: E402


def test_one_object_worlds_tie_every_image_of_a_class():
    """One object per image, one attribute, no relation: a caption fits exactly the held-out images of its
    object's class, so IR R@1 is the mean of 1 / (images of that class), and TR the same (each image's best
    captions are all captions of its class, two of them its own)."""
    spec = SceneSpec(seed=4, images=8, held_out=24, classes=3, objects=(1, 1), attributes=1, attributes_per_class=1,
                     triples=1)
    world = SceneWorld(spec)
    held = [im for im in world.images if im.split == "held_out"]
    per_class = Counter(im.objects[0].name for im in held)
    assert len(per_class) > 1  # the check below is not the trivial one-class case
    expected = 100 * sum(1 / per_class[im.objects[0].name] for im in held) / len(held)
    got = fit_ranking.fit_ranking_r1(world)
    assert got["ir_r1"] == pytest.approx(expected)  # every image has captions_per_image = 2 captions
    assert got["tr_r1"] == pytest.approx(expected)
    assert got["chance"] == pytest.approx(100 / 24)
    assert got["mean_fitting"] == pytest.approx(sum(per_class[im.objects[0].name] for im in held) / len(held))


def test_relations_and_the_text_side_rule_on_a_hand_made_world():
    """Images 0 and 1 show a red dog and a black cat; only 0 has "dog near cat". Caption 0 (image 0) states the
    relation and fits image 0 alone; the other three fit both. IR: (1 + 1/2 + 1/2 + 1/2) / 4 = 62.5 (50 if the
    relation were ignored). TR: image 0 ranks caption 0 first (fits one image): 1; image 1's best captions are
    1, 2 and 3 (two images each), two of them its own: 2/3; mean 83.3 (75 for the best 1/fits among an image's
    own captions, 100 without relations)."""
    objects = [NS(name="dog", attribute="red"), NS(name="cat", attribute="black")]
    images = [NS(image_id=0, split="held_out", objects=objects, relations=[(0, "near", 1)]),
              NS(image_id=1, split="held_out", objects=objects, relations=[])]
    captions = [NS(image_id=0, split="held_out", tuples=[("dog",), ("dog", "near", "cat")]),
                NS(image_id=0, split="held_out", tuples=[("cat",)]),
                NS(image_id=1, split="held_out", tuples=[("dog",), ("dog", "red")]),
                NS(image_id=1, split="held_out", tuples=[("cat",), ("cat", "black")]),
                NS(image_id=1, split="train", tuples=[("dog",)])]  # another split: not counted
    got = fit_ranking.fit_ranking_r1(NS(images=images + [NS(image_id=2, split="train", objects=[], relations=[])],
                                        captions=captions))
    assert got["ir_r1"] == pytest.approx(62.5)
    assert got["tr_r1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert got["mean_fitting"] == pytest.approx(7 / 4) and got["chance"] == pytest.approx(50)


def test_demo_world_figures_and_cli(capsys):
    """The demo's world (seed 0): the figures BENCHMARKS.md quotes."""
    out = fit_ranking.main(["--seeds", "0"])
    assert out[0]["ir_r1"] == pytest.approx(86.17, abs=0.01) and out[0]["tr_r1"] == pytest.approx(97.92, abs=0.01)
    assert out[0]["mean_fitting"] == pytest.approx(1.59, abs=0.01)
    assert '"seed": 0' in capsys.readouterr().out


def test_world_without_held_out_is_one_clear_error():
    with pytest.raises(ValueError, match="no held-out"):
        fit_ranking.fit_ranking_r1(SceneWorld(SceneSpec(seed=1, images=4, held_out=0)))
