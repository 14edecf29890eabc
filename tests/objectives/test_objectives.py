"""MCR, MLM, VSC and ITM on plain tensors and fake outputs: exact values, gradients, degenerate batches."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from mvptr_ds.config import ObjectiveConfig
from mvptr_ds.objectives import itm_loss, masked_token_loss, mcr_loss, mlm_loss, vsc_loss, zero_loss
from mvptr_ds.objectives.itm import negative_pairs, prior_scale
from objective_fixtures import FakeCrossModel, fake_outputs, make_batch


def np_ce(logits, target):
    logits = np.asarray(logits, dtype=np.float64)
    m = logits.max()
    return float(np.log(np.exp(logits - m).sum()) + m - logits[target])


# ---- base -------------------------------------------------------------------------------------------

def test_zero_loss_is_exact_zero_with_graph_even_through_nan():
    a = torch.tensor([1.0, float("nan"), float("inf")], requires_grad=True)
    b = torch.randn(2, 3, requires_grad=True)
    z = zero_loss(a, b, torch.ones(2))
    assert z.item() == 0.0 and z.requires_grad
    z.backward()
    assert torch.equal(a.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(2, 3))


def test_masked_token_loss_exact_value_and_accuracy():
    torch.manual_seed(0)
    head = nn.Linear(3, 5)
    states = torch.randn(2, 4, 3)
    labels = torch.tensor([[-1, 2, -1, 4], [0, -1, -1, -1]])
    out = masked_token_loss("mlm", states, labels, head)
    w, bias = head.weight.detach().numpy(), head.bias.detach().numpy()
    expected, correct = [], 0
    for (i, p), y in [((0, 1), 2), ((0, 3), 4), ((1, 0), 0)]:
        logits = states[i, p].numpy() @ w.T + bias
        expected.append(np_ce(logits, y))
        correct += int(np.argmax(logits) == y)
    assert out.loss.item() == pytest.approx(np.mean(expected), rel=1e-6)
    assert out.metrics["acc"].item() == pytest.approx(correct / 3)
    assert out.metrics["count"].item() == 3


def test_masked_token_loss_nothing_scored_is_zero_and_reaches_head():
    head = nn.Linear(3, 5)
    states = torch.randn(2, 4, 3, requires_grad=True)
    out = masked_token_loss("mcr", states, torch.full((2, 4), -1), head)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert head.weight.grad is not None and torch.equal(head.weight.grad, torch.zeros(5, 3))
    assert torch.equal(states.grad, torch.zeros(2, 4, 3))


# ---- MCR / MLM --------------------------------------------------------------------------------------

def test_mcr_scores_tag_positions_only():
    batch = make_batch([0, 1], [6, 7], [1, 2], [3, 2], tag_lens=[5, 6])
    outs = fake_outputs(batch)
    head = nn.Linear(8, 100)
    out = mcr_loss(outs, batch, head)
    ref = masked_token_loss("mcr", outs.visual[:, :outs.num_tags].detach(), batch.mcr_labels, head)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6) and out.loss.item() > 0
    out.loss.backward()
    g = outs.visual.grad
    assert g[:, outs.num_tags:].abs().max() == 0  # regions untouched
    scored = batch.mcr_labels >= 0
    assert (g[:, :outs.num_tags].abs().sum(-1) > 0).eq(scored).all()  # exactly the corrupted tags
    assert outs.cross.grad is None and outs.text.grad is None


def test_mlm_ignores_phrase_positions_and_scores_cross_text():
    batch = make_batch([0, 1], [8, 7], [2, 1], [3, 2])
    phrase_pos = batch.phrase_mask.nonzero()[0]
    batch.mlm_labels[phrase_pos[0], phrase_pos[1]] = 7  # a pipeline bug: concepts are never predicted
    outs = fake_outputs(batch)
    head = nn.Linear(8, 100)
    out = mlm_loss(outs, batch, head)
    labels = batch.mlm_labels.clone()
    labels[batch.phrase_mask] = -1
    lt = batch.text_mask.shape[1]
    ref = masked_token_loss("mlm", outs.cross[:, :lt].detach(), labels, head)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    out.loss.backward()
    assert outs.cross.grad[:, lt:].abs().max() == 0
    assert outs.cross.grad[phrase_pos[0], phrase_pos[1]].abs().max() == 0


def test_mlm_mcr_no_masked_tokens_give_exact_zero():
    batch = make_batch([0, 1], [6, 6], [1, 1], [2, 2], mask_every=0)
    outs = fake_outputs(batch)
    head = nn.Linear(8, 100)
    for out in (mlm_loss(outs, batch, head), mcr_loss(outs, batch, head)):
        assert out.loss.item() == 0.0 and out.loss.requires_grad
        out.loss.backward()
    assert torch.isfinite(head.weight.grad).all()


# ---- VSC --------------------------------------------------------------------------------------------

def np_vsc(t, v, ids, tau, cap=True):
    s = (min(math.exp(tau), 100.0) if cap else math.exp(tau)) * (np.asarray(t, np.float64) @ np.asarray(v, np.float64).T)
    total = 0.0
    for m in (s, s.T):
        for i in range(len(ids)):
            cols = [j for j in range(len(ids)) if ids[j] != ids[i] or j == i]
            total += np_ce(m[i, cols], cols.index(i))
    return total / (2 * len(ids))


def test_vsc_hand_checked_value():
    # Orthonormal pairs and tau = 0 (scale 1): S = I, every row's CE is log(e^1 + e^0) - 1 = log(1 + 1/e).
    t = torch.eye(2)
    out = vsc_loss(t, t.clone(), torch.tensor([0, 1]), torch.tensor(0.0))
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert out.metrics["t2v_acc"].item() == 1.0


def test_vsc_matches_numpy_and_excludes_same_image_pairs():
    g = torch.Generator().manual_seed(3)
    t = nn.functional.normalize(torch.randn(5, 6, generator=g), dim=-1)
    v = nn.functional.normalize(torch.randn(5, 6, generator=g), dim=-1)
    ids = [7, 7, 2, 9, 2]
    tau = torch.tensor(math.log(1 / 0.07))
    out = vsc_loss(t, v, torch.tensor(ids), tau)
    assert out.loss.item() == pytest.approx(np_vsc(t.numpy(), v.numpy(), ids, tau.item()), rel=1e-5)
    # Plain CLIP (no exclusion) differs: the exclusion is doing something.
    assert abs(out.loss.item() - np_vsc(t.numpy(), v.numpy(), list(range(5)), tau.item())) > 1e-3
    # Moving a same-image pair's embedding leaves row 0's loss alone: no gradient from excluded pairs.
    vv = v.clone().requires_grad_()
    vsc_loss(t, vv, torch.tensor(ids), tau).loss.backward()
    t_only = t.clone().requires_grad_()
    vsc_loss(t_only, v, torch.tensor(ids), tau).loss.backward()
    # d loss / d t_0 has no component from v_1 (same image as pair 0) in the t->v direction:
    s = 1 / 0.07 * (t @ v.t())
    cols = [0, 2, 3, 4]
    p = torch.softmax(s[0, cols], 0)
    t2v_grad = (1 / 0.07) * (p @ v[cols] - v[0]) / (2 * 5)
    assert torch.isfinite(t_only.grad).all() and torch.isfinite(vv.grad).all()
    # v->t contributions to t_0 come from rows j whose softmax includes text 0: rows 2,3,4 and row 0.
    v2t_grad = torch.zeros(6)
    for j in range(5):
        cols_j = [c for c in range(5) if ids[c] != ids[j] or c == j]
        if 0 in cols_j:
            pj = torch.softmax(s.t()[j, cols_j], 0)
            v2t_grad += (1 / 0.07) * (pj[cols_j.index(0)] - (1.0 if j == 0 else 0.0)) * v[j] / (2 * 5)
    assert torch.allclose(t_only.grad[0], t2v_grad + v2t_grad, atol=1e-5)


def test_vsc_degenerate_batches_are_finite():
    t = nn.functional.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    v = nn.functional.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    tau = torch.tensor(2.0, requires_grad=True)
    out = vsc_loss(t, v, torch.tensor([5, 5, 5]), tau)  # one image: no negative anywhere
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(t.grad).all() and torch.isfinite(tau.grad).all()
    one = vsc_loss(t[:1], v[:1], torch.tensor([1]), tau)  # batch of one
    assert one.loss.item() == 0.0


def test_vsc_logit_scale_is_capped_at_100():
    t = nn.functional.normalize(torch.randn(3, 4), dim=-1)
    v = nn.functional.normalize(torch.randn(3, 4), dim=-1)
    tau = torch.tensor(10.0, requires_grad=True)
    out = vsc_loss(t, v, torch.tensor([0, 1, 2]), tau)
    assert out.metrics["scale"].item() == pytest.approx(100.0)
    assert out.loss.item() == pytest.approx(np_vsc(t.numpy(), v.numpy(), [0, 1, 2], math.log(100)), rel=1e-5)
    out.loss.backward()
    assert tau.grad.item() == 0.0
    release = vsc_loss(t, v, torch.tensor([0, 1, 2]), tau, cap_scale=False)  # the release: e^10, not capped
    assert release.metrics["scale"].item() == pytest.approx(math.exp(10.0), rel=1e-5)
    assert release.loss.item() == pytest.approx(np_vsc(t.numpy(), v.numpy(), [0, 1, 2], 10.0, cap=False), rel=1e-4)


def test_vsc_release_treats_same_image_pairs_as_negatives():
    g = torch.Generator().manual_seed(3)
    t = nn.functional.normalize(torch.randn(5, 6, generator=g), dim=-1)
    v = nn.functional.normalize(torch.randn(5, 6, generator=g), dim=-1)
    tau = torch.tensor(math.log(1 / 0.07))
    out = vsc_loss(t, v, torch.tensor([7, 7, 2, 9, 2]), tau, exclude_same_image=False)
    assert out.loss.item() == pytest.approx(np_vsc(t.numpy(), v.numpy(), list(range(5)), tau.item()), rel=1e-5)


class Identity1:
    """A one-rank gather: the global path with world size 1."""

    rank, world_size = 0, 1

    def __call__(self, t):
        return t


def test_world_size_one_gather_is_exactly_the_local_loss():
    batch = make_batch([0, 1, 1, 2], [6, 5, 7, 6], [1, 0, 2, 1], [2, 3, 1, 2])
    outs = fake_outputs(batch)
    tau = torch.tensor(2.5)
    a = vsc_loss(outs.text_embed, outs.visual_embed, batch.image_ids, tau)
    b = vsc_loss(outs.text_embed, outs.visual_embed, batch.image_ids, tau, gather=Identity1())
    assert torch.equal(a.loss, b.loss)
    model = FakeCrossModel()
    head = nn.Linear(8, 2)
    a = itm_loss(outs, batch, model, head)
    b = itm_loss(outs, batch, model, head, gather=Identity1())
    assert torch.equal(a.loss, b.loss)
    assert all(torch.equal(x, y) for x, y in zip(model.calls[0], model.calls[1]))
    outs = dataclasses.replace(outs, logit_scale=tau)  # --itm_prior reads the gathered embeddings of the negatives
    a = itm_loss(outs, batch, model, head, prior=True)
    b = itm_loss(outs, batch, model, head, gather=Identity1(), prior=True)
    assert torch.equal(a.loss, b.loss) and abs(a.loss.item() - itm_loss(outs, batch, model, head).loss.item()) > 1e-4


# ---- ITM --------------------------------------------------------------------------------------------

def test_itm_hardest_negatives_by_direction_and_same_image_excluded():
    # 4 pairs; pairs 0 and 1 show the same image. Rows 0,1 pair their text with the hardest image,
    # rows 2,3 their image with the hardest text.
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.5],    # text 0: image 1 is closest but same image -> image 3
                        [0.2, 0.9, 0.6, 0.3],    # text 1: image 0 excluded -> image 2
                        [0.7, 0.1, 0.9, 0.2],    # column 2 = image 2 vs texts: text 1 (0.6) closest -> text 1
                        [0.1, 0.4, 0.3, 0.9]])   # column 3 = image 3: text 0 (0.5) closest -> text 0
    ids = torch.tensor([4, 4, 5, 6])
    side = torch.tensor([True, True, False, False])
    text_idx, image_idx, valid = negative_pairs(sim, sim.t(), ids, ids, 0, side)
    assert text_idx.tolist() == [0, 1, 1, 0] and image_idx.tolist() == [3, 2, 2, 3] and valid.all()
    # The release (S - 2I): text 0's hardest is image 1, which shows its own image.
    text_idx, image_idx, valid = negative_pairs(sim, sim.t(), ids, ids, 0, side, exclude_same_image=False)
    assert image_idx.tolist()[:2] == [1, 2] and valid.all()


@torch.no_grad()
def hardest_itm_reference(outs, batch, head):
    """By hand, for a batch of three pairs of distinct images: the similarity ``[3, 3]``, each row's (text, image)
    negative (hardest image for text-side rows, hardest text otherwise) and the head's logits ``[6, 2]`` on the
    positives then those negatives (FakeCrossModel: pooled = text [CLS] + first region)."""
    s = outs.text_embed @ outs.visual_embed.t()
    s_ex = s - 10 * torch.eye(3)
    hard_img, hard_txt = s_ex.argmax(1), s_ex.argmax(0)
    side = batch.itm_text_side.tolist()
    rows = [(i, int(hard_img[i])) if side[i] else (int(hard_txt[i]), i) for i in range(3)]
    regions = outs.visual[:, outs.num_tags:]
    neg = torch.stack([outs.text[ti, 0] + regions[ii, 0] for ti, ii in rows])
    return s, rows, head(torch.cat([outs.pooled, neg]))


def test_itm_exact_value_reuses_unimodal_states_and_no_grad_through_choice():
    batch = make_batch([0, 1, 2], [6, 5, 6], [1, 1, 0], [2, 3, 1])
    outs = fake_outputs(batch)
    model = FakeCrossModel()
    head = nn.Linear(8, 2)
    out = itm_loss(outs, batch, model, head)
    _, rows, logits = hardest_itm_reference(outs, batch, head)
    expected = nn.functional.cross_entropy(logits, torch.tensor([1, 1, 1, 0, 0, 0]))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    text_h, text_mask, _, region_mask = model.calls[0]
    assert torch.equal(text_mask, batch.text_mask[[r[0] for r in rows]])
    assert torch.equal(region_mask, batch.region_mask[[r[1] for r in rows]])
    out.loss.backward()
    assert outs.text_embed.grad is None and outs.visual_embed.grad is None  # mining is gradient-free
    assert outs.text.grad is not None and outs.pooled.grad is not None
    assert outs.visual.grad[:, :outs.num_tags].abs().max() == 0  # only regions feed the cross encoder


@pytest.mark.parametrize("tau, scale", [(math.log(20.0), 20.0), (math.log(1000.0), 100.0)])
def test_itm_prior_adds_the_scaled_similarity_to_the_match_logit_without_gradient(tau, scale):
    """--itm_prior: logit(match) += e^tau S(text, image) for the B positives and the B mined negatives, e^tau
    capped at 100 as VSC's; neither S nor tau gets a gradient through it."""
    batch = make_batch([0, 1, 2], [6, 5, 6], [1, 1, 0], [2, 3, 1])
    outs = dataclasses.replace(fake_outputs(batch), logit_scale=torch.tensor(tau, requires_grad=True))
    head = nn.Linear(8, 2)
    plain = itm_loss(outs, batch, FakeCrossModel(), head)
    out = itm_loss(outs, batch, FakeCrossModel(), head, prior=True)
    s, rows, logits = hardest_itm_reference(outs, batch, head)
    shift = scale * torch.cat([s.diag(), torch.stack([s[ti, ii] for ti, ii in rows])])
    logits = torch.stack([logits[:, 0], logits[:, 1] + shift], 1)
    expected = nn.functional.cross_entropy(logits, torch.tensor([1, 1, 1, 0, 0, 0]))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(out.loss.item() - plain.loss.item()) > 1e-3
    out.loss.backward()
    assert outs.text_embed.grad is None and outs.visual_embed.grad is None and outs.logit_scale.grad is None
    assert prior_scale(outs.logit_scale, ObjectiveConfig(itm_prior=True)) == pytest.approx(scale, rel=1e-6)
    assert prior_scale(outs.logit_scale, ObjectiveConfig(itm_prior=False)) == 0.0
    assert prior_scale(outs.logit_scale, ObjectiveConfig(itm_prior=True, cap_logit_scale=False)) == pytest.approx(
        math.exp(tau), rel=1e-6)


@pytest.mark.parametrize("ids", [[3, 3, 3], [8]])
def test_itm_without_valid_negatives_scores_positives_only(ids):
    batch = make_batch(ids, [6] * len(ids), [1] * len(ids), [2] * len(ids))
    outs = fake_outputs(batch)
    head = nn.Linear(8, 2)
    out = itm_loss(outs, batch, FakeCrossModel(), head)
    expected = nn.functional.cross_entropy(head(outs.pooled), torch.ones(len(ids), dtype=torch.long))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.metrics["neg_valid"].item() == 0.0
    out.loss.backward()
    assert torch.isfinite(head.weight.grad).all() and torch.isfinite(outs.text.grad).all()
