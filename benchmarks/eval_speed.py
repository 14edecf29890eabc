"""Retrieval evaluation: cached coarse-to-fine vs. re-encoding every pair (the authors' way), in one run.

    python benchmarks/eval_speed.py                              # tiny model, 100 held-out images x 2 captions
    python benchmarks/eval_speed.py --checkpoint runs/demo_stage2/final --images 64

Three ways to score the same retrieval set with the same weights:

* ``cached``: this project's evaluation (``evaluate_retrieval``): each image and caption through its
  uni-modal encoder once, coarse ranking, ITM on the top ``k_captions``/``k_images`` candidates reading the
  cached states (cross-modal encoder only);
* ``reencode_all``: the authors' evaluation: every (caption, image) pair through all three encoders;
* ``reencode_candidates``: the same candidate pairs as ``cached``, each re-encoded through all three
  encoders (isolates the gain of the cache from the gain of the top-k pruning).

Prints one JSON line: seconds of each, the speed-ups, pairs scored, and the recalls of each (the cached and
re-encoded scores agree up to float rounding, so the recalls agree too).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvptr_ds.config import MODEL_PRESETS  # noqa: E402
from mvptr_ds.data.batching import Collator  # noqa: E402
from mvptr_ds.data.synthetic import SceneSpec, SceneWorld  # noqa: E402
from mvptr_ds.evaluation.metrics import retrieval_recalls  # noqa: E402
from mvptr_ds.evaluation.retrieval import (all_pairs, candidate_pairs, coarse_to_fine_scores, encode_set,  # noqa: E402
                                           evaluate_retrieval, reencode_pair_scores, retrieval_set)

KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")


def build_model(args, vocab):
    import dataclasses

    from mvptr_ds.evaluation.loading import LoadedModel, load_model
    from mvptr_ds.model.heads import ITMHead
    from mvptr_ds.model.mvptr import MVPTRModel

    if args.checkpoint:
        return load_model(args.checkpoint)
    cfg = dataclasses.replace(MODEL_PRESETS[args.model], vocab_size=vocab.vocab_size,
                              only_word_size=vocab.only_word_size)
    torch.manual_seed(0)
    return LoadedModel(MVPTRModel(cfg).eval(), ITMHead(cfg).eval(), None, "random init")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=100, help="held-out images (2 captions each)")
    p.add_argument("--seed", type=int, default=2027, help="seed of the synthetic world's images")
    p.add_argument("--model", default="tiny", help="preset for a random-init model (ignored with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="evaluate these weights (their world's laws must match)")
    p.add_argument("--k_captions", type=int, default=128)
    p.add_argument("--k_images", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    world = SceneWorld(SceneSpec(seed=args.seed, images=1, held_out=args.images, captions_per_image=2))
    model = build_model(args, world.vocab)
    collator = Collator(world.vocab, objectives=())
    rset = retrieval_set(world.held_out)
    bb, head, bs = model.backbone, model.itm_head, args.batch_size
    prior = model.itm_prior_scale  # a model trained with --itm_prior is scored with e^tau S added

    warm = retrieval_set([world.held_out[i] for i in range(min(4, len(world.held_out)))])
    evaluate_retrieval(bb, head, warm, collator, 2, 2, bs)  # first-call costs (allocator, dispatch) not timed
    reencode_pair_scores(bb, head, warm, collator, all_pairs(2, 2), bs, "cpu")

    start = time.perf_counter()
    cached = evaluate_retrieval(bb, head, rset, collator, args.k_captions, args.k_images, bs, itm_prior_scale=prior)
    t_cached = time.perf_counter() - start

    enc = encode_set(bb, rset, collator, bs, "cpu")
    sim = enc.text_embed @ enc.visual_embed.t()
    cands = candidate_pairs(sim, args.k_captions, args.k_images)
    start = time.perf_counter()
    itm = reencode_pair_scores(bb, head, rset, collator, cands, bs, "cpu") + prior * sim[cands[:, 0], cands[:, 1]]
    i2t, t2i = coarse_to_fine_scores(sim, cands, itm, args.k_captions, args.k_images)
    t_cands = time.perf_counter() - start
    recall_cands = retrieval_recalls(i2t, t2i, rset.caption_image, image_key=rset.image_key)

    n_cap, n_img = len(rset.captions), len(rset.images)
    if cands.shape[0] == n_cap * n_img:  # k covers every pair: re-encoding all pairs is the run just timed
        t_all, recall_all = t_cands, recall_cands
    else:
        start = time.perf_counter()
        full = reencode_pair_scores(bb, head, rset, collator, all_pairs(n_cap, n_img), bs, "cpu").double()
        full = full.reshape(n_cap, n_img) + prior * sim.double()
        recall_all = retrieval_recalls(full.t(), full, rset.caption_image, image_key=rset.image_key)
        t_all = time.perf_counter() - start

    print(json.dumps({
        "images": n_img, "captions": n_cap, "model": args.checkpoint or args.model,
        "k_captions": args.k_captions, "k_images": args.k_images, "batch_size": bs,
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "seconds": {"cached": round(t_cached, 2), "reencode_candidates": round(t_cands, 2),
                    "reencode_all": round(t_all, 2)},
        "speedup_vs_reencode_all": round(t_all / t_cached, 2),
        "speedup_vs_reencode_candidates": round(t_cands / t_cached, 2),
        "pairs": {"cached_itm": cached["itm_pairs"], "reencode_candidates": int(cands.shape[0]),
                  "reencode_all": n_cap * n_img},
        "recalls": {"cached": {k: cached[k] for k in KEYS}, "reencode_candidates": {k: recall_cands[k] for k in KEYS},
                    "reencode_all": {k: recall_all[k] for k in KEYS}},
    }))


if __name__ == "__main__":
    main()
