"""1,000 randomly generated degenerate batches through all five objectives: losses and gradients stay finite.

Degenerate: batch size 1, every pair from one image (no negatives), no phrases, no masked word or tag
piece (objectives with nothing to score), everything masked, single-token streams, one region, WPG
negatives missing, huge and zero region features. In-process on a 1-layer model (a few seconds).
"""
import random

import pytest
import torch

from mvptr_ds.config import OBJECTIVES, ObjectiveConfig
from mvptr_ds.objectives import build_pretraining_module
from objective_fixtures import TINY, make_batch

pytestmark = pytest.mark.fault


def random_degenerate_batch(rng: random.Random, seed: int):
    b = rng.choice([1, 1, 2, 3, 4])
    same_image = rng.random() < 0.4
    image_ids = [7] * b if same_image else [rng.randrange(3) for _ in range(b)]
    num_phrases = [rng.choice([0, 0, 1, 2]) for _ in range(b)]
    text_lens = [2 + k + rng.choice([0, 0, 1, 3]) for k in num_phrases]
    region_counts = [rng.choice([1, 1, 2, 5]) for _ in range(b)]
    tag_lens = [rng.choice([2, 2, 3, 6]) for _ in range(b)]
    mask_every = rng.choice([0, 0, 1, 2])
    wpg_negative = [-1] * b if rng.random() < 0.3 else None
    batch = make_batch(image_ids, text_lens, num_phrases, region_counts, tag_lens, seed=seed,
                       mask_every=mask_every, wpg_negative=wpg_negative)
    scale = rng.choice([1.0, 1.0, 0.0, 1e4])
    batch.region_feats = batch.region_feats * scale
    return batch


@pytest.fixture
def one_thread():
    """Batches of 1-4 tiny samples: threads only add overhead (and compete with other tests' processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_thousand_degenerate_batches_never_nan(one_thread):
    torch.manual_seed(0)
    module = build_pretraining_module(TINY, OBJECTIVES, ObjectiveConfig())
    module.train()
    rng = random.Random(1234)
    for i in range(1000):
        batch = random_degenerate_batch(rng, i)
        out = module(batch)
        assert torch.isfinite(out.loss), (i, {k: float(v) for k, v in out.losses.items()})
        for name, value in out.losses.items():
            assert torch.isfinite(value), (i, name)
        if i % 25 == 0:  # backward on every 25th: gradients finite too (keeps the test at a few seconds)
            module.zero_grad(set_to_none=True)
            out.loss.backward()
            bad = [n for n, p in module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            assert not bad, (i, bad[:3])
