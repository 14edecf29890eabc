"""Kernel dispatch: the model's seams (attention, concept embedding, dropout) select an implementation by name.

``impl`` (``ModelConfig.kernels``, ``--kernels``) is one of ``"auto"`` (the fused Triton kernels on CUDA, the
PyTorch reference elsewhere), ``"triton"`` (own kernels: ``triton_attention``, ``triton_embedding``), ``"torch"``
(the reference: ``scaled_dot_product_attention`` and the embedding sum), ``"flex"`` (attention through PyTorch's
``flex_attention`` with a padding block mask, the embedding by the reference; an alternative fused attention on
CUDA, compared with the Triton kernel by ``benchmarks/kernels.py``) or ``"eager"`` (the authors' attention:
additive -10000 mask, explicit softmax; kept for the baseline of ``benchmarks/throughput.py``). Triton is
imported lazily, only when a Triton path is chosen; ``"triton"`` on CPU tensors runs the kernels in Triton's
interpreter (slow: for tests), which needs ``TRITON_INTERPRET=1`` in the environment from the start. Fused paths
write 0 for padded query rows (the reference computes them; they are meaningless either way).
"""
from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

from mvptr_ds.kernels import dropout as cpu_dropout
from mvptr_ds.kernels import reference

IMPLS = ("auto", "triton", "torch", "eager", "flex")


def resolve(impl: str, device: torch.device) -> str:
    """Map ``impl`` to the concrete implementation used on ``device`` ("torch", "triton", "eager" or "flex")."""
    if impl not in IMPLS:
        raise ValueError(f"kernels={impl!r}: expected one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    return impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernel_module(name: str, device: torch.device):
    """Import ``mvptr_ds.kernels.<name>`` (a Triton module). Off CUDA its kernels can only run in Triton's
    interpreter, which ``TRITON_INTERPRET=1`` must select before triton itself is first imported (deepspeed
    imports it early): refuse clearly here rather than fail inside Triton ("0 active drivers")."""
    full = f"mvptr_ds.kernels.{name}"
    if device.type != "cuda":
        flag = os.environ.get("TRITON_INTERPRET", "")
        mod = importlib.import_module(full) if flag == "1" else None
        if mod is None or type(mod._fwd_kernel).__name__ != "InterpretedFunction":
            raise RuntimeError(f"kernels='triton' on {device.type} tensors needs Triton's interpreter: set "
                               f"TRITON_INTERPRET=1 in the environment before starting (now {flag!r}), or use "
                               f"kernels='torch' or 'auto' off the GPU")
        return mod
    return importlib.import_module(full)


def attention(q, k, v, key_padding_mask, dropout_p: float = 0.0, impl: str = "auto"):
    """Masked attention over ``[B, heads, L, head_dim]`` with a ``[B, L]`` bool key mask (True = real)."""
    resolved = resolve(impl, q.device)
    if resolved == "eager":
        return reference.eager_attention(q, k, v, key_padding_mask, dropout_p)
    if resolved == "triton":
        return _kernel_module("triton_attention", q.device).attention(q, k, v, key_padding_mask, dropout_p)
    if resolved == "flex":
        from mvptr_ds.kernels import flex
        return flex.attention(q, k, v, key_padding_mask, dropout_p)
    return reference.attention(q, k, v, key_padding_mask, dropout_p)


def dropout(x: torch.Tensor, p: float, training: bool, impl: str = "auto") -> torch.Tensor:
    """Dropout of hidden states: ``F.dropout`` for ``"eager"`` (the authors' computation) and off the CPU, the
    cheaper CPU mask of :mod:`mvptr_ds.kernels.dropout` otherwise."""
    if resolve(impl, x.device) == "eager":
        return F.dropout(x, p, training)
    return cpu_dropout.dropout(x, p, training)


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool, impl: str = "auto") -> torch.Tensor:
    """``dropout(x) + residual``, fused on the CPU (:func:`mvptr_ds.kernels.dropout.dropout_add`)."""
    if resolve(impl, x.device) == "eager":
        return F.dropout(x, p, training) + residual
    return cpu_dropout.dropout_add(x, residual, p, training)


def concept_embedding(input_ids, position_ids, token_type_ids, word_weight, position_weight, type_weight,
                      ln_weight, ln_bias, eps, dropout_p: float = 0.0, training: bool = False,
                      impl: str = "auto"):
    """Fused gather + position + type + LayerNorm (+ dropout); see ``reference.concept_embedding``."""
    if resolve(impl, input_ids.device) == "triton":
        fused = _kernel_module("triton_embedding", input_ids.device)
        return fused.concept_embedding(input_ids, position_ids, token_type_ids, word_weight, position_weight,
                                       type_weight, ln_weight, ln_bias, eps, dropout_p, training)
    if resolve(impl, input_ids.device) == "eager":  # the authors' computation: torch's own dropout
        x = reference.concept_embedding(input_ids, position_ids, token_type_ids, word_weight, position_weight,
                                        type_weight, ln_weight, ln_bias, eps)
        return F.dropout(x, dropout_p, training)
    return reference.concept_embedding(input_ids, position_ids, token_type_ids, word_weight, position_weight,
                                       type_weight, ln_weight, ln_bias, eps, dropout_p, training)
