"""Ahead-of-time compilation of the Triton kernels for the GPUs users run, on a machine without a GPU.

``launches()`` lists every launch the CUDA paths of the wrappers make (``triton_attention.attention`` and its
backward, ``triton_embedding.concept_embedding`` and its backward, the ``dropout_keep_mask`` helpers) for each
model preset in ``mvptr_ds.config.MODEL_PRESETS`` and each precision: argument types, and the constexprs the
wrappers choose on CUDA (their own helpers where they have one; otherwise the literal they pass, marked
"as in"). ``compile_launch`` compiles one launch for a CUDA compute capability with ``triton.compile`` (ttir,
ttgir, llir, ptx, then cubin through the ptxas that Triton ships), no device needed. ``tests/kernels/test_kernels_aot.py``
runs it for sm_90 (H100/H200) and sm_80 (A100). The kernel modules must be imported without
``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from mvptr_ds.kernels import triton_attention as ta
from mvptr_ds.kernels import triton_embedding as te

MODULES = ("triton_attention", "triton_embedding")  # the modules of mvptr_ds.kernels that define Triton kernels
ARCHS = {"sm_90": 90, "sm_80": 80}
# Shared memory one block may use (opt-in maximum, bytes): the runtime refuses a kernel that needs more
# (triton's OutOfResources). A100 (8.0): 163 KiB; H100/H200 (9.0): 227 KiB.
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CUDA = torch.device("cuda")  # a device object only: no GPU needed


@dataclass(frozen=True)
class Launch:
    """One kernel specialisation: ``types`` (runtime args, Triton type strings), ``constexprs``, ``aligned``
    (args that Triton specialises as divisible by 16 at launch: every pointer, from fresh torch allocations,
    and the int args whose value is a multiple of 16)."""
    module: str
    kernel: str
    types: tuple
    constexprs: tuple
    aligned: tuple
    tag: str = field(compare=False)  # e.g. "bf16,hd64,dropout"; launches equal in all else are one

    @property
    def name(self) -> str:
        return f"{self.module}.{self.kernel}[{self.tag}]"


def _launch(module, kernel, tag, types, constexprs, ints=None) -> Launch:
    aligned = [n for n, t in types.items() if t.startswith("*")]
    aligned += [n for n, v in (ints or {}).items() if v % 16 == 0]
    return Launch(module, kernel, tuple(types.items()), tuple(constexprs.items()), tuple(sorted(aligned)), tag)


def _attention(dt: str, head_dim: int, dropout: bool) -> list[Launch]:
    """AttentionFn.forward / backward on CUDA tensors of dtype ``dt``."""
    x = "*" + dt
    block_m, block_n = ta.default_blocks(90, _CUDA)  # the same for every sequence length on CUDA
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
                  PREC="ieee" if dt == "fp32" else "tf32",  # as in AttentionFn.forward
                  UPCAST=ta._upcast(SimpleNamespace(dtype=DTYPES[dt], device=_CUDA)), DROPOUT=dropout)
    scalars = dict(seq_len="i32", n_heads="i32", p_drop="fp32", seed="i32")
    tag = f"{dt},hd{head_dim}" + (",dropout" if dropout else "")
    out = [
        _launch("triton_attention", "_fwd_kernel", tag,
                dict(q_ptr=x, k_ptr=x, v_ptr=x, mask_ptr="*u8", o_ptr=x, lse_ptr="*fp32", qk_scale="fp32",
                     **scalars), common),
        _launch("triton_attention", "_bwd_dkdv_kernel", tag,
                dict(q_ptr=x, k_ptr=x, v_ptr=x, mask_ptr="*u8", do_ptr=x, lse_ptr="*fp32", delta_ptr="*fp32",
                     dk_ptr=x, dv_ptr=x, qk_scale="fp32", sm_scale="fp32", **scalars), common),
        _launch("triton_attention", "_bwd_dq_kernel", tag,
                dict(q_ptr=x, k_ptr=x, v_ptr=x, mask_ptr="*u8", do_ptr=x, lse_ptr="*fp32", delta_ptr="*fp32",
                     dq_ptr=x, qk_scale="fp32", sm_scale="fp32", **scalars), common),
    ]
    out.append(_launch("triton_attention", "_delta_kernel", f"{dt},hd{head_dim}",
                       dict(o_ptr=x, do_ptr=x, delta_ptr="*fp32", n_rows="i32"),
                       dict(BLOCK=64, HEAD_DIM=head_dim)))  # as in AttentionFn.backward
    return out


def _embedding(dt: str, hidden: int, dropout: bool) -> list[Launch]:
    """ConceptEmbeddingFn.forward / backward (both table_grad modes) on CUDA, tables of dtype ``dt``, int64 ids."""
    x = "*" + dt
    rows, block_h = te._rows_per_program(_CUDA), te._block_h(hidden)
    ints = dict(hidden=hidden)
    ids = dict(ids_ptr="*i64", pos_ids_ptr="*i64", type_ids_ptr="*i64")
    tag = f"{dt},hidden{hidden}" + (",dropout" if dropout else "")
    out = [_launch("triton_embedding", "_fwd_kernel", tag,
                   dict(**ids, word_ptr=x, pos_ptr=x, type_ptr=x, gamma_ptr=x, beta_ptr=x, out_ptr=x,
                        mean_ptr="*fp32", rstd_ptr="*fp32", n_rows="i32", hidden="i32", eps="fp32", p_drop="fp32",
                        seed="i32"),
                   dict(ROWS=rows, BLOCK_H=block_h, DROPOUT=dropout), ints)]
    for mode in te.TABLE_GRADS:
        out.append(_launch(
            "triton_embedding", "_bwd_kernel", f"{tag},{mode}",
            dict(dy_ptr=x, **ids, word_ptr=x, pos_ptr=x, type_ptr=x, gamma_ptr=x, mean_ptr="*fp32",
                 rstd_ptr="*fp32", dx_ptr="*fp32", dgamma_part_ptr="*fp32", dbeta_part_ptr="*fp32",
                 dword_ptr="*fp32", dpos_ptr="*fp32", dtype_ptr="*fp32", n_rows="i32", hidden="i32",
                 p_drop="fp32", seed="i32"),
            dict(ROWS=rows, TILES=8, BLOCK_H=block_h, DROPOUT=dropout, ATOMIC=mode == "atomic"),  # as in backward
            ints))
    out.append(_launch("triton_embedding", "_segment_sum_kernel", f"{dt},hidden{hidden}",
                       dict(sorted_ids_ptr="*i64", seg_end_ptr="*i64", perm_ptr="*i64", src_ptr="*fp32",
                            dst_ptr=x, n_rows="i32", hidden="i32"),
                       dict(BLOCK_R=16, BLOCK_H=min(256, block_h)), ints))  # as in _segment_table_grad
    return out


def launches() -> list[Launch]:
    """Every CUDA launch of the wrappers for each preset x precision (dropout variants only where the preset has
    dropout), without duplicates."""
    from mvptr_ds.config import MODEL_PRESETS
    found = []
    for cfg in MODEL_PRESETS.values():
        for dt in DTYPES:
            for dropout in sorted({False, cfg.attention_dropout > 0}):  # training and evaluation
                found += _attention(dt, cfg.hidden_size // cfg.num_attention_heads, dropout)
            for dropout in sorted({False, cfg.hidden_dropout > 0}):
                found += _embedding(dt, cfg.hidden_size, dropout)
    keep = dict(out_ptr="*i8", n="i32", p_drop="fp32", seed="i32")
    for module, kernel in (("triton_attention", "_keep_kernel"), ("triton_embedding", "_keep_mask_kernel")):
        found.append(_launch(module, kernel, "int8", keep, dict(BLOCK=1024)))  # as in dropout_keep_mask
    return list(dict.fromkeys(found))


def jit_functions() -> dict[str, object]:
    """``{"module.name": fn}`` for every ``@triton.jit`` function defined in the kernel modules (compiled or
    interpreted)."""
    from triton.runtime.jit import JITFunction
    out = {}
    for module in MODULES:
        mod = importlib.import_module(f"mvptr_ds.kernels.{module}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) or type(obj).__name__ == "InterpretedFunction":
                out[f"{module}.{name}"] = obj
    return out


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile ``launch`` for ``sm_<arch>``; returns the stages produced, the shared memory the kernel needs
    (bytes) and the ``@triton.jit`` functions of mvptr_ds compiled into it. Raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(f"mvptr_ds.kernels.{launch.module}"), launch.kernel)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{launch.name} is {type(fn).__name__}, not a compiled JITFunction: import the kernel "
                           f"modules without TRITON_INTERPRET=1")
    types, constexprs = dict(launch.types), dict(launch.constexprs)
    unknown = (set(types) | set(constexprs)) ^ set(fn.arg_names)
    if unknown:
        raise RuntimeError(f"{launch.name}: the launch description and the kernel's parameters differ in "
                           f"{sorted(unknown)}: update mvptr_ds/kernels/aot.py")
    signature = {n: "constexpr" if n in constexprs else types[n] for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in launch.aligned}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))
    # The IR before inlining names each jit function called: ``@mvptr_ds.kernels.triton_attention._mm__...``.
    callees = [q for q in jit_functions() if f"@mvptr_ds.kernels.{q}__" in compiled.asm["source"]]
    return dict(stages=[s for s in compiled.asm if s != "source"], shared=compiled.metadata.shared,
                callees=callees, ptx_target=re.search(r"^\.target (\S+)", compiled.asm["ptx"], re.M).group(1),
                cubin_bytes=len(compiled.asm["cubin"]))


def compile_report(launch: Launch, arch: int) -> dict:
    """``compile_launch`` for a worker process: the error as text instead of an exception."""
    t0 = _cpu_seconds()
    try:
        out = compile_launch(launch, arch)
    except Exception as exc:  # noqa: BLE001 - reported per launch by the test
        out = dict(error=f"{type(exc).__name__}: {exc}"[-3000:])
    return dict(out, cpu_s=round(_cpu_seconds() - t0, 2))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas)."""
    import resource
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                        resource.RUSAGE_CHILDREN)))
