"""WPG: hand-checked value, equality with a per-sample loop reference, degenerate batches, no host sync."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mvptr_ds.data.types import Batch
from mvptr_ds.objectives import wpg_loss


def wpg_batch(phrase_mask, region_mask, image_ids, negative, pick, pick_negative=None):
    phrase_mask = torch.tensor(phrase_mask, dtype=torch.bool)
    region_mask = torch.tensor(region_mask, dtype=torch.bool)
    b, lt = phrase_mask.shape
    lr = region_mask.shape[1]
    z = torch.zeros(b, lt, dtype=torch.long)
    return Batch(text_ids=z, text_mask=torch.ones(b, lt, dtype=torch.bool), phrase_mask=phrase_mask,
                 tag_ids=z[:, :2], tag_mask=torch.ones(b, 2, dtype=torch.bool), region_feats=torch.zeros(b, lr, 3),
                 region_mask=region_mask, image_ids=torch.tensor(image_ids), sample_ids=torch.arange(b),
                 mlm_labels=z - 1, mcr_labels=z[:, :2] - 1, wpg_negative_pair=torch.tensor(negative),
                 wpg_pick_positive=torch.as_tensor(pick, dtype=torch.float32),
                 wpg_pick_negative=torch.as_tensor(pick if pick_negative is None else pick_negative,
                                                   dtype=torch.float32),
                 itm_text_side=torch.zeros(b, dtype=torch.bool), itm_negative_draw=torch.zeros(b, 2))


def test_wpg_hand_checked_value():
    # Text positions: [CLS] phrase; regions: image 0 has [1,0],[0,1]; image 1 has one region [1,1].
    r = 1 / math.sqrt(2)
    cross = torch.tensor([[[9., 9.], [1., 0.], [1., 0.], [0., 1.]],
                          [[9., 9.], [0., 1.], [1., 1.], [0., 0.]]], requires_grad=True)
    batch = wpg_batch([[0, 1], [0, 1]], [[1, 1], [1, 0]], [0, 1], [1, 0], [[0.0, 0.6], [0.0, 0.2]])
    out = wpg_loss(SimpleNamespace(cross=cross), batch, margin=0.2, topk=3)
    # pair 0: s(0,0) = 2nd of (1, 0) = 0; s(0,1) = r (one region); hinge 0.2 + r.
    # pair 1: s(1,1) = r; s(1,0) = 1st of (1, 0) = 1; hinge 0.2 + 1 - r.  Mean: 0.2 + 0.5.
    assert out.loss.item() == pytest.approx(0.7, abs=1e-6)
    assert out.metrics["pos"].item() == pytest.approx(r / 2, abs=1e-6)
    assert out.metrics["neg"].item() == pytest.approx((r + 1) / 2, abs=1e-6)
    out.loss.backward()
    assert cross.grad[:, 0].abs().max() == 0  # [CLS] is not a phrase


def loop_reference(cross, batch, margin, topk, exclude_same_image=True):
    """The straightforward per-sample computation (what the authors' loop does, without its defects)."""
    lt = batch.phrase_mask.shape[1]
    hinges = []
    for i in range(cross.shape[0]):
        j = int(batch.wpg_negative_pair[i])
        phrases = cross[i, :lt][batch.phrase_mask[i]]
        if len(phrases) == 0 or j < 0 or (exclude_same_image and batch.image_ids[j] == batch.image_ids[i]):
            continue

        def score(owner, pick):
            picks = pick[i][batch.phrase_mask[i]]
            regions = cross[owner, lt:][batch.region_mask[owner]]
            if len(regions) == 0:
                return None
            cos = F.normalize(phrases, dim=-1) @ F.normalize(regions, dim=-1).t()  # (P, R)
            k = min(topk, len(regions))
            top = cos.topk(k, dim=-1).values
            return torch.stack([top[p, min(int(picks[p] * k), k - 1)] for p in range(len(phrases))]).mean()

        s_pos, s_neg = score(i, batch.wpg_pick_positive), score(j, batch.wpg_pick_negative)
        if s_pos is None or s_neg is None:
            continue
        hinges.append(torch.clamp(margin + s_neg - s_pos, min=0))
    return torch.stack(hinges).mean() if hinges else cross.sum() * 0


def random_case(seed):
    g = torch.Generator().manual_seed(seed)
    b, lt, lr, h = 6, 7, 5, 4
    phrase_mask = torch.rand(b, lt, generator=g) < 0.4
    phrase_mask[:, 0] = False
    phrase_mask[1] = False                                     # a caption without phrases
    counts = torch.tensor([5, 3, 1, 0, 2, 4])                  # one region, no region, < topk
    region_mask = torch.arange(lr)[None] < counts[:, None]
    image_ids = [0, 1, 2, 3, 1, 4]
    negative = [1, 0, 4, 2, 1, -1]                             # row 4 -> row 1 shares its image; row 5 none
    batch = wpg_batch(phrase_mask.tolist(), region_mask.tolist(), image_ids, negative,
                      torch.rand(b, lt, generator=g), torch.rand(b, lt, generator=g))
    cross = torch.randn(b, lt + lr, h, generator=g)
    cross[:, lt:] *= region_mask[..., None]                    # padded regions are zeros, as in the model
    return cross.requires_grad_(), batch


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("topk", [1, 3])
def test_wpg_vectorised_equals_loop(seed, topk):
    cross, batch = random_case(seed)
    out = wpg_loss(SimpleNamespace(cross=cross), batch, margin=0.2, topk=topk)
    (g_vec,) = torch.autograd.grad(out.loss, cross)
    ref = loop_reference(cross, batch, 0.2, topk)
    (g_ref,) = torch.autograd.grad(ref, cross)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-6) and ref.item() > 0
    assert torch.allclose(g_vec, g_ref, atol=1e-6)
    assert out.metrics["pairs"].item() == 2  # rows 0 and 2; 1 no phrase, 3 no region, 4 same image, 5 none


def test_wpg_release_scores_same_image_negatives_and_picks_independently():
    cross, batch = random_case(0)
    out = wpg_loss(SimpleNamespace(cross=cross), batch, topk=3, exclude_same_image=False)
    ref = loop_reference(cross, batch, 0.2, 3, exclude_same_image=False)
    assert out.metrics["pairs"].item() == 3  # row 4, whose negative shows its own image, counts too
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-6)
    # The negative's pick is its own: changing it changes s(i, j) only.
    batch.wpg_pick_negative = 0.999 - batch.wpg_pick_negative
    moved = wpg_loss(SimpleNamespace(cross=cross), batch, topk=3, exclude_same_image=False)
    assert moved.metrics["pos"].item() == pytest.approx(out.metrics["pos"].item(), abs=1e-7)
    assert moved.metrics["neg"].item() != pytest.approx(out.metrics["neg"].item(), abs=1e-4)


def test_wpg_same_image_negative_is_not_scored():
    cross, batch = random_case(0)
    before = wpg_loss(SimpleNamespace(cross=cross), batch).metrics["pairs"].item()
    batch.wpg_negative_pair[0] = 0  # its own pair: same image
    after = wpg_loss(SimpleNamespace(cross=cross), batch).metrics["pairs"].item()
    assert after == before - 1


@pytest.mark.parametrize("case", ["no_phrases", "no_negative", "one_region", "no_regions_at_all"])
def test_wpg_degenerate_batches(case):
    cross, batch = random_case(1)
    if case == "no_phrases":
        batch.phrase_mask[:] = False
    elif case == "no_negative":
        batch.wpg_negative_pair[:] = -1
    elif case == "one_region":
        batch.region_mask[:] = False
        batch.region_mask[:, 0] = True
    else:
        batch = wpg_batch(batch.phrase_mask.tolist(), [[]] * 6, batch.image_ids.tolist(),
                          batch.wpg_negative_pair.tolist(), batch.wpg_pick_positive, batch.wpg_pick_negative)
        cross = cross[:, :batch.phrase_mask.shape[1]].detach().requires_grad_()
    out = wpg_loss(SimpleNamespace(cross=cross), batch)
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    if case != "one_region":
        assert out.loss.item() == 0.0
    else:
        assert out.loss.item() == pytest.approx(loop_reference(cross, batch, 0.2, 3).item(), abs=1e-6)
    out.loss.backward()
    assert torch.isfinite(cross.grad).all()


def test_wpg_runs_without_host_sync():
    # Meta tensors carry no data: any .item(), data-dependent shape or Python branch on values would raise.
    cross, batch = random_case(2)
    meta = Batch(**{k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()})
    out = wpg_loss(SimpleNamespace(cross=cross.detach().to("meta")), meta)
    assert out.loss.device.type == "meta" and out.loss.shape == ()


def mining_case(exclude_same_image=True):
    """Four pairs; pairs 0 and 1 show image 7. Caption i's similarity to the batch's images is ``sim[i]``: the
    visual embeddings are the unit vectors e_0..e_3 and text i's embedding is the row ``sim[i]`` (not normalised:
    the mining reads the products as they are)."""
    from mvptr_ds.objectives.wpg import mined_negative_pairs  # noqa: F401 (import checked here)
    visual = torch.eye(4)
    sim = torch.tensor([[1.0, 0.9, 0.5, 0.2],    # caption 0: pair 1 shows its own image; next best is 2
                        [0.9, 1.0, 0.1, 0.6],    # caption 1: best other image is 3
                        [0.3, 0.8, 1.0, 0.4],    # caption 2: 1
                        [0.2, 0.1, 0.7, 1.0]])   # caption 3: 2
    text = sim  # text_embed @ visual_embed^T == sim with visual = I
    batch = wpg_batch([[0, 1]] * 4, [[1, 1]] * 4, [7, 7, 8, 9], [-1, -1, -1, -1], [[0.0, 0.0]] * 4)
    outputs = SimpleNamespace(text_embed=text, visual_embed=visual, logit_scale=torch.tensor(math.log(10.0)))
    return outputs, batch, sim


def test_wpg_mined_negatives_hardest_and_random():
    from mvptr_ds.objectives.wpg import mined_negative_pairs

    outputs, batch, _ = mining_case()
    assert mined_negative_pairs(outputs, batch, "random") is batch  # the data pipeline's draw, untouched
    hardest = mined_negative_pairs(outputs, batch, "hardest")
    assert hardest.wpg_negative_pair.tolist() == [2, 3, 1, 2]  # never a pair of the caption's own image
    assert batch.wpg_negative_pair.tolist() == [-1] * 4       # the input batch is not modified
    # The release's rule (only the pair itself excluded): caption 0 takes pair 1, which shows image 7 too.
    assert mined_negative_pairs(outputs, batch, "hardest", exclude_same_image=False).wpg_negative_pair.tolist() \
        == [1, 0, 1, 2]
    lonely = dataclasses_replace(batch, image_ids=torch.tensor([5, 5, 5, 5]))
    assert mined_negative_pairs(outputs, lonely, "hardest").wpg_negative_pair.tolist() == [-1] * 4
    with pytest.raises(ValueError, match="negatives mode 'easiest'"):
        mined_negative_pairs(outputs, batch, "easiest")


def test_wpg_mined_negatives_sampled_follow_the_softmax():
    from mvptr_ds.objectives.wpg import mined_negative_pairs

    outputs, batch, sim = mining_case()
    with pytest.raises(ValueError, match="wpg_negative_draw"):
        mined_negative_pairs(outputs, batch, "sampled")
    allowed = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    probs = torch.softmax((10.0 * sim).masked_fill(~allowed, float("-inf")), dim=1)
    cdf = probs.cumsum(1)
    for draw in (0.0, 0.3, 0.6, 0.95, 0.999):
        drawn = dataclasses_replace(batch, wpg_negative_draw=torch.full((4,), draw))
        got = mined_negative_pairs(outputs, drawn, "sampled").wpg_negative_pair
        expected = [int((cdf[i] <= draw * cdf[i, -1]).sum()) for i in range(4)]  # inverse CDF by hand
        assert got.tolist() == expected, draw
        assert all(allowed[i, j] for i, j in enumerate(got.tolist()))
    # Over many draws the frequencies are the softmax (scale e^tau = 10, capped at 100 in general).
    n = 2000
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    for u in torch.rand(n, generator=gen):
        got = mined_negative_pairs(outputs, dataclasses_replace(batch, wpg_negative_draw=u.repeat(4)), "sampled")
        counts[torch.arange(4), got.wpg_negative_pair] += 1
    assert torch.allclose(counts / n, probs, atol=0.04)


def dataclasses_replace(batch, **changes):
    import dataclasses

    return dataclasses.replace(batch, **changes)


def test_cold_start_note_only_for_mined_wpg_negatives():
    from mvptr_ds.objectives.wpg import cold_start_note

    assert "--wpg_negatives sampled mines" in cold_start_note(("vsc", "wpg"), "sampled")
    assert "hardest" in cold_start_note(("wpg",), "hardest")
    assert cold_start_note(("vsc", "wpg"), "random") == "" and cold_start_note(("vsc", "itm"), "sampled") == ""
