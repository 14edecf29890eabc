"""Helpers shared by the kernel parity tests (CPU interpreted and CUDA); imports no Triton kernel module."""
import random

import pytest
import torch

from mvptr_ds.kernels import reference

LOWP = {torch.bfloat16: 5e-3, torch.float16: 1e-3}  # slack over 2x the reference's own low-precision error


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / ‖b‖ in float64; NaN anywhere in ``a`` gives inf."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check(name, got, want, tol, seed):
    err = rel(got, want)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g} (seed {seed})"


def nan_empty(shape, dtype, device):
    """Stand-in for the kernel modules' ``_empty``: every element the kernel does not write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def embedding_inputs(bsz, seq_len, vocab=40, n_pos=12, hidden=48, device="cpu"):
    """ids, positions, types ``[bsz, seq_len]`` (a repeated id; the last row all padding id 0) and the five
    float64 tables (word, position, type, LayerNorm weight, bias)."""
    ids = torch.randint(1, vocab, (bsz, seq_len))
    ids[0, : seq_len // 2] = 7                        # a repeated id
    if bsz > 1:
        ids[-1] = 0                                   # a row of padding: id 0 everywhere
    pos = torch.arange(seq_len).expand(bsz, seq_len)
    types = torch.randint(0, 2, (bsz, seq_len))
    tables = [torch.randn(vocab, hidden), torch.randn(n_pos, hidden), torch.randn(2, hidden),
              1 + 0.1 * torch.randn(hidden), 0.1 * torch.randn(hidden)]
    return ids.to(device), pos.to(device), types.to(device), [t.double().to(device) for t in tables]


def run_embedding(fn, ids, pos, types, tables, dtype, grad_out, **kw):
    params = [t.detach().to(dtype).clone().requires_grad_() for t in tables]
    out = fn(ids, pos, types, *params, 1e-12, **kw)
    out.backward(grad_out.to(out.dtype))
    return out, [p.grad for p in params]


def run_attention(fn, qkv, mask, dtype, grad_out, **kw):
    q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in qkv)
    out = fn(q, k, v, mask, **kw)
    out.backward(grad_out.to(out.dtype))
    return out, [q.grad, k.grad, v.grad]


def masked_reference(q, k, v, mask, keep=None, p=0.0):
    """float64 oracle of the fused function: padded query rows are 0, dropout mask ``keep`` if given."""
    if keep is None:
        out = reference.attention(q, k, v, mask)
    else:
        s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # [B, heads, L, L]
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(s, -1).nan_to_num(0.0)
        out = (probs * keep / (1 - p)) @ v
    return out * mask[:, None, :, None]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Kernel-written buffers start as NaN (an element a kernel fails to write shows up). Autouse in the modules
    that import it."""
    from mvptr_ds.kernels import triton_attention, triton_embedding
    monkeypatch.setattr(triton_attention, "_empty", nan_empty)
    monkeypatch.setattr(triton_embedding, "_empty", nan_empty)


@pytest.fixture
def seed():
    """A fresh random seed per check (named in its failure message)."""
    s = random.randrange(2 ** 31)
    torch.manual_seed(s)
    return s
