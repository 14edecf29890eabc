"""Retrieval recalls against a brute-force count and hand-made similarity matrices; chance levels."""
import itertools

import pytest
import torch

from mvptr_ds.evaluation.metrics import (MetricError, chance_recall, ranks_of_truth, retrieval_recalls,
                                         retrieval_truth)


def brute_force_recall(scores, truth, k):
    """Percentage of queries with a right candidate among the first k, ties broken against the truth."""
    hits = 0
    for q in range(len(scores)):
        right = [s for s, t in zip(scores[q], truth[q]) if t]
        best = max(right)
        ahead = sum(1 for s, t in zip(scores[q], truth[q]) if not t and s >= best)
        hits += ahead < k
    return 100.0 * hits / len(scores)


@pytest.mark.parametrize("seed", range(6))
def test_recalls_match_brute_force_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n_img, per = 5, 2
    caption_image = torch.arange(n_img).repeat_interleave(per)[torch.randperm(n_img * per, generator=g)]
    # Integer scores in a small range: many ties, including ties with the right candidate.
    i2t = torch.randint(0, 4, (n_img, n_img * per), generator=g).float()
    t2i = torch.randint(0, 4, (n_img * per, n_img), generator=g).float()
    got = retrieval_recalls(i2t, t2i, caption_image)
    truth = [[int(caption_image[c]) == i for i in range(n_img)] for c in range(n_img * per)]
    truth_i2t = [list(col) for col in zip(*truth)]
    for k in (1, 5, 10):
        assert got[f"tr_r{k}"] == pytest.approx(brute_force_recall(i2t.tolist(), truth_i2t, k))
        assert got[f"ir_r{k}"] == pytest.approx(brute_force_recall(t2i.tolist(), truth, k))
    assert got["rsum"] == pytest.approx(sum(got[f"{d}_r{k}"] for d in ("tr", "ir") for k in (1, 5, 10)))
    assert (got["n_images"], got["n_captions"]) == (n_img, n_img * per)


def test_hand_made_matrix():
    # 3 images, captions 0,1 -> image 0; 2 -> image 1; 3 -> image 2.
    caption_image = torch.tensor([0, 0, 1, 2])
    t2i = torch.tensor([[0.9, 0.1, 0.0],    # right first
                        [0.5, 0.5, 0.0],    # tie with a wrong image: pessimistic rank 1
                        [0.3, 0.2, 0.1],    # right image second
                        [0.1, 0.2, 0.3]])   # right first
    i2t = torch.tensor([[0.2, 0.8, 0.9, 0.1],  # best right caption (0.8) behind one wrong (0.9): rank 1
                        [0.0, 0.0, 0.0, 0.0],  # all tied: rank 3 (every wrong caption counts ahead)
                        [0.1, 0.2, 0.3, 0.4]])  # right first
    r = retrieval_recalls(i2t, t2i, caption_image, ks=(1, 2, 5))
    assert r["ir_r1"] == 50.0 and r["ir_r2"] == 100.0
    assert r["tr_r1"] == pytest.approx(100 / 3) and r["tr_r2"] == pytest.approx(200 / 3)
    assert r["tr_r5"] == 100.0


def test_a_constant_scorer_gets_zero_not_index_luck():
    caption_image = torch.tensor([0, 1, 2])
    r = retrieval_recalls(torch.zeros(3, 3), torch.zeros(3, 3), caption_image, ks=(1,))
    assert r["tr_r1"] == 0.0 and r["ir_r1"] == 0.0


def test_duplicated_image_counts_as_right_only_with_keys():
    # Images 0 and 1 are the same picture (caption 0 belongs to image 0, caption 1 to image 1).
    caption_image = torch.tensor([0, 1, 2])
    t2i = torch.tensor([[0.7, 0.7, 0.1],
                        [0.7, 0.7, 0.1],
                        [0.1, 0.1, 0.9]])
    i2t = t2i.t().clone()
    plain = retrieval_recalls(i2t, t2i, caption_image, ks=(1,))
    assert plain["ir_r1"] == pytest.approx(100 / 3)  # the duplicate ties ahead of the true image
    assert plain["tr_r1"] == pytest.approx(100 / 3)
    keyed = retrieval_recalls(i2t, t2i, caption_image, ks=(1,), image_key=torch.tensor([5, 5, 9]))
    assert keyed["ir_r1"] == 100.0 and keyed["tr_r1"] == 100.0


def test_ranks_and_errors():
    scores = torch.tensor([[1.0, 2.0, 3.0]])
    assert ranks_of_truth(scores, torch.tensor([[True, False, False]])).tolist() == [2]
    assert ranks_of_truth(scores, torch.tensor([[True, False, True]])).tolist() == [0]
    with pytest.raises(MetricError, match="query 0 has no right candidate"):
        ranks_of_truth(scores, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(MetricError, match="NaN"):
        ranks_of_truth(torch.tensor([[float("nan")]]), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(MetricError, match="disagree"):
        retrieval_recalls(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(MetricError, match="image index 4"):
        retrieval_truth(torch.tensor([0, 4]), 2)


def test_chance_recall_matches_enumeration():
    truth = torch.tensor([[True, True, False, False, False], [False, False, False, True, False]])
    for k in (1, 2, 3):
        expected = []
        for row in truth.tolist():
            orders = list(itertools.permutations(range(5)))
            expected.append(sum(any(row[j] for j in o[:k]) for o in orders) / len(orders))
        assert chance_recall(truth, k) == pytest.approx(100 * sum(expected) / 2)
