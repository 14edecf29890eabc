"""CUDA parity of the compiled Triton kernels with a float64 reference, bf16 / fp16 / fp32, near-base shapes.

Run on the GPU machine (``benchmarks/gpu_check.sh`` does): ``pytest -m gpu tests/kernels/test_kernels_gpu.py``.
Skipped where torch sees no CUDA device. If the CPU test module made the kernels interpreted earlier in the
same process, they are reloaded compiled for this module and handed back afterwards.
"""
import importlib
import os

import pytest
import torch

from kernel_parity import (LOWP, check, embedding_inputs, masked_reference, poisoned,  # noqa: F401
                           rel, run_attention, run_embedding, seed)
from mvptr_ds import kernels
from mvptr_ds.kernels import triton_attention, triton_embedding

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def compiled():
    saved = os.environ.pop("TRITON_INTERPRET", None)
    for mod in (triton_attention, triton_embedding):
        if type(mod._fwd_kernel).__name__ == "InterpretedFunction":
            importlib.reload(mod)
    yield
    if saved is not None:
        os.environ["TRITON_INTERPRET"] = saved


def cross_masks(bsz, n_text=40, n_regions=50):
    """[B, 90] like the cross-modal stream: ragged text then ragged regions; row 1 all padding."""
    text = torch.arange(n_text)[None] < torch.randint(8, n_text + 1, (bsz, 1))
    regions = torch.arange(n_regions)[None] < torch.randint(10, n_regions + 1, (bsz, 1))
    mask = torch.cat([text, regions], 1)
    mask[1] = False
    return mask.cuda()


def compare(name_vals, dtype, seed):
    """name_vals: (name, got, low-precision reference, float64 reference) tuples."""
    for name, g, r, w in name_vals:
        tol = 1e-5 if dtype == torch.float32 else 2 * rel(r, w) + LOWP[dtype]
        check(name, g, w, tol, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64])
def test_attention_cuda(dtype, head_dim, seed):
    shape = (8, 4, 90, head_dim)
    qkv = [torch.randn(*shape, device="cuda").to(dtype).double() for _ in range(3)]
    mask = cross_masks(shape[0])
    grad_out = torch.randn(*shape, device="cuda").to(dtype).double()
    exact, exact_g = run_attention(masked_reference, qkv, mask, torch.float64, grad_out)
    ref, ref_g = run_attention(masked_reference, qkv, mask, dtype, grad_out)
    got, got_g = run_attention(triton_attention.attention, qkv, mask, dtype, grad_out)
    assert got.dtype == dtype and (got[1] == 0).all()
    compare(zip(("output", "q", "k", "v"), [got, *got_g], [ref, *ref_g], [exact, *exact_g]), dtype, seed)


@pytest.mark.parametrize("blocks", [(32, 32), (128, 64), (64, 32), (16, 16)])
def test_attention_cuda_block_shapes(blocks, seed):
    shape, dtype = (4, 2, 77, 64), torch.bfloat16
    qkv = [torch.randn(*shape, device="cuda").to(dtype).double() for _ in range(3)]
    mask = cross_masks(shape[0], 30, 47)
    grad_out = torch.randn(*shape, device="cuda").to(dtype).double()
    exact, exact_g = run_attention(masked_reference, qkv, mask, torch.float64, grad_out)
    ref, ref_g = run_attention(masked_reference, qkv, mask, dtype, grad_out)
    got, got_g = run_attention(triton_attention.attention, qkv, mask, dtype, grad_out,
                               block_m=blocks[0], block_n=blocks[1])
    compare(zip(("output", "q", "k", "v"), [got, *got_g], [ref, *ref_g], [exact, *exact_g]), dtype, seed)


def test_attention_dropout_cuda(seed):
    shape, p = (4, 3, 90, 64), 0.1
    qkv = [torch.randn(*shape, device="cuda", dtype=torch.float64) for _ in range(3)]
    mask = cross_masks(shape[0])
    grad_out = torch.randn(*shape, device="cuda", dtype=torch.float64)
    torch.manual_seed(seed)
    got, got_g = run_attention(triton_attention.attention, qkv, mask, torch.float32, grad_out, dropout_p=p)
    torch.manual_seed(seed)
    kernel_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    keep = triton_attention.dropout_keep_mask(kernel_seed, *shape[:3], p, "cuda")
    want, want_g = run_attention(lambda q, k, v, m: masked_reference(q, k, v, m, keep, p), qkv, mask,
                                 torch.float64, grad_out)
    for name, g, w in zip(("output", "q", "k", "v"), [got, *got_g], [want, *want_g]):
        check(name, g, w, 1e-5, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table_grad", ["segment", "atomic"])
def test_embedding_cuda(dtype, table_grad, seed):
    ids, pos, types, tables = embedding_inputs(16, 40, vocab=86051, n_pos=512, hidden=768, device="cuda")
    tables = [t.to(dtype).double() for t in tables]
    grad_out = torch.randn(16, 40, 768, device="cuda").to(dtype).double()
    from mvptr_ds.kernels import reference
    exact, exact_g = run_embedding(reference.concept_embedding, ids, pos, types, tables, torch.float64, grad_out)
    ref, ref_g = run_embedding(reference.concept_embedding, ids, pos, types, tables, dtype, grad_out)
    got, got_g = run_embedding(triton_embedding.concept_embedding, ids, pos, types, tables, dtype, grad_out,
                               table_grad=table_grad)
    names = ("output", "word", "position", "type", "ln weight", "ln bias")
    compare(zip(names, [got, *got_g], [ref, *ref_g], [exact, *exact_g]), dtype, seed)


def test_embedding_dropout_cuda(seed):
    ids, pos, types, tables = embedding_inputs(8, 40, vocab=86051, n_pos=512, hidden=768, device="cuda")
    p = 0.1
    grad_out = torch.randn(8, 40, 768, device="cuda", dtype=torch.float64)
    torch.manual_seed(seed)
    got, got_g = run_embedding(triton_embedding.concept_embedding, ids, pos, types, tables, torch.float32, grad_out,
                               dropout_p=p, training=True)
    torch.manual_seed(seed)
    kernel_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    keep = triton_embedding.dropout_keep_mask(kernel_seed, ids.numel(), 768, p, "cuda").view(8, 40, 768)
    from mvptr_ds.kernels import reference
    want, want_g = run_embedding(lambda *a: reference.concept_embedding(*a) * keep / (1 - p), ids, pos, types,
                                 tables, torch.float64, grad_out)
    for name, g, w in zip(("output", "word", "position", "type", "ln weight", "ln bias"), [got, *got_g],
                          [want, *want_g]):
        check(name, g, w, 1e-5, seed)


def test_dispatch_auto_is_fused_on_cuda(seed):
    q, k, v = (torch.randn(4, 2, 90, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = cross_masks(4)
    auto = kernels.attention(q, k, v, mask, impl="auto")
    plain = kernels.attention(q, k, v, mask, impl="torch")
    real = mask[:, None, :, None].expand_as(plain)
    assert (auto[~real] == 0).all(), "the fused path writes 0 on padded query rows"
    assert rel(auto[real], plain[real]) < 2e-2, f"auto vs torch on real rows (seed {seed})"
