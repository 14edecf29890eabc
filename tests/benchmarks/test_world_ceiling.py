"""benchmarks/world_ceiling.py: the ambiguity ceiling of held-out retrieval, checked on worlds whose answer is known."""
import sys
from collections import Counter

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import world_ceiling  # noqa: E402

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
    got = world_ceiling.retrieval_ceiling(world)
    assert got["ir_r1"] == pytest.approx(expected)  # every image has captions_per_image = 2 captions
    assert got["tr_r1"] == pytest.approx(expected)
    assert got["chance"] == pytest.approx(100 / 24)
    assert got["mean_fitting"] == pytest.approx(sum(per_class[im.objects[0].name] for im in held) / len(held))


def test_demo_world_ceiling_and_cli(capsys):
    """On the demo's world most captions fit their image alone: the ceiling is far above the 20x-chance bound
    of the demo (31.25%) and below 100 (some captions fit several images)."""
    out = world_ceiling.main(["--seeds", "0"])
    assert 80 < out[0]["ir_r1"] < 100 and 90 < out[0]["tr_r1"] <= 100 and out[0]["mean_fitting"] > 1
    assert '"seed": 0' in capsys.readouterr().out


def test_world_without_held_out_is_one_clear_error():
    with pytest.raises(ValueError, match="no held-out"):
        world_ceiling.retrieval_ceiling(SceneWorld(SceneSpec(seed=1, images=4, held_out=0)))
