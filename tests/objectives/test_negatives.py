"""Negative choices of ITM (hardest / sampled / random) and WPG (joint / separate / shared cross-modal states)."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mvptr_ds.config import MODEL_PRESETS, ConfigError, DataConfig, ObjectiveConfig
from mvptr_ds.data.batching import BatchContext
from mvptr_ds.data.pipeline import build_data
from mvptr_ds.objectives import wpg_loss
from mvptr_ds.objectives.wpg import wpg_shared_loss
from mvptr_ds.objectives.itm import blocked_candidates, hardest_negatives, negative_pairs, sampled_negatives
from mvptr_ds.objectives.pretraining import build_pretraining_module
from test_wpg import random_case


# ---- ITM ----------------------------------------------------------------------------------------------

def _draws(n, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def test_sampled_negatives_never_same_image_and_follow_softmax():
    sim = torch.tensor([[0.9, 0.9, 0.5, 0.0]])  # candidate 1 shows the row's image
    ids, cand = torch.tensor([7]), torch.tensor([7, 7, 8, 9])
    blocked = blocked_candidates(ids, cand, torch.tensor([0]))
    draws = torch.cat([sampled_negatives(sim, blocked, torch.tensor(2.0), u[None])[0] for u in _draws(4000)])
    assert set(draws.tolist()) == {2, 3}
    p2 = math.exp(2 * 0.5) / (math.exp(2 * 0.5) + 1.0)  # softmax over the two valid candidates
    assert (draws == 2).float().mean().item() == pytest.approx(p2, abs=0.03)


def test_release_blocks_only_the_pair_itself():
    ids, cand = torch.tensor([7, 7]), torch.tensor([7, 7, 8])
    own = torch.tensor([0, 1])
    assert blocked_candidates(ids, cand, own, exclude_same_image=False).tolist() == [[True, False, False],
                                                                                      [False, True, False]]
    assert blocked_candidates(ids, cand, own).tolist() == [[True, True, False], [True, True, False]]
    # The release's S - 2I: the hardest negative of row 0 is the other caption of its image.
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.9, 0.2]])
    idx, valid = hardest_negatives(sim, blocked_candidates(ids, cand, own, exclude_same_image=False))
    assert idx.tolist() == [1, 0] and valid.all()


def test_sampled_negatives_at_large_scale_are_the_hardest_and_rows_without_candidates_are_invalid():
    torch.manual_seed(1)
    sim = torch.randn(5, 6)
    ids = torch.tensor([0, 0, 1, 2, 3])
    cand = torch.tensor([0, 0, 1, 2, 3, 4])
    blocked = blocked_candidates(ids, cand, torch.arange(5))
    idx, valid = sampled_negatives(sim, blocked, torch.tensor(1e4), _draws(5))
    hard, hard_valid = hardest_negatives(sim, blocked)
    assert torch.equal(idx, hard) and torch.equal(valid, hard_valid)
    none = blocked_candidates(torch.tensor([3, 3]), torch.tensor([3, 3]), torch.arange(2))
    idx, valid = sampled_negatives(torch.randn(2, 2), none, torch.tensor(1.0), _draws(2))
    assert not valid.any() and idx.shape == (2,)  # finite probabilities even with nothing to choose


def test_random_negatives_cover_every_other_image_uniformly_and_follow_the_draws():
    ids = torch.tensor([0, 1, 2, 3, 3])
    sim = torch.eye(5) * 10  # would make "hardest" irrelevant; "random" ignores it
    side = torch.tensor([True, False, True, False, False])
    draws = [torch.rand(5, 2, generator=torch.Generator().manual_seed(k)) for k in range(600)]
    first = [negative_pairs(sim, sim.t(), ids, ids, 0, side, "random", draw=d) for d in draws]
    images = torch.stack([f[1][0] for f in first])  # row 0 is a text row: its negative image
    counts = torch.bincount(images, minlength=5)
    assert counts[0] == 0 and (counts[1:] > 100).all()  # 4 candidates, ~150 each
    again = [negative_pairs(sim, sim.t(), ids, ids, 0, side, "random", draw=d) for d in draws]
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(first, again))
    with pytest.raises(ValueError, match="negatives mode 'hardst'"):
        negative_pairs(sim, sim.t(), ids, ids, 0, side, "hardst")


@pytest.mark.parametrize("mode", ["sampled", "random"])
def test_global_candidates_are_drawn_and_rows_keep_their_side(mode):
    # Rank 1 of 2 (offset 3) with 3 local pairs; 6 gathered candidates, two of which show local images.
    ids = torch.tensor([0, 1, 2, 3, 4, 5])
    local = ids[3:]
    g = torch.Generator().manual_seed(4)
    t2v, v2t = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    text_rows = torch.tensor([True, False, True])
    seen = set()
    for _ in range(300):
        text_idx, image_idx, valid = negative_pairs(t2v, v2t, local, ids, 3, text_rows, mode,
                                                    scale=torch.tensor(2.0), draw=torch.rand(3, 2, generator=g))
        assert valid.all() and ((text_idx >= 0) & (text_idx < 6) & (image_idx >= 0) & (image_idx < 6)).all()
        own = torch.arange(3) + 3
        assert torch.equal(text_idx[text_rows], own[text_rows]) and torch.equal(image_idx[~text_rows], own[~text_rows])
        assert (ids[image_idx] != local).logical_or(~text_rows).all()  # text rows: another image
        assert (ids[text_idx] != local).logical_or(text_rows).all()    # image rows: another image's text
        seen.update(image_idx[text_rows].tolist())
    assert seen & {0, 1, 2}  # candidates held by the other rank are drawn


def test_objective_config_rejects_unknown_negative_modes():
    with pytest.raises(ConfigError, match="itm_negatives='easy'"):
        ObjectiveConfig(itm_negatives="easy").validate()
    with pytest.raises(ConfigError, match="wpg_negative_encoding='both'"):
        ObjectiveConfig(wpg_negative_encoding="both").validate()
    with pytest.raises(ConfigError, match="wpg_temperature=0.0001: must be a finite number >= 0.001"):
        ObjectiveConfig(wpg_temperature=1e-4).validate()
    with pytest.raises(ConfigError, match="unknown objective 'foo'"):
        ObjectiveConfig(weights=(("foo", 2.0),)).validate()
    with pytest.raises(ConfigError, match="finite number >= 0"):
        ObjectiveConfig(weights=(("wpg", float("nan")),)).validate()
    assert ObjectiveConfig().wpg_negative_encoding == "separate" and ObjectiveConfig().itm_negatives == "hardest"


# ---- WPG ----------------------------------------------------------------------------------------------

def joint_reference(cross, neg_cross, batch, margin, topk):
    """Per pair: s(i, i) on pair i's encoding, s(i, j) on the joint encoding of (caption i, image j)."""
    lt = batch.phrase_mask.shape[1]

    def score(states, mask_regions, i, pick):
        phrases = states[:lt][batch.phrase_mask[i]]
        regions = states[lt:][mask_regions]
        if len(phrases) == 0 or len(regions) == 0:
            return None
        picks = pick[i][batch.phrase_mask[i]]
        cos = F.normalize(phrases, dim=-1) @ F.normalize(regions, dim=-1).t()
        k = min(topk, len(regions))
        top = cos.topk(k, dim=-1).values
        return torch.stack([top[p, min(int(picks[p] * k), k - 1)] for p in range(len(phrases))]).mean()

    hinges = []
    for i in range(cross.shape[0]):
        j = int(batch.wpg_negative_pair[i])
        if j < 0 or batch.image_ids[j] == batch.image_ids[i]:
            continue
        s_pos = score(cross[i], batch.region_mask[i], i, batch.wpg_pick_positive)
        s_neg = score(neg_cross[i], batch.region_mask[j], i, batch.wpg_pick_negative)
        if s_pos is None or s_neg is None:
            continue
        hinges.append(torch.clamp(margin + s_neg - s_pos, min=0))
    return torch.stack(hinges).mean()


@pytest.mark.parametrize("seed", [0, 2])
def test_wpg_joint_negatives_value_and_gradients(seed):
    cross, batch = random_case(seed)
    g = torch.Generator().manual_seed(100 + seed)
    lt = batch.phrase_mask.shape[1]
    neg_cross = torch.randn(cross.shape, generator=g)
    neg_cross[:, lt:] *= batch.region_mask[batch.wpg_negative_pair.clamp(min=0)][..., None]
    neg_cross.requires_grad_()
    out = wpg_loss(SimpleNamespace(cross=cross), batch, margin=0.2, topk=3, negative_cross=neg_cross)
    ref = joint_reference(cross, neg_cross, batch, 0.2, 3)
    assert ref.item() > 0 and out.loss.item() == pytest.approx(ref.item(), abs=1e-6)
    got = torch.autograd.grad(out.loss, (cross, neg_cross))
    want = torch.autograd.grad(ref, (cross, neg_cross))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    assert got[1].abs().sum() > 0  # the negative's encoding is trained
    with pytest.raises(ValueError, match="negative_cross has shape"):
        wpg_loss(SimpleNamespace(cross=cross), batch, negative_cross=neg_cross[:, :-1])


def shared_reference(shared, batch, temperature, exclude_same_image=True):
    """Per scored phrase of caption i: -log of its softmax mass on image i's regions among those of i and j."""
    lt, lr = batch.phrase_mask.shape[1], batch.region_mask.shape[1]
    terms = []
    for i in range(shared.shape[0]):
        j = int(batch.wpg_negative_pair[i])
        if j < 0 or (exclude_same_image and batch.image_ids[j] == batch.image_ids[i]):
            continue
        own = shared[i, lt:lt + lr][batch.region_mask[i]]
        other = shared[i, lt + lr:][batch.region_mask[j]]
        if len(own) == 0 or len(other) == 0:
            continue
        for phrase in shared[i, :lt][batch.phrase_mask[i]]:
            cos = F.normalize(torch.cat([own, other]), dim=-1) @ F.normalize(phrase, dim=0) / temperature
            terms.append(-torch.log(torch.softmax(cos, dim=0)[:len(own)].sum()))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_wpg_shared_value_and_gradients(seed, temperature):
    cross, batch = random_case(seed)
    batch.wpg_negative_pair[5] = 3  # row 5 (phrases, regions) now draws a negative image without regions
    g = torch.Generator().manual_seed(200 + seed)
    lt, lr = batch.phrase_mask.shape[1], batch.region_mask.shape[1]
    shared = torch.randn(cross.shape[0], lt + 2 * lr, cross.shape[2], generator=g)
    shared[:, lt:lt + lr] *= batch.region_mask[..., None]
    shared[:, lt + lr:] *= batch.region_mask[batch.wpg_negative_pair.clamp(min=0)][..., None]
    shared.requires_grad_()
    out = wpg_shared_loss(SimpleNamespace(cross=cross), batch, shared, temperature=temperature)
    ref = shared_reference(shared, batch, temperature)
    assert ref.item() > 0 and out.loss.item() == pytest.approx(ref.item(), abs=1e-5)
    got, want = torch.autograd.grad(out.loss, shared), torch.autograd.grad(ref, shared)
    assert torch.allclose(got[0], want[0], atol=1e-5)
    assert out.metrics["pairs"].item() == 2  # rows 0, 2; 1 no phrase, 3 no region, 4 same image, 5 empty negative
    assert 0 < out.metrics["pos"].item() < 1
    # the release's choice: a negative of the same image (row 4 -> row 1) is scored too
    kept = wpg_shared_loss(SimpleNamespace(cross=cross), batch, shared, temperature=temperature,
                           exclude_same_image=False)
    assert kept.metrics["pairs"].item() == 3
    assert kept.loss.item() == pytest.approx(shared_reference(shared, batch, temperature, False).item(), abs=1e-5)
    assert kept.loss.item() != pytest.approx(out.loss.item(), abs=1e-6)
    with pytest.raises(ValueError, match="shared_cross has shape"):
        wpg_shared_loss(SimpleNamespace(cross=cross), batch, shared[:, :-1])


def test_wpg_shared_rewards_phrases_near_their_own_image_regions():
    """A phrase state equal to one of image i's regions scores low; equal to one of image j's, high."""
    cross, batch = random_case(0)
    lt, lr = batch.phrase_mask.shape[1], batch.region_mask.shape[1]
    g = torch.Generator().manual_seed(9)
    shared = torch.randn(cross.shape[0], lt + 2 * lr, 16, generator=g)
    grounded, misplaced = shared.clone(), shared.clone()
    for i in (0, 2):  # the scored rows of random_case(0)
        grounded[i, :lt][batch.phrase_mask[i]] = shared[i, lt]            # image i's first region
        misplaced[i, :lt][batch.phrase_mask[i]] = shared[i, lt + lr]      # image j's first region
    good = wpg_shared_loss(SimpleNamespace(cross=cross), batch, grounded, temperature=0.1).loss.item()
    bad = wpg_shared_loss(SimpleNamespace(cross=cross), batch, misplaced, temperature=0.1).loss.item()
    assert good < 1.0 < bad


@pytest.fixture(scope="module")
def world_batch():
    data = build_data(DataConfig(source="synthetic:seed=11,images=24,held_out=0"), ("wpg",))
    batch = data.collator([data.train[i] for i in range(8)], BatchContext(seed=5))
    cfg = dataclasses.replace(MODEL_PRESETS["tiny"], vocab_size=data.vocab.vocab_size,
                              only_word_size=data.vocab.only_word_size)
    return cfg, batch


def test_joint_negative_cross_is_the_encoding_of_caption_i_with_image_j(world_batch):
    cfg, batch = world_batch
    torch.manual_seed(0)
    module = build_pretraining_module(cfg, ("wpg",), ObjectiveConfig(wpg_negative_encoding="joint")).eval()
    with torch.no_grad():
        outputs = module.backbone(batch)
        neg_cross = module.wpg_negative_cross(outputs, batch)
        regions = outputs.visual[:, outputs.num_tags:]
        lt = batch.text_mask.shape[1]
        for i, j in enumerate(batch.wpg_negative_pair.clamp(min=0).tolist()):
            nt, nr = int(batch.text_mask[i].sum()), int(batch.region_mask[j].sum())
            alone = module.backbone.encode_cross(outputs.text[i:i + 1, :nt], batch.text_mask[i:i + 1, :nt],
                                                 regions[j:j + 1, :nr], batch.region_mask[j:j + 1, :nr])
            assert torch.allclose(neg_cross[i, :nt], alone[0, :nt], atol=1e-5)
            assert torch.allclose(neg_cross[i, lt:lt + nr], alone[0, nt:], atol=1e-5)
            assert neg_cross[i, nt:lt].abs().sum() == 0 and neg_cross[i, lt + nr:].abs().sum() == 0  # padding
    separate = build_pretraining_module(cfg, ("wpg",), ObjectiveConfig(wpg_negative_encoding="separate"))
    assert separate.wpg_negative_cross(outputs, batch) is None


def test_shared_cross_is_caption_i_with_the_regions_of_images_i_and_j(world_batch):
    cfg, batch = world_batch
    torch.manual_seed(0)
    module = build_pretraining_module(cfg, ("wpg",), ObjectiveConfig(wpg_negative_encoding="shared")).eval()
    lt, lr = batch.text_mask.shape[1], batch.region_mask.shape[1]
    with torch.no_grad():
        outputs = module.backbone(batch)
        shared = module.wpg_negative_cross(outputs, batch)
        assert shared.shape[1] == lt + 2 * lr
        regions = outputs.visual[:, outputs.num_tags:]
        for i, j in enumerate(batch.wpg_negative_pair.clamp(min=0).tolist()):
            nt, ni, nj = (int(batch.text_mask[i].sum()), int(batch.region_mask[i].sum()),
                          int(batch.region_mask[j].sum()))
            alone = module.backbone.encode_cross(
                outputs.text[i:i + 1, :nt], batch.text_mask[i:i + 1, :nt],
                torch.cat([regions[i:i + 1, :ni], regions[j:j + 1, :nj]], dim=1),
                torch.ones(1, ni + nj, dtype=torch.bool))
            assert torch.allclose(shared[i, :nt], alone[0, :nt], atol=1e-5)
            assert torch.allclose(shared[i, lt:lt + ni], alone[0, nt:nt + ni], atol=1e-5)
            assert torch.allclose(shared[i, lt + lr:lt + lr + nj], alone[0, nt + ni:], atol=1e-5)
            assert shared[i, lt + ni:lt + lr].abs().sum() == 0 and shared[i, lt + lr + nj:].abs().sum() == 0


def test_shared_settings_reach_the_loss(world_batch):
    """The module's shared WPG reads the configured temperature and exclude_same_image, not the defaults."""
    cfg, batch = world_batch
    batch = dataclasses.replace(batch, image_ids=batch.image_ids.clone())
    batch.image_ids[batch.wpg_negative_pair[0]] = batch.image_ids[0]  # row 0's negative now shows its image
    torch.manual_seed(0)
    base = build_pretraining_module(cfg, ("wpg",), ObjectiveConfig(wpg_negative_encoding="shared")).eval()
    with torch.no_grad():
        outputs = base.backbone(batch)
        shared = base.wpg_negative_cross(outputs, batch)
        for temperature, exclude in ((0.5, True), (0.1, False)):
            module = build_pretraining_module(cfg, ("wpg",), ObjectiveConfig(
                wpg_negative_encoding="shared", wpg_temperature=temperature, exclude_same_image=exclude))
            module.load_state_dict(base.state_dict())
            module.eval()
            want = wpg_shared_loss(outputs, batch, shared, temperature=temperature, exclude_same_image=exclude)
            default = wpg_shared_loss(outputs, batch, shared)
            assert abs(want.loss.item() - default.loss.item()) > 1e-4
            assert module(batch).losses["wpg"].item() == pytest.approx(want.loss.item(), abs=1e-5)


@pytest.mark.parametrize("mode", ["joint", "separate", "shared"])
def test_wpg_mode_reaches_the_loss_and_every_parameter_gets_a_gradient(world_batch, mode):
    cfg, batch = world_batch
    torch.manual_seed(0)
    module = build_pretraining_module(cfg, ("itm", "wpg"), ObjectiveConfig(wpg_negative_encoding=mode,
                                                                           itm_negatives="random"))
    out = module(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.losses["wpg"].item() > 0
    assert all(p.grad is not None for p in module.parameters())
    cross_grads = [p.grad.abs().sum() for p in module.backbone.cross_encoder.parameters()]
    assert all(torch.isfinite(g) for g in cross_grads) and sum(cross_grads) > 0
    with torch.no_grad():  # the module's WPG is the loss on this mode's negative states, not the other's
        outputs = module.backbone(batch)
        joint = wpg_loss(outputs, batch, negative_cross=module.backbone.encode_cross(
            outputs.text, batch.text_mask, outputs.visual[:, outputs.num_tags:][batch.wpg_negative_pair.clamp(min=0)],
            batch.region_mask[batch.wpg_negative_pair.clamp(min=0)])).loss.item()
        separate = wpg_loss(outputs, batch).loss.item()
        neg = batch.wpg_negative_pair.clamp(min=0)
        regions = outputs.visual[:, outputs.num_tags:]
        shared = wpg_shared_loss(outputs, batch, module.backbone.encode_cross(
            outputs.text, batch.text_mask, torch.cat([regions, regions[neg]], dim=1),
            torch.cat([batch.region_mask, batch.region_mask[neg]], dim=1))).loss.item()
    assert abs(joint - separate) > 1e-4 and abs(shared - joint) > 1e-4
    want = {"joint": joint, "separate": separate, "shared": shared}[mode]
    assert out.losses["wpg"].item() == pytest.approx(want, abs=1e-5)


def test_cold_start_note_only_for_hardest_negatives():
    from mvptr_ds.objectives.itm import cold_start_note

    assert "--itm_negatives random" in cold_start_note(("vsc", "itm"), "hardest")
    assert cold_start_note(("vsc", "itm"), "random") == "" and cold_start_note(("mcr",), "hardest") == ""


def test_itm_prior_reaches_the_pretraining_and_retrieval_finetuning_losses(world_batch):
    """--itm_prior: the pre-training module's ITM loss is itm_loss(prior=True) on its own outputs, and the
    retrieval fine-tuning loss changes with it (same weights, same batch)."""
    from mvptr_ds.config import RunConfig
    from mvptr_ds.finetune.batching import TaskCollator, TaskExample
    from mvptr_ds.finetune.tasks import FinetuneModule
    from mvptr_ds.objectives.itm import itm_loss

    cfg, batch = world_batch
    torch.manual_seed(0)
    plain = ObjectiveConfig(itm_negatives="random")
    prior = dataclasses.replace(plain, itm_prior=True)
    module = build_pretraining_module(cfg, ("vsc", "itm"), prior).eval()
    with torch.no_grad():
        outputs = module.backbone(batch)
        want = itm_loss(outputs, batch, module.backbone, module.heads["itm"], negatives="random", prior=True)
        without = itm_loss(outputs, batch, module.backbone, module.heads["itm"], negatives="random")
        assert abs(want.loss.item() - without.loss.item()) > 1e-4
        assert module(batch).losses["itm"].item() == pytest.approx(want.loss.item(), abs=1e-6)

    data = build_data(DataConfig(source="synthetic:seed=11,images=24,held_out=0"), ())
    tb = TaskCollator(RunConfig().data, data.vocab, "retrieval")([TaskExample(data.train[i]) for i in range(8)])
    losses = []
    for oc in (plain, prior):
        torch.manual_seed(0)
        ft = FinetuneModule(cfg, "retrieval", objective_cfg=oc).eval()
        with torch.no_grad():
            losses.append(ft(tb).losses["itm"].item())
    assert abs(losses[0] - losses[1]) > 1e-4
