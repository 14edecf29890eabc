"""Fused masked attention in Triton (flash-attention 2 style: online softmax, recompute in backward).

q, k, v: ``[B, heads, L, head_dim]`` contiguous; key_padding_mask ``[B, L]`` bool (True = real token). The
same mask marks real queries (self-attention over one padded stream), and the kernel skips work on it:

* a block of ``BLOCK_N`` keys with no real key is skipped (no loads, no dot products), any mask shape allowed
  (MVPTR's visual stream is ``[CLS] tags [SEP] pad.. regions pad..``, so the real keys are not a prefix);
* a block of ``BLOCK_M`` queries with no real query does no key loop and writes zeros;
* inside a block, padded keys are masked to probability 0 and padded query rows are written as 0.

So the function computed is ``out[b, :, i] = softmax over real keys`` for a real query ``i`` and ``0`` for a
padded query (the reference computes those rows too, but they are meaningless: padded positions are never
keys, and no loss reads them); a sample with no real key gets zeros, never NaN. The backward is the exact
gradient of that function. Dropout on the attention probabilities uses a counter-based mask
(``tl.rand(seed, ((b * heads + h) * L + i) * L + j)``) that the backward draws again.

fp32 inputs use IEEE fp32 dot products (no tf32), so fp32 results match a float64 reference to ~1e-6;
fp16/bf16 use the tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel-written buffer; tests swap in a NaN-filled one to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST works around the CPU interpreter, which multiplies bf16 bit patterns."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr, qk_scale, seq_len, n_heads, p_drop, seed,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr, DROPOUT: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // n_heads
    base = bh.to(tl.int64) * seq_len * HEAD_DIM
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_m = offs_m < seq_len
    q_real = tl.load(mask_ptr + b * seq_len + offs_m, mask=in_m, other=0) != 0
    any_q = tl.max(q_real.to(tl.int32), axis=0) > 0
    q = tl.load(q_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=in_m[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_hi = tl.where(any_q, seq_len, 0)
    for start_n in range(0, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < seq_len
        k_real = tl.load(mask_ptr + b * seq_len + offs_n, mask=in_n, other=0) != 0
        if tl.max(k_real.to(tl.int32), axis=0) > 0:
            kt = tl.load(k_ptr + base + offs_n[None, :] * HEAD_DIM + offs_d[:, None], mask=in_n[None, :],
                         other=0.0)  # [HEAD_DIM, BLOCK_N]
            v = tl.load(v_ptr + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=in_n[:, None],
                        other=0.0)  # [BLOCK_N, HEAD_DIM]
            s = _mm(q, kt, PREC, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
            s = tl.where(k_real[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: this block has a real key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DROPOUT:
                cnt = (bh * seq_len + offs_m[:, None]) * seq_len + offs_n[None, :]
                p = tl.where(tl.rand(seed, cnt) >= p_drop, p / (1.0 - p_drop), 0.0)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC, UPCAST)
            m_i = m_new
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out = tl.where(q_real[:, None], out, 0.0)
    tl.store(o_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=in_m[:, None])
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), 0.0)
    tl.store(lse_ptr + bh.to(tl.int64) * seq_len + offs_m, lse, mask=in_m)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, n_rows, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    m = rows[:, None] < n_rows
    o = tl.load(o_ptr + offs, mask=m, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(o * do, axis=1), mask=rows < n_rows)


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                     qk_scale, sm_scale, seq_len, n_heads, p_drop, seed,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
                     UPCAST: tl.constexpr, DROPOUT: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // n_heads
    base = bh.to(tl.int64) * seq_len * HEAD_DIM
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_n = offs_n < seq_len
    k_real = tl.load(mask_ptr + b * seq_len + offs_n, mask=in_n, other=0) != 0
    any_k = tl.max(k_real.to(tl.int32), axis=0) > 0
    k = tl.load(k_ptr + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=in_n[:, None], other=0.0)
    v = tl.load(v_ptr + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=in_n[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    m_hi = tl.where(any_k, seq_len, 0)
    for start_m in range(0, m_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_m = offs_m < seq_len
        q_real = tl.load(mask_ptr + b * seq_len + offs_m, mask=in_m, other=0) != 0
        if tl.max(q_real.to(tl.int32), axis=0) > 0:
            qt = tl.load(q_ptr + base + offs_m[None, :] * HEAD_DIM + offs_d[:, None], mask=in_m[None, :],
                         other=0.0)  # [HEAD_DIM, BLOCK_M]
            dot_ = tl.load(do_ptr + base + offs_m[None, :] * HEAD_DIM + offs_d[:, None], mask=in_m[None, :],
                           other=0.0)  # dO^T [HEAD_DIM, BLOCK_M]
            lse = tl.load(lse_ptr + bh.to(tl.int64) * seq_len + offs_m, mask=in_m, other=0.0)
            delta = tl.load(delta_ptr + bh.to(tl.int64) * seq_len + offs_m, mask=in_m, other=0.0)
            st = _mm(k, qt, PREC, UPCAST) * qk_scale  # S^T [BLOCK_N, BLOCK_M], log2 units
            pt = tl.exp2(st - lse[None, :])
            pt = tl.where(k_real[:, None] & q_real[None, :], pt, 0.0)
            dpt = _mm(v, dot_, PREC, UPCAST)  # (dO V^T)^T [BLOCK_N, BLOCK_M]
            if DROPOUT:
                cnt = (bh * seq_len + offs_m[None, :]) * seq_len + offs_n[:, None]
                zt = tl.where(tl.rand(seed, cnt) >= p_drop, 1.0 / (1.0 - p_drop), 0.0)
                dv += _mm((pt * zt).to(dot_.dtype), tl.trans(dot_), PREC, UPCAST)
                dpt = dpt * zt
            else:
                dv += _mm(pt.to(dot_.dtype), tl.trans(dot_), PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _mm(dst.to(qt.dtype), tl.trans(qt), PREC, UPCAST)
    dk = dk * sm_scale
    offs = base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=in_n[:, None])
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=in_n[:, None])


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                   qk_scale, sm_scale, seq_len, n_heads, p_drop, seed,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr, DROPOUT: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // n_heads
    base = bh.to(tl.int64) * seq_len * HEAD_DIM
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_m = offs_m < seq_len
    q_real = tl.load(mask_ptr + b * seq_len + offs_m, mask=in_m, other=0) != 0
    any_q = tl.max(q_real.to(tl.int32), axis=0) > 0
    q = tl.load(q_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=in_m[:, None], other=0.0)
    do = tl.load(do_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=in_m[:, None], other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * seq_len + offs_m, mask=in_m, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * seq_len + offs_m, mask=in_m, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_hi = tl.where(any_q, seq_len, 0)
    for start_n in range(0, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < seq_len
        k_real = tl.load(mask_ptr + b * seq_len + offs_n, mask=in_n, other=0) != 0
        if tl.max(k_real.to(tl.int32), axis=0) > 0:
            kt = tl.load(k_ptr + base + offs_n[None, :] * HEAD_DIM + offs_d[:, None], mask=in_n[None, :],
                         other=0.0)  # [HEAD_DIM, BLOCK_N]
            vt = tl.load(v_ptr + base + offs_n[None, :] * HEAD_DIM + offs_d[:, None], mask=in_n[None, :],
                         other=0.0)  # [HEAD_DIM, BLOCK_N]
            s = _mm(q, kt, PREC, UPCAST) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(q_real[:, None] & k_real[None, :], p, 0.0)
            dp = _mm(do, vt, PREC, UPCAST)  # [BLOCK_M, BLOCK_N]
            if DROPOUT:
                cnt = (bh * seq_len + offs_m[:, None]) * seq_len + offs_n[None, :]
                dp = tl.where(tl.rand(seed, cnt) >= p_drop, dp / (1.0 - p_drop), 0.0)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(kt.dtype), tl.trans(kt), PREC, UPCAST)
    dq = dq * sm_scale
    tl.store(dq_ptr + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=in_m[:, None])


def default_blocks(seq_len: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 64 x 64 on the GPU (L = 40..90 at base: 1-2 key blocks per query block), 16 on CPU."""
    if device.type != "cuda":
        return 16, 16
    return 64, 64


def _upcast(q: torch.Tensor) -> bool:
    # bf16 products are exact in fp32, so upcasting before an fp32-accumulating dot computes the same sums.
    return q.dtype == torch.bfloat16 and q.device.type != "cuda"


class AttentionFn(torch.autograd.Function):
    """Autograd wrapper over the three kernels; see ``attention``."""

    @staticmethod
    def forward(ctx, q, k, v, mask_u8, p_drop, block_m, block_n):
        bsz, heads, seq_len, head_dim = q.shape
        sm_scale = 1.0 / math.sqrt(head_dim)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item()) if p_drop > 0 else 0
        o = _empty(q.shape, q.dtype, q.device)
        lse = _empty((bsz, heads, seq_len), torch.float32, q.device)
        grid = (triton.cdiv(seq_len, block_m), bsz * heads)
        _fwd_kernel[grid](q, k, v, mask_u8, o, lse, sm_scale * _LOG2E, seq_len, heads, p_drop, seed,
                          BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, PREC=prec, UPCAST=_upcast(q),
                          DROPOUT=p_drop > 0)
        ctx.save_for_backward(q, k, v, mask_u8, o, lse)
        ctx.args = (sm_scale, p_drop, seed, block_m, block_n, prec)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, mask_u8, o, lse = ctx.saved_tensors
        sm_scale, p_drop, seed, block_m, block_n, prec = ctx.args
        bsz, heads, seq_len, head_dim = q.shape
        do = do.contiguous()
        n_rows = bsz * heads * seq_len
        delta = _empty((bsz, heads, seq_len), torch.float32, q.device)
        _delta_kernel[(triton.cdiv(n_rows, 64),)](o, do, delta, n_rows, BLOCK=64, HEAD_DIM=head_dim)
        dq, dk, dv = (_empty(t.shape, t.dtype, t.device) for t in (q, k, v))
        common = dict(BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, PREC=prec, UPCAST=_upcast(q),
                      DROPOUT=p_drop > 0)
        scalars = (sm_scale * _LOG2E, sm_scale, seq_len, heads, p_drop, seed)
        _bwd_dkdv_kernel[(triton.cdiv(seq_len, block_n), bsz * heads)](
            q, k, v, mask_u8, do, lse, delta, dk, dv, *scalars, **common)
        _bwd_dq_kernel[(triton.cdiv(seq_len, block_m), bsz * heads)](
            q, k, v, mask_u8, do, lse, delta, dq, *scalars, **common)
        return dq, dk, dv, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor,
              dropout_p: float = 0.0, block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Masked attention, fused: q, k, v ``[B, heads, L, head_dim]``, mask ``[B, L]`` bool (True = real).

    Returns ``[B, heads, L, head_dim]`` in q's dtype; rows of padded queries are 0. head_dim must be a power of
    two in 16..128. On CPU tensors the kernels need ``TRITON_INTERPRET=1`` set before this module is imported.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention: q, k, v must be [B, heads, L, head_dim] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, _, seq_len, head_dim = q.shape
    if tuple(key_padding_mask.shape) != (bsz, seq_len):
        raise ValueError(f"attention: key_padding_mask must be [B, L] = {(bsz, seq_len)}, "
                         f"got {tuple(key_padding_mask.shape)}")
    if head_dim not in (16, 32, 64, 128):
        raise ValueError(f"attention: head_dim {head_dim} unsupported by the Triton kernel (16, 32, 64, 128)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"attention: q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    dm, dn = default_blocks(seq_len, q.device)
    mask_u8 = key_padding_mask.to(torch.bool).contiguous().view(torch.uint8)  # [B, L], 1 = real
    return AttentionFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), mask_u8, float(dropout_p),
                             block_m or dm, block_n or dn)


@triton.jit
def _keep_kernel(out_ptr, n, p_drop, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, (tl.rand(seed, offs) >= p_drop).to(tl.int8), mask=offs < n)


def dropout_keep_mask(seed: int, bsz: int, heads: int, seq_len: int, p: float, device) -> torch.Tensor:
    """The keep mask ``[B, heads, L, L]`` (bool) the kernels draw for ``seed``; for tests."""
    n = bsz * heads * seq_len * seq_len
    out = torch.empty(n, dtype=torch.int8, device=device)
    _keep_kernel[(triton.cdiv(n, 1024),)](out, n, p, seed, BLOCK=1024)
    return out.view(bsz, heads, seq_len, seq_len).bool()
