"""Where ITM re-ranking loses to the coarse ranking, on a trained model and the built-in world's held-out images.

    python benchmarks/fine_stage.py --checkpoint s2/final [--top 8] [--out fine_stage.json]

Every held-out (caption, image) pair is scored twice: the contrastive similarity ``S`` of the uni-modal
embeddings and the ITM score re-ranking uses, the head's ``logit(match) - logit(no match)`` on the cross-modal
encoder (from the cached states, as ``evaluate`` does; plus ``e^tau S`` for a model trained with ``--itm_prior``).
It prints one JSON object of R@1 (TR, IR; percent) for:

- ``coarse`` (``S``), ``itm`` (ITM on all pairs), ``fused`` (ITM + w e^tau S for each ``--weights`` w),
  ``centred`` (ITM minus each candidate's mean score: the images' means for IR, the captions' for TR; a large
  gain would mean a few candidates score high for every query, "hubs");
- ``near_misses``: the captions whose image is among their ``--top`` coarse candidates (what re-ranking
  those candidates could put first; ``captions`` counts them), and the wrong images among those candidates,
  grouped by what they lack of the caption's concept tuples (from the world's scene graphs): ``object`` (an
  object the caption names), ``attribute`` (no object; an (object, attribute) pair, and perhaps a relation),
  ``relation`` (only relations), ``fits`` (nothing: the caption fits that image too); per group the pairs and
  the share each score orders right (the caption's image, or the best of its duplicates, above the wrong one).
  The coarse shares are of pairs the coarse ranking itself put near the top, so they are below what the same
  score gives on pairs drawn at random.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fit_ranking import image_facts  # noqa: E402
from machine import environment  # noqa: E402

from mvptr_ds.evaluation import retrieval as R  # noqa: E402
from mvptr_ds.evaluation.metrics import retrieval_recalls  # noqa: E402


def near_miss_kind(caption_tuples: Sequence[tuple], facts: set) -> str:
    """What an image with scene-graph ``facts`` lacks of a caption's tuples (module docstring's groups)."""
    missing = [t for t in caption_tuples if t not in facts]
    if not missing:
        return "fits"
    if any(len(t) == 1 for t in missing):
        return "object"
    return "relation" if all(len(t) == 3 for t in missing) else "attribute"


def near_misses(sim: torch.Tensor, itm: torch.Tensor, rset, caption_tuples: List[List[tuple]],
                image_facts_: List[set], top: int) -> Dict[str, object]:
    """Pairwise order of each caption's image against the wrong images in its coarse top ``top``, by group,
    over the captions whose image is among those candidates (module docstring)."""
    counts = defaultdict(lambda: [0, 0, 0])  # group -> [pairs, coarse right, ITM right]
    counted = 0
    for c in range(sim.shape[0]):
        right = rset.image_key == rset.image_key[int(rset.caption_image[c])]  # (I,) its image and duplicates
        candidates = torch.sort(sim[c], descending=True, stable=True).indices[:top].tolist()
        wrong = [j for j in candidates if not right[j]]
        if len(wrong) == len(candidates):  # its image is not among them: nothing to re-rank towards
            continue
        counted += 1
        best_sim, best_itm = sim[c][right].max(), itm[c][right].max()
        for j in wrong:
            n = counts[near_miss_kind(caption_tuples[c], image_facts_[j])]
            n[0] += 1
            n[1] += int(best_sim > sim[c, j])
            n[2] += int(best_itm > itm[c, j])
    groups = {k: {"pairs": n, "coarse_right": round(cr / n, 3), "itm_right": round(ir / n, 3)}
              for k, (n, cr, ir) in sorted(counts.items())}
    return {"captions": counted, **groups}


def rankings(sim: torch.Tensor, itm: torch.Tensor, scale: float, weights: Sequence[str]) -> Dict[str, object]:
    """The ``[C, I]`` score matrices the module docstring lists: ``coarse``, ``itm``, ``fused`` (one per weight,
    keyed by it) and ``centred`` (a pair: the IR matrix centred per image, the TR one per caption)."""
    return {"coarse": sim, "itm": itm, "fused": {w: itm + float(w) * scale * sim for w in weights},
            "centred": (itm - itm.mean(0, keepdim=True), itm - itm.mean(1, keepdim=True))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a stage-2 model (a final/ or checkpoint directory)")
    p.add_argument("--data", default=None, help="a built-in world (default: the checkpoint's)")
    p.add_argument("--top", type=int, default=8, help="coarse candidates per caption in near_misses")
    p.add_argument("--weights", default="0.25,1,4", help="comma list of w in fused = ITM + w e^tau S")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    from mvptr_ds.evaluation.loading import load_eval_data, load_model

    model = load_model(args.checkpoint)
    if model.itm_head is None or not model.backbone.with_cross:
        sys.exit(f"error: {args.checkpoint} has no ITM head (a stage-2 model trained with itm is needed)")
    bundle, split, _ = load_eval_data(model, args.data)
    if bundle.world is None:
        sys.exit("error: --data must be a built-in world (synthetic:...): near misses need its scene graphs")
    model.backbone.eval()
    model.itm_head.eval()
    rset = R.retrieval_set(split)
    with torch.no_grad():
        enc = R.encode_set(model.backbone, rset, bundle.collator, 64, "cpu")
        sim = enc.text_embed.float() @ enc.visual_embed.float().t()  # (C, I)
        n_cap, n_img = sim.shape
        itm = R.itm_pair_scores(model.backbone, model.itm_head, enc, R.all_pairs(n_cap, n_img),
                                args.batch_size).reshape(n_cap, n_img) + model.itm_prior_scale * sim
        scale = float(model.backbone.logit_scale.exp())

    def r1(scores) -> List[float]:
        """[TR, IR] R@1 of a ``[C, I]`` matrix, or of a pair (the IR matrix, the TR matrix)."""
        for_ir, for_tr = scores if isinstance(scores, tuple) else (scores, scores)
        r = retrieval_recalls(for_tr.t().double(), for_ir.double(), rset.caption_image, image_key=rset.image_key)
        return [round(r["tr_r1"], 1), round(r["ir_r1"], 1)]

    world = bundle.world  # captions and images are lists indexed by their ids
    ranked = rankings(sim, itm, scale, args.weights.split(","))
    out = {"checkpoint": args.checkpoint, "source": args.data or model.config.data.source, "images": n_img,
           "captions": n_cap,
           "coarse": r1(ranked["coarse"]), "itm": r1(ranked["itm"]),
           "fused": {w: r1(m) for w, m in ranked["fused"].items()}, "centred": r1(ranked["centred"]),
           "near_misses": near_misses(
               sim, itm, rset, [[tuple(t) for t in world.captions[ex.sample_id].tuples] for ex in rset.captions],
               [image_facts(world.images[i]) for i in rset.image_ids], args.top),
           "command": "python benchmarks/fine_stage.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out["machine"] = environment(torch.device("cpu"))
    out["date"] = out["machine"]["date"]
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
