"""Coarse-to-fine retrieval against re-encoding every pair (the brute force), sharding over ranks, grounding."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mvptr_ds.config import ConfigError, ModelConfig
from mvptr_ds.data.batching import Collator
from mvptr_ds.data.synthetic import SceneSpec, SceneWorld
from mvptr_ds.evaluation.grounding import evaluate_grounding
from mvptr_ds.evaluation.metrics import retrieval_recalls
from mvptr_ds.evaluation.retrieval import (all_pairs, candidate_pairs, encode_set, evaluate_retrieval,
                                           itm_pair_scores, reencode_pair_scores, retrieval_set, shard_and_gather)
from mvptr_ds.model.heads import ITMHead
from mvptr_ds.model.mvptr import MVPTRModel


@pytest.fixture(scope="module")
def setup():
    world = SceneWorld(SceneSpec(seed=5, images=2, held_out=7, captions_per_image=2, classes=12, attributes=6,
                                 predicates=4, triples=12, regions=(6, 9), objects=(2, 4)))
    # A wide initialisation spreads the ITM scores far beyond float noise, so rankings are stable.
    cfg = ModelConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, text_layers=1, visual_layers=1,
                      cross_layers=1, hidden_dropout=0.0, attention_dropout=0.0, kernels="torch",
                      initializer_range=0.3, vocab_size=world.vocab.vocab_size,
                      only_word_size=world.vocab.only_word_size)
    torch.manual_seed(0)
    backbone, head = MVPTRModel(cfg).eval(), ITMHead(cfg).eval()
    with torch.no_grad():
        head.classifier.weight.normal_(0, 1.0)
    collator = Collator(world.vocab, objectives=())
    return SimpleNamespace(world=world, backbone=backbone, head=head, collator=collator,
                           rset=retrieval_set(world.held_out))


def brute_force_matrix(s):
    """ITM score of every (caption, image) pair, each pair re-encoded through all three encoders: [C, I]."""
    n_cap, n_img = len(s.rset.captions), len(s.rset.images)
    scores = reencode_pair_scores(s.backbone, s.head, s.rset, s.collator, all_pairs(n_cap, n_img), 16, "cpu")
    return scores.double().reshape(n_cap, n_img)


def test_cached_scores_equal_reencoded_scores(setup):
    s = setup
    enc = encode_set(s.backbone, s.rset, s.collator, 5, "cpu")
    pairs = all_pairs(len(s.rset.captions), len(s.rset.images))
    cached = itm_pair_scores(s.backbone, s.head, enc, pairs, 7)
    torch.testing.assert_close(cached, reencode_pair_scores(s.backbone, s.head, s.rset, s.collator, pairs, 16, "cpu"),
                               rtol=1e-4, atol=1e-4)


def test_full_rerank_equals_brute_force(setup):
    s = setup
    brute = brute_force_matrix(s)
    gaps = (brute.flatten()[:, None] - brute.flatten()[None, :]).abs()
    assert gaps[gaps > 0].min() > 1e-3  # the comparison below is not decided by float noise
    expected = retrieval_recalls(brute.t(), brute, s.rset.caption_image, image_key=s.rset.image_key)
    got = evaluate_retrieval(s.backbone, s.head, s.rset, s.collator, k_captions=100, k_images=100, batch_size=6)
    assert got["itm_pairs"] == brute.numel()
    for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "n_images", "n_captions"):
        assert got[key] == expected[key], key
    assert got["tr_r1"] < 100 and got["ir_r1"] < 100  # an untrained model: the check is not trivially all-right


@pytest.mark.parametrize("scale", [0.7, 1e4])
def test_a_prior_adds_the_scaled_similarity_to_every_fine_score(setup, scale):
    """A model trained with --itm_prior re-ranks by ITM + scale * S: by hand on the brute-force scores; a
    huge scale gives back the coarse ranking."""
    s = setup
    brute = brute_force_matrix(s)
    enc = encode_set(s.backbone, s.rset, s.collator, 64, "cpu")
    sim = (enc.text_embed @ enc.visual_embed.t()).double()  # (C, I)
    fine = brute + scale * sim
    expected = retrieval_recalls(fine.t(), fine, s.rset.caption_image, image_key=s.rset.image_key)
    got = evaluate_retrieval(s.backbone, s.head, s.rset, s.collator, k_captions=100, k_images=100, batch_size=6,
                             itm_prior_scale=scale)
    plain = evaluate_retrieval(s.backbone, s.head, s.rset, s.collator, k_captions=100, k_images=100, batch_size=6)
    keys = ("tr_r1", "tr_r5", "ir_r1", "ir_r5")
    assert all(got[k] == expected[k] for k in keys), (got, expected)
    assert any(plain[k] != got["coarse"][k] for k in keys)  # the head alone ranks differently from S here
    if scale > 1e3:
        assert all(got[k] == got["coarse"][k] for k in keys)


@pytest.mark.parametrize("kc,ki", [(1, 1), (3, 2), (2, 5)])
def test_partial_rerank_matches_a_loop_reference(setup, kc, ki):
    s = setup
    brute = brute_force_matrix(s)
    enc = encode_set(s.backbone, s.rset, s.collator, 64, "cpu")
    sim = (enc.text_embed @ enc.visual_embed.t()).double()  # (C, I)
    n_cap, n_img = sim.shape
    i2t, t2i = sim.t().clone(), sim.clone()
    for i in range(n_img):  # each image: its top-kc captions by sim, re-scored by ITM, above all others
        top = sorted(range(n_cap), key=lambda c: (-sim[c, i].item(), c))[:kc]
        for c in top:
            i2t[i, c] = 1e6 + brute[c, i]
    for c in range(n_cap):
        top = sorted(range(n_img), key=lambda i: (-sim[c, i].item(), i))[:ki]
        for i in top:
            t2i[c, i] = 1e6 + brute[c, i]
    expected = retrieval_recalls(i2t, t2i, s.rset.caption_image, image_key=s.rset.image_key)
    got = evaluate_retrieval(s.backbone, s.head, s.rset, s.collator, k_captions=kc, k_images=ki, batch_size=4)
    assert got["itm_pairs"] == candidate_pairs(sim, kc, ki).shape[0] < n_cap * n_img
    for key in ("tr_r1", "tr_r5", "ir_r1", "ir_r5"):
        assert got[key] == expected[key], key
    coarse = retrieval_recalls(sim.t(), sim, s.rset.caption_image, image_key=s.rset.image_key)  # before re-ranking
    for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"):
        assert got["coarse"][key] == coarse[key], key


def test_duplicate_rows_of_one_image_are_one_image(setup):
    ds = setup.world.held_out
    rows = [ds[i] for i in range(len(ds))]
    rset = retrieval_set(rows + rows[:3])  # the first images' pairs listed again
    assert len(rset.images) == len(setup.rset.images) and len(rset.captions) == len(rows) + 3
    assert rset.caption_image[-3:].tolist() == setup.rset.caption_image[:3].tolist()
    clone = [r.__class__(**{**r.__dict__, "image_id": 1000 + r.image_id}) for r in rows[:2]]
    keyed = retrieval_set(rows + clone)  # same pixels under a new id: a separate entry, same key
    assert len(keyed.images) == len(setup.rset.images) + 1
    assert keyed.image_key[-1] == keyed.image_key[keyed.caption_image[0]]


def _shard_worker(rank, world_size, port, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    pairs = all_pairs(3, 5)[:13]
    seen = []

    def score(p):
        seen.append(p.shape[0])
        return (p[:, 0] * 10 + p[:, 1]).float()

    out = shard_and_gather(pairs, score, rank, world_size)
    queue.put((rank, out.tolist(), seen))
    dist.destroy_process_group()


def test_pairs_are_sharded_over_ranks_and_gathered_in_order():
    from conftest import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_shard_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    expected = [float(c * 10 + i) for c, i in all_pairs(3, 5)[:13].tolist()]
    assert [r[1] for r in results] == [expected, expected]
    assert [r[2] for r in results] == [[7], [6]]  # each rank scored its share only


class _OracleBackbone:
    """Cross-modal outputs where each concept equals one region: its true one (``hit``) or another."""

    with_cross = True
    training = False

    def __init__(self, hit: bool):
        self.hit = hit

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, batch, run_cross=True):
        lt, lr = batch.text_mask.shape[1], batch.region_mask.shape[1]
        b = batch.text_mask.shape[0]
        cross = torch.zeros(b, lt + lr, lr + 1)
        cross[:, lt:, :lr] = torch.eye(lr)
        n_regions = batch.region_mask.sum(1)
        target = batch.phrase_regions.clamp(min=0)
        if not self.hit:
            target = (target + 1) % n_regions[:, None]
        cross[:, :lt].scatter_(2, target.unsqueeze(-1), 1.0)
        return SimpleNamespace(cross=cross)


def test_grounding_counts_against_an_oracle(setup):
    ds = setup.world.held_out
    scored = [(r, ex.regions.shape[0]) for ex in (ds[i] for i in range(len(ds)))
              for r in ex.concept_regions[:5] if 0 <= r < 50]
    chance = 100 * np.mean([1 / n for _, n in scored])
    right = evaluate_grounding(_OracleBackbone(True), ds, setup.collator, batch_size=3)
    wrong = evaluate_grounding(_OracleBackbone(False), ds, setup.collator, batch_size=3)
    assert right == {"accuracy": 100.0, "chance": pytest.approx(chance), "n": len(scored)}
    assert wrong["accuracy"] == 0.0 and wrong["n"] == len(scored)
    real = evaluate_grounding(setup.backbone, ds, setup.collator, batch_size=4)
    assert 0 <= real["accuracy"] <= 100 and real["n"] == len(scored)


def test_grounding_refuses_a_stage1_model(setup):
    stage1 = MVPTRModel(setup.backbone.cfg, with_cross=False)
    with pytest.raises(ConfigError, match="stage-1"):
        evaluate_grounding(stage1, setup.world.held_out, setup.collator)


def test_a_corrupting_collator_is_refused(setup):
    with pytest.raises(ValueError, match="corrupts"):
        evaluate_retrieval(setup.backbone, setup.head, setup.rset, Collator(setup.world.vocab, ("mlm",)))
