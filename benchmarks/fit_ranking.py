"""A reference for held-out retrieval on the built-in world: the R@1 of a ranking that knows which images fit.

    python benchmarks/fit_ranking.py --seeds 0,5,11,2026,7331,9001

A caption states only some facts of its image, so other held-out images may fit it as well: an image *fits*
a caption when its scene graph holds every concept tuple of the caption (the object, the (object, attribute)
pair, the relation triple). A ranking that knows which images fit each caption, and nothing else, ranks the
fitting images first and breaks ties among them at random: its expected IR R@1 is the mean over captions of
1 / (images fitting the caption); for TR, each image ranks first the fitting captions that fit the fewest
images, and scores the share of its own among them. Both in percent, next to the chance level of ``evaluate``
(1 / images). Not an upper bound: a ranking that also uses how captions are written (an image with fewer
objects says a given object more often; a caption names an image's relation 70% of the time) does slightly
better, and ``evaluate`` counts ties against the model rather than breaking them at random.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Set, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvptr_ds.data.synthetic import SceneImage, SceneWorld, parse_synthetic_source  # noqa: E402


def image_facts(image: SceneImage) -> Set[Tuple[str, ...]]:
    """Every concept tuple the image's scene graph holds."""
    facts = set()
    for ob in image.objects:
        facts.add((ob.name,))
        facts.add((ob.name, ob.attribute))
    for s, pred, o in image.relations:
        facts.add((image.objects[s].name, pred, image.objects[o].name))
    return facts


def fit_ranking_r1(world: SceneWorld) -> Dict[str, float]:
    """On the held-out split: ``tr_r1``, ``ir_r1`` (the fit-only ranking's expected R@1), ``chance`` and
    ``mean_fitting`` (images fitting a caption), percent except ``mean_fitting``."""
    images = [im for im in world.images if im.split == "held_out"]
    captions = [c for c in world.captions if c.split == "held_out"]
    if not images or not captions:
        raise ValueError("fit_ranking: the world has no held-out captions")
    facts = [image_facts(im) for im in images]
    fits = np.array([[set(map(tuple, c.tuples)) <= f for f in facts] for c in captions])  # (C, I)
    own = np.array([[c.image_id == im.image_id for im in images] for c in captions])
    n_fit = fits.sum(1)
    tr = []
    for j in range(len(images)):
        candidates = np.flatnonzero(fits[:, j])
        best = candidates[n_fit[candidates] == n_fit[candidates].min()]
        tr.append(own[best, j].mean())
    return {"tr_r1": 100 * float(np.mean(tr)), "ir_r1": 100 * float(np.mean(1.0 / n_fit)),
            "chance": 100 / len(images), "mean_fitting": float(n_fit.mean())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,2026,7331,9001", help="comma list of world seeds (synthetic:seed=N)")
    p.add_argument("--world", default="", help="more keys of the synthetic source, e.g. images=4096")
    args = p.parse_args(argv)
    out = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        source = f"synthetic:seed={seed}" + (f",{args.world}" if args.world else "")
        out[seed] = {k: round(v, 2) for k, v in fit_ranking_r1(SceneWorld(parse_synthetic_source(source))).items()}
        print(json.dumps({"seed": seed, **out[seed]}), flush=True)
    return out


if __name__ == "__main__":
    main()
