"""The CPU dropout (mvptr_ds/kernels/dropout.py): its probability, scale, mask reuse in backward, seeding, and the
attention path that uses it, against what F.dropout and scaled_dot_product_attention compute."""
import math

import pytest
import torch
import torch.nn.functional as F

from mvptr_ds import kernels
from mvptr_ds.kernels import reference
from mvptr_ds.kernels.dropout import drop_mask, dropout, dropout_add


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_drop_probability_and_scale(p):
    torch.manual_seed(0)
    n = 1 << 21
    x = torch.rand(n) + 0.5  # no zeros: a zero in the output means dropped
    y = dropout(x, p, True)
    dropped = y == 0
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.double().mean().item() - p) < 5 * sigma
    # Both 32-bit halves of each 64-bit draw are uniform (a generator range without the sign bit would not be).
    for half in (dropped[0::2], dropped[1::2]):
        assert abs(half.double().mean().item() - p) < 5 * sigma * math.sqrt(2)
    assert torch.equal(y[~dropped], x[~dropped] * (1.0 / (1.0 - p)))  # F.dropout's scale, bit for bit


def test_backward_applies_the_forward_mask():
    torch.manual_seed(1)
    x = (torch.rand(300, 70) + 0.5).requires_grad_()
    y = dropout(x, 0.2, True)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(y == 0, torch.zeros_like(g), g * (1.0 / 0.8)))


def test_seeded_and_fresh_draws():
    x = torch.rand(10_000) + 0.5
    torch.manual_seed(3)
    a = dropout(x, 0.1, True)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.1, True))
    assert not torch.equal(a, dropout(x, 0.1, True))  # the generator moved on


def test_edges():
    x = torch.rand(5, 4)
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    empty = torch.zeros(0, 4)
    assert dropout(empty, 0.5, True) is empty
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            dropout(x, bad, True)
    with pytest.raises(ValueError, match="outside"):
        drop_mask((3,), 1.0)
    half = dropout(torch.rand(1000, dtype=torch.bfloat16) + 0.5, 0.5, True)
    assert half.dtype == torch.bfloat16


def test_eager_keeps_torchs_dropout():
    """The authors-style baseline (kernels='eager') draws exactly what F.dropout draws."""
    x = torch.rand(1000)
    torch.manual_seed(4)
    expected = F.dropout(x, 0.1, True)
    torch.manual_seed(4)
    assert torch.equal(kernels.dropout(x, 0.1, True, "eager"), expected)
    assert kernels.dropout(x, 0.1, False, "torch") is x


def test_attention_with_dropout_is_sdpa_with_that_mask():
    """The CPU attention path with dropout: the masked softmax of scaled_dot_product_attention, the drop mask of
    drop_mask (reconstructed by re-seeding), then @ v; values and gradients."""
    torch.manual_seed(5)
    b, nh, l, hd, p = 3, 2, 7, 8, 0.25
    q, k, v = (torch.randn(b, nh, l, hd, requires_grad=True) for _ in range(3))
    key_mask = torch.arange(l)[None, :] < torch.tensor([7, 4, 1])[:, None]  # (B, L)
    torch.manual_seed(6)
    out = reference.attention(q, k, v, key_mask, p)
    out.backward(torch.ones_like(out))
    got = [t.grad.clone() for t in (q, k, v)]

    for t in (q, k, v):
        t.grad = None
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    probs = torch.softmax(scores.masked_fill(~key_mask[:, None, None, :], float("-inf")), dim=-1)
    no_dropout = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    torch.testing.assert_close(probs @ v, no_dropout, rtol=1e-5, atol=1e-6)
    torch.manual_seed(6)
    drop = drop_mask(probs.shape, p)
    assert drop.any() and not drop.all()
    expected = probs.masked_fill(drop, 0) / (1 - p) @ v
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    expected.backward(torch.ones_like(expected))
    for g, t in zip(got, (q, k, v)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-6)


def test_dropout_add_is_dropout_then_add():
    """The fused residual branch draws the same mask as dropout() from the same seed, and its gradients are the
    masked, scaled gradient for x and the plain one for the residual."""
    x = (torch.rand(500, 40) + 0.5).requires_grad_()
    residual = torch.randn(500, 40, requires_grad=True)
    torch.manual_seed(7)
    out = dropout_add(x, residual, 0.3, True)
    torch.manual_seed(7)
    expected = dropout(x.detach(), 0.3, True) + residual.detach()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    kept = expected != residual.detach()
    assert torch.equal(x.grad, torch.where(kept, g * (1.0 / 0.7), torch.zeros_like(g)))
    assert torch.equal(residual.grad, g)
    assert torch.equal(dropout_add(x, residual, 0.3, False), x + residual)
    assert torch.equal(dropout_add(x, residual, 1.0, True), residual)
    torch.manual_seed(8)
    other_dtype = dropout_add(x.detach(), residual.detach().double(), 0.3, True)  # falls back to the two steps
    assert other_dtype.dtype == torch.float64


def test_dropout_add_scales_bf16_by_the_exact_factor():
    """The scale 1 / (1 - p) is not rounded to bf16 (1/0.9 would become 1.109375: a 0.16% bias on every kept value)."""
    torch.manual_seed(9)
    x = torch.rand(200_000, dtype=torch.bfloat16) + 0.5
    out = dropout_add(x, torch.zeros_like(x), 0.1, True)
    kept = out != 0
    ratio = (out[kept].float() / x[kept].float()).mean().item()
    assert abs(ratio - 1 / 0.9) < 2e-4, ratio
