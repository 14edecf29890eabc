"""Fused concept embedding in Triton: gather word + position + type rows, LayerNorm, dropout, in one pass.

Forward (one kernel): per token, gather three table rows, add them, LayerNorm in fp32, apply a dropout mask drawn
from a counter-based generator (``tl.rand(seed, token * hidden + column)``), write ``[N, hidden]`` and the row
statistics (mean, rstd: 8 bytes per token). Nothing else is kept: backward gathers the rows again.

Backward: one kernel recomputes x-hat, applies the same dropout mask to the upstream gradient, does the
LayerNorm backward and writes ``dx`` (fp32, ``[N, hidden]``) plus per-program partial sums for the LayerNorm
weight and bias. The table gradients are then made in one of two ways:

* ``table_grad="segment"`` (default, deterministic): ids are sorted (stable), and one program per run of equal
  ids sums that run's ``dx`` rows in a fixed order and writes the row once into a zero-filled dense gradient of
  the table's own dtype. No atomics, bitwise reproducible.
* ``table_grad="atomic"``: the backward kernel itself adds ``dx`` into fp32 gradients with ``tl.atomic_add``
  (order of the additions is not fixed); the result is cast to the table dtype when that is not fp32.

What the table gradient costs. DeepSpeed/ZeRO reduce and partition ``param.grad`` as a dense tensor, so the
gradient must be dense ``[86051, 768]``. A batch touches at most N rows (base: 128 x 40 text + 128 x 20 tags,
a few thousand distinct ids), so the touched rows are about 7680 x 768 x 4 B = 24 MB of work, while the
zero-fill of the dense gradient writes 86051 x 768 x 2 B = 132 MB in bf16 (264 MB in fp32): about 30-60 us at
the H200's ~4.3 TB/s, the one unavoidable cost of a dense grad, and still small next to what the optimizer
step then does with that table (Adam reads and writes parameter, gradient and two moments: ~7 passes) and
next to ZeRO's reduce-scatter of it. Eager PyTorch pays the same fill plus a separate sort/scatter pass and
three more passes for add + LayerNorm + dropout; here only touched rows are written after the fill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TABLE_GRADS = ("segment", "atomic")


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel-written buffer; tests swap in a NaN-filled one to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _fwd_kernel(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, gamma_ptr, beta_ptr,
                out_ptr, mean_ptr, rstd_ptr, n_rows, hidden, eps, p_drop, seed,
                ROWS: tl.constexpr, BLOCK_H: tl.constexpr, DROPOUT: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < n_rows
    cmask = cols < hidden
    m2 = rmask[:, None] & cmask[None, :]
    wid = tl.load(ids_ptr + rows, mask=rmask, other=0).to(tl.int64)
    pid = tl.load(pos_ids_ptr + rows, mask=rmask, other=0).to(tl.int64)
    tid = tl.load(type_ids_ptr + rows, mask=rmask, other=0).to(tl.int64)
    x = tl.load(word_ptr + wid[:, None] * hidden + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    x += tl.load(pos_ptr + pid[:, None] * hidden + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    x += tl.load(type_ptr + tid[:, None] * hidden + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / hidden
    xc = tl.where(m2, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / hidden + eps)
    g = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * g[None, :] + b[None, :]
    offs = rows[:, None] * hidden + cols[None, :]  # [ROWS, BLOCK_H] int32 element index, also the RNG counter
    if DROPOUT:
        keep = tl.rand(seed, offs) >= p_drop
        y = tl.where(keep, y / (1.0 - p_drop), 0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _bwd_kernel(dy_ptr, ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, gamma_ptr,
                mean_ptr, rstd_ptr, dx_ptr, dgamma_part_ptr, dbeta_part_ptr, dword_ptr, dpos_ptr, dtype_ptr,
                n_rows, hidden, p_drop, seed,
                ROWS: tl.constexpr, TILES: tl.constexpr, BLOCK_H: tl.constexpr, DROPOUT: tl.constexpr,
                ATOMIC: tl.constexpr):
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < hidden
    g = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dg_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for t in range(TILES):
        rows = (tl.program_id(0) * TILES + t) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_rows
        m2 = rmask[:, None] & cmask[None, :]
        wid = tl.load(ids_ptr + rows, mask=rmask, other=0).to(tl.int64)
        pid = tl.load(pos_ids_ptr + rows, mask=rmask, other=0).to(tl.int64)
        tid = tl.load(type_ids_ptr + rows, mask=rmask, other=0).to(tl.int64)
        x = tl.load(word_ptr + wid[:, None] * hidden + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        x += tl.load(pos_ptr + pid[:, None] * hidden + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        x += tl.load(type_ptr + tid[:, None] * hidden + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
        offs = rows[:, None] * hidden + cols[None, :]  # [ROWS, BLOCK_H], same counters as the forward
        dy = tl.load(dy_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = tl.rand(seed, offs) >= p_drop
            dy = tl.where(keep, dy / (1.0 - p_drop), 0.0)
        dg_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
        wdy = dy * g[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / hidden
        c2 = tl.sum(wdy, axis=1) / hidden
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if ATOMIC:
            tl.atomic_add(dword_ptr + wid[:, None] * hidden + cols[None, :], dx, mask=m2)
            tl.atomic_add(dpos_ptr + pid[:, None] * hidden + cols[None, :], dx, mask=m2)
            tl.atomic_add(dtype_ptr + tid[:, None] * hidden + cols[None, :], dx, mask=m2)
        else:
            tl.store(dx_ptr + offs, dx, mask=m2)
    tl.store(dgamma_part_ptr + tl.program_id(0) * hidden + cols, dg_acc, mask=cmask)
    tl.store(dbeta_part_ptr + tl.program_id(0) * hidden + cols, db_acc, mask=cmask)


@triton.jit
def _segment_sum_kernel(sorted_ids_ptr, seg_end_ptr, perm_ptr, src_ptr, dst_ptr, n_rows, hidden,
                        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (i, c): if sorted position i starts a run of equal ids, dst[id, c-block] = sum of its src rows."""
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < hidden
    key = tl.load(sorted_ids_ptr + i)
    prev = tl.load(sorted_ids_ptr + i - 1, mask=i > 0, other=-1)
    is_start = key != prev
    hi = tl.where(is_start, tl.load(seg_end_ptr + i), i)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for r0 in range(i, hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < hi
        src_row = tl.load(perm_ptr + r, mask=rmask, other=0).to(tl.int64)
        tile = tl.load(src_ptr + src_row[:, None] * hidden + cols[None, :],
                       mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    if is_start:
        tl.store(dst_ptr + key.to(tl.int64) * hidden + cols, acc.to(dst_ptr.dtype.element_ty), mask=cmask)


def _block_h(hidden: int) -> int:
    return triton.next_power_of_2(hidden)


def _rows_per_program(device: torch.device) -> int:
    # On the GPU 4 rows x 1024 columns keep 32 fp32 values per thread at 4 warps; the interpreter pays per
    # program, so the CPU takes bigger tiles.
    return 4 if device.type == "cuda" else 16


def _segment_table_grad(ids: torch.Tensor, dx: torch.Tensor, n_table_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic dense gradient ``[n_table_rows, hidden]``: zero-fill, then write each touched row once.

    ids: ``[N]`` long; dx: ``[N, hidden]`` fp32 per-token gradients.
    """
    hidden = dx.shape[1]
    grad = torch.zeros(n_table_rows, hidden, dtype=dtype, device=dx.device)
    if ids.numel() == 0:
        return grad
    sorted_ids, perm = torch.sort(ids, stable=True)
    seg_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)  # [N] end of each position's run
    block_h = min(256, _block_h(hidden))
    grid = (ids.numel(), triton.cdiv(hidden, block_h))
    _segment_sum_kernel[grid](sorted_ids, seg_end, perm, dx, grad, ids.numel(), hidden,
                              BLOCK_R=16, BLOCK_H=block_h)
    return grad


def _check_ids(name: str, ids: torch.Tensor, n_table_rows: int) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"concept_embedding: {name} must be an integer tensor, got {ids.dtype}")
    if ids.device.type != "cuda" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_table_rows):
        raise ValueError(f"concept_embedding: {name} has ids outside [0, {n_table_rows}) "
                         f"(min {int(ids.min())}, max {int(ids.max())})")


class ConceptEmbeddingFn(torch.autograd.Function):
    """Autograd wrapper; inputs are flattened ``[N]`` ids and the tables; see ``concept_embedding``."""

    @staticmethod
    def forward(ctx, ids, pos_ids, type_ids, word_w, pos_w, type_w, gamma, beta, eps, p_drop, table_grad):
        n, hidden = ids.numel(), word_w.shape[1]
        if n * hidden >= 2 ** 31:
            raise ValueError(f"concept_embedding: {n} tokens x {hidden} exceeds the kernel's int32 indexing")
        out = _empty((n, hidden), word_w.dtype, word_w.device)
        mean = _empty((n,), torch.float32, word_w.device)
        rstd = _empty((n,), torch.float32, word_w.device)
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item()) if p_drop > 0 else 0
        rows = _rows_per_program(word_w.device)
        if n:
            _fwd_kernel[(triton.cdiv(n, rows),)](ids, pos_ids, type_ids, word_w, pos_w, type_w, gamma, beta,
                                                 out, mean, rstd, n, hidden, eps, p_drop, seed,
                                                 ROWS=rows, BLOCK_H=_block_h(hidden), DROPOUT=p_drop > 0)
        ctx.save_for_backward(ids, pos_ids, type_ids, word_w, pos_w, type_w, gamma, mean, rstd)
        ctx.p_drop, ctx.seed, ctx.table_grad = p_drop, seed, table_grad
        return out

    @staticmethod
    def backward(ctx, dy):
        ids, pos_ids, type_ids, word_w, pos_w, type_w, gamma, mean, rstd = ctx.saved_tensors
        n, hidden = ids.numel(), word_w.shape[1]
        dev = dy.device
        rows = _rows_per_program(dev)
        tiles = 8 if dev.type == "cuda" else 1
        n_prog = max(1, triton.cdiv(n, rows * tiles))
        alloc = _empty if n else (lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
        dg_part = alloc((n_prog, hidden), torch.float32, dev)  # one row per program
        db_part = alloc((n_prog, hidden), torch.float32, dev)
        atomic = ctx.table_grad == "atomic"
        if atomic:
            dx = torch.empty(0, dtype=torch.float32, device=dev)
            tables = [torch.zeros(w.shape, dtype=torch.float32, device=dev) for w in (word_w, pos_w, type_w)]
        else:
            dx = _empty((n, hidden), torch.float32, dev)
            tables = [dx, dx, dx]  # unused pointers in this mode
        if n:
            _bwd_kernel[(n_prog,)](dy.contiguous(), ids, pos_ids, type_ids, word_w, pos_w, type_w, gamma, mean,
                                   rstd, dx, dg_part, db_part, *tables, n, hidden, ctx.p_drop, ctx.seed,
                                   ROWS=rows, TILES=tiles, BLOCK_H=_block_h(hidden), DROPOUT=ctx.p_drop > 0,
                                   ATOMIC=atomic)
        if atomic:
            d_word, d_pos, d_type = (t.to(w.dtype) for t, w in zip(tables, (word_w, pos_w, type_w)))
        else:
            d_word, d_pos, d_type = (_segment_table_grad(i, dx, w.shape[0], w.dtype)
                                     for i, w in ((ids, word_w), (pos_ids, pos_w), (type_ids, type_w)))
        d_gamma = dg_part.sum(0).to(gamma.dtype)
        d_beta = db_part.sum(0).to(gamma.dtype)
        return None, None, None, d_word, d_pos, d_type, d_gamma, d_beta, None, None, None


def concept_embedding(input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
                      word_weight: torch.Tensor, position_weight: torch.Tensor, type_weight: torch.Tensor,
                      ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, dropout_p: float = 0.0,
                      training: bool = False, table_grad: str = "segment") -> torch.Tensor:
    """Fused ``LayerNorm(word[ids] + position[pos] + type[types])`` then dropout (when training).

    ids: ``[..., L]`` integer tensors of one shape; tables ``[rows, hidden]``; ln weight/bias ``[hidden]``.
    Returns ``[..., L, hidden]`` in the word table's dtype. ``table_grad``: "segment" (deterministic) or
    "atomic". On CPU tensors the kernels need ``TRITON_INTERPRET=1`` set before this module is imported.
    """
    if table_grad not in TABLE_GRADS:
        raise ValueError(f"table_grad={table_grad!r}: expected one of {', '.join(TABLE_GRADS)}")
    if not (input_ids.shape == position_ids.shape == token_type_ids.shape):
        raise ValueError(f"concept_embedding: ids shapes differ: input {tuple(input_ids.shape)}, "
                         f"position {tuple(position_ids.shape)}, type {tuple(token_type_ids.shape)}")
    hidden = word_weight.shape[1]
    for name, w in (("position_weight", position_weight), ("type_weight", type_weight)):
        if w.shape[1] != hidden:
            raise ValueError(f"concept_embedding: {name} has hidden {w.shape[1]}, word_weight has {hidden}")
    for name, ids, w in (("input_ids", input_ids, word_weight), ("position_ids", position_ids, position_weight),
                         ("token_type_ids", token_type_ids, type_weight)):
        _check_ids(name, ids, w.shape[0])
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"concept_embedding: dropout_p must be in [0, 1), got {dropout_p}")
    flat = [t.reshape(-1).contiguous() for t in (input_ids, position_ids, token_type_ids)]  # [N] each
    tables = [t.contiguous() for t in (word_weight, position_weight, type_weight, ln_weight, ln_bias)]
    out = ConceptEmbeddingFn.apply(*flat, *tables, float(eps), p, table_grad)  # [N, hidden]
    return out.view(*input_ids.shape, hidden)


@triton.jit
def _keep_mask_kernel(out_ptr, n, p_drop, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, (tl.rand(seed, offs) >= p_drop).to(tl.int8), mask=offs < n)


def dropout_keep_mask(seed: int, n_rows: int, hidden: int, p: float, device) -> torch.Tensor:
    """The keep mask ``[n_rows, hidden]`` (bool) that the kernels draw for ``seed``; for tests."""
    out = torch.empty(n_rows * hidden, dtype=torch.int8, device=device)
    _keep_mask_kernel[(triton.cdiv(n_rows * hidden, 1024),)](out, n_rows * hidden, p, seed, BLOCK=1024)
    return out.view(n_rows, hidden).bool()
