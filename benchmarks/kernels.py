"""Fused kernels vs reference: forward and forward+backward time, GB/s or TFLOP/s against the device ceilings.

    python benchmarks/kernels.py --device cuda --out kernels.json      # base sizes, bf16 (the H200 check)
    python benchmarks/kernels.py --device cpu --out kernels_cpu.json   # small shapes, Triton interpreted

Sizes on CUDA are MVPTR base: batch 128, hidden 768, 12 heads of 64, text 40, tags 20 + regions 50 (visual
stream 70), cross stream 40 + 50 = 90, embedding table 86,051 rows; real lengths are drawn ragged (text 8..40,
tags 3..20, regions 10..50), so the visual and cross masks are not prefixes. Every variant is also checked
against a float64 reference (on real query rows; the upstream gradient is zero on padded rows, where the
variants legitimately differ), and the largest relative error over output and gradients is reported.

Counting. Attention: useful FLOPs = 4 * heads * head_dim * sum_b(real_b^2) forward, x3 for forward+backward
(no recompute counted); the dense count (all L x L) is in the JSON too. Embedding: fewest bytes = word rows
read + output written (forward); + upstream gradient read + word rows read again + the dense table gradient
written once (zero-fill; ZeRO needs a dense grad) + position/type tables (backward). Ceilings: the H200's
measured ~4.3 TB/s copy and ~790 TFLOP/s bf16 dense matmul (PLATFORM.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

CEIL_BYTES = 4.3e12
CEIL_FLOPS = 790e12
BASE = dict(batch=128, heads=12, head_dim=64, hidden=768, text=40, tags=20, regions=50, vocab=86051, n_pos=512)
SMALL = dict(batch=2, heads=2, head_dim=32, hidden=64, text=12, tags=6, regions=10, vocab=1000, n_pos=64)


def ragged_masks(cfg, gen):
    """{case: [B, L] bool} for text, visual (tags + regions) and cross (text + regions) streams."""
    import torch
    bsz = cfg["batch"]

    def prefix(length, lo):
        n = torch.randint(min(lo, length), length + 1, (bsz, 1), generator=gen)
        return torch.arange(length)[None, :] < n  # [B, length]

    text, tags, regions = prefix(cfg["text"], 8), prefix(cfg["tags"], 3), prefix(cfg["regions"], 10)
    return {"text": text, "visual": torch.cat([tags, regions], 1), "cross": torch.cat([text, regions], 1)}


class Timer:
    """Median wall time of ``fn`` in ms: CUDA events through triton's do_bench, or the host clock on CPU."""

    def __init__(self, device: str, reps: int):
        self.device, self.reps = device, reps

    def __call__(self, fn) -> float:
        if self.device == "cuda":
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        fn()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def machine(device: str) -> str:
    """The machine in words: CPU model and cores, and the GPU when benchmarking on CUDA."""
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"
    if device == "cuda":
        import torch
        props = torch.cuda.get_device_properties(0)
        desc = f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB), " + desc
    return desc


def rel_err(got, want, rows=None) -> float:
    import torch
    got, want = got.detach().double(), want.detach().double()
    if rows is not None:
        got, want = got * rows, want * rows
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def attention_variants(device: str):
    """name -> (fn(q, k, v, mask) or None, supports backward, note)."""
    import torch
    from mvptr_ds.kernels import flex, reference, triton_attention
    out = {"reference": (reference.attention, True, "SDPA, backend chosen by torch, bool mask")}
    if device == "cuda":
        for bm, bn in ((64, 64), (32, 32), (128, 64), (64, 32)):
            out[f"triton_{bm}x{bn}"] = (
                lambda q, k, v, m, bm=bm, bn=bn: triton_attention.attention(q, k, v, m, block_m=bm, block_n=bn),
                True, "own Triton kernel")
    else:
        out["triton"] = (triton_attention.attention, True, "own Triton kernel (interpreted)")
    out["flex"] = (flex.attention, device == "cuda", "flex_attention, block mask built per call")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"math": SDPBackend.MATH}
    if device == "cuda":
        backends.update(efficient=SDPBackend.EFFICIENT_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION,
                        flash=SDPBackend.FLASH_ATTENTION)
    for name, backend in backends.items():
        def fn(q, k, v, m, backend=backend):
            with sdpa_kernel(backend):
                return reference.attention(q, k, v, m)
        out[f"sdpa_{name}"] = (fn, True, f"SDPA forced to {name}, bool mask")
    if device == "cuda":
        def nomask(q, k, v, m):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out["sdpa_flash_nomask"] = (nomask, True, "flash without any mask: a speed bound, wrong for padding")
    return out


def bench_attention(cfg, masks, dtype, device, timer, record):
    import torch
    heads, hd = cfg["heads"], cfg["head_dim"]
    for case, mask in masks.items():
        mask = mask.to(device)
        bsz, seq_len = mask.shape
        real = mask.sum(1).double()
        flops_useful = 4.0 * heads * hd * float((real * real).sum())
        flops_dense = 4.0 * bsz * heads * seq_len * seq_len * hd
        qkv = [torch.randn(bsz, heads, seq_len, hd, device=device, dtype=dtype) for _ in range(3)]
        rows = mask[:, None, :, None].to(torch.float64)  # real query rows
        grad_out = torch.randn(bsz, heads, seq_len, hd, device=device, dtype=dtype) * rows.to(dtype)
        exact = [t.double().requires_grad_() for t in qkv]
        from mvptr_ds.kernels import reference
        ref_out = reference.attention(*exact, mask)
        ref_out.backward(grad_out.double())
        want = [ref_out, *(t.grad for t in exact)]
        base_times = {}
        for name, (fn, has_bwd, note) in attention_variants(device).items():
            row = dict(name=f"attention/{case}/{name}", kernel="attention", case=case, variant=name, note=note,
                       shape=[bsz, heads, seq_len, hd], dtype=str(dtype).replace("torch.", ""),
                       real_fraction=float(real.mean()) / seq_len, flops_fwd_useful=flops_useful,
                       flops_fwd_dense=flops_dense)
            try:
                q, k, v = (t.clone().requires_grad_(has_bwd) for t in qkv)
                out = fn(q, k, v, mask)
                errs = [rel_err(out, want[0], rows)]
                if has_bwd:
                    out.backward(grad_out)
                    errs += [rel_err(t.grad, w) for t, w in zip((q, k, v), want[1:])]
                row["max_rel_err"] = max(errs)
                with torch.no_grad():
                    row["fwd_ms"] = timer(lambda: fn(*qkv, mask))
                if has_bwd:
                    def step():
                        out = fn(q, k, v, mask)
                        out.backward(grad_out)
                        q.grad = k.grad = v.grad = None
                    row["fwdbwd_ms"] = timer(step)
            except Exception as exc:  # a backend that refuses this input is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if "fwd_ms" in row:
                row["fwd_tflops"] = flops_useful / row["fwd_ms"] / 1e9
            if "fwdbwd_ms" in row:
                row["fwdbwd_tflops"] = 3 * flops_useful / row["fwdbwd_ms"] / 1e9
            if device == "cuda":  # the ceilings are the H200's: meaningless for the CPU run
                for key in ("fwd", "fwdbwd"):
                    if f"{key}_tflops" in row:
                        row[f"{key}_frac_ceiling"] = row[f"{key}_tflops"] * 1e12 / CEIL_FLOPS
            if name == "reference":
                base_times = {k: row.get(k) for k in ("fwd_ms", "fwdbwd_ms")}
            for key in ("fwd_ms", "fwdbwd_ms"):
                if row.get(key) and base_times.get(key):
                    row[f"speedup_{key[:-3]}"] = base_times[key] / row[key]
            record(row)


def bench_embedding(cfg, masks, dtype, device, timer, record, gen):
    import torch
    from mvptr_ds.kernels import reference, triton_embedding
    hidden, vocab, n_pos = cfg["hidden"], cfg["vocab"], cfg["n_pos"]
    esize = torch.finfo(dtype).bits // 8
    tables = [torch.randn(vocab, hidden, generator=gen) * 0.02, torch.randn(n_pos, hidden, generator=gen) * 0.02,
              torch.randn(2, hidden, generator=gen) * 0.02, 1 + 0.1 * torch.randn(hidden, generator=gen),
              0.1 * torch.randn(hidden, generator=gen)]
    tables = [t.to(device=device, dtype=dtype) for t in tables]
    for case, n_tok, type_id in (("text", cfg["text"], 0), ("tags", cfg["tags"], 1)):
        mask = masks["text"] if case == "text" else masks["visual"][:, :n_tok]
        bsz = mask.shape[0]
        ids = torch.randint(1, vocab, (bsz, n_tok), generator=gen)
        ids[~mask] = 0  # [PAD]
        ids, mask = ids.to(device), mask.to(device)
        pos = torch.arange(n_tok, device=device).expand(bsz, n_tok)
        types = torch.full_like(ids, type_id)
        n = ids.numel()
        bytes_fwd = 2 * n * hidden * esize + 3 * n * 8
        bytes_bwd = 2 * n * hidden * esize + (vocab + n_pos + 2) * hidden * esize
        grad_out = torch.randn(bsz, n_tok, hidden, device=device, dtype=dtype) * mask[..., None].to(dtype)
        exact = [t.double().requires_grad_() for t in tables]
        ref_out = reference.concept_embedding(ids, pos, types, *exact, 1e-12)
        ref_out.backward(grad_out.double())
        want = [ref_out, *(t.grad for t in exact)]
        variants = {"reference": lambda *a, **kw: reference.concept_embedding(*a, **kw),
                    "fused": lambda *a, **kw: triton_embedding.concept_embedding(*a, **kw),
                    "fused_atomic": lambda *a, **kw: triton_embedding.concept_embedding(*a, **kw,
                                                                                          table_grad="atomic")}
        base_times = {}
        for name, fn in variants.items():
            row = dict(name=f"embedding/{case}/{name}", kernel="embedding", case=case, variant=name,
                       shape=[bsz, n_tok, hidden], table_rows=vocab, dtype=str(dtype).replace("torch.", ""),
                       distinct_ids=int(ids.unique().numel()), bytes_fwd=bytes_fwd, bytes_fwdbwd=bytes_fwd + bytes_bwd,
                       dropout_p=0.1)
            params = [t.clone().requires_grad_() for t in tables]
            out = fn(ids, pos, types, *params, 1e-12)
            out.backward(grad_out)
            row["max_rel_err"] = max(rel_err(g, w) for g, w in zip([out, *(p.grad for p in params)], want))
            with torch.no_grad():
                row["fwd_ms"] = timer(lambda: fn(ids, pos, types, *tables, 1e-12, dropout_p=0.1, training=True))

            def step():
                out = fn(ids, pos, types, *params, 1e-12, dropout_p=0.1, training=True)
                out.backward(grad_out)
                for p in params:
                    p.grad = None
            row["fwdbwd_ms"] = timer(step)
            row["fwd_gbs"] = bytes_fwd / row["fwd_ms"] / 1e6
            row["fwdbwd_gbs"] = (bytes_fwd + bytes_bwd) / row["fwdbwd_ms"] / 1e6
            if device == "cuda":  # the ceilings are the H200's: meaningless for the CPU run
                row["fwd_frac_ceiling"] = row["fwd_gbs"] * 1e9 / CEIL_BYTES
                row["fwdbwd_frac_ceiling"] = row["fwdbwd_gbs"] * 1e9 / CEIL_BYTES
            if name == "reference":
                base_times = {k: row[k] for k in ("fwd_ms", "fwdbwd_ms")}
            for key in ("fwd_ms", "fwdbwd_ms"):
                row[f"speedup_{key[:-3]}"] = base_times[key] / row[key]
            record(row)


def print_table(rows) -> None:
    head = f"{'name':34s} {'fwd ms':>9s} {'f+b ms':>9s} {'rate f/f+b':>17s} {'%ceil f+b':>9s} " \
           f"{'x ref f/f+b':>12s} {'rel err':>8s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['name']:34s} unsupported: {r['error'][:80]}")
            continue
        unit = "TF/s" if r["kernel"] == "attention" else "GB/s"
        a = r.get("fwd_tflops", r.get("fwd_gbs"))
        b = r.get("fwdbwd_tflops", r.get("fwdbwd_gbs"))
        rate = f"{a:7.3g}/{b:7.3g}" if b is not None else f"{a:7.3g}/      -"
        rate = f"{rate}{unit[0]}"
        fb = f"{r['fwdbwd_ms']:9.3f}" if "fwdbwd_ms" in r else f"{'-':>9s}"
        frac = f"{100 * r['fwdbwd_frac_ceiling']:8.2f}%" if "fwdbwd_frac_ceiling" in r else f"{'-':>9s}"
        sp = f"{r.get('speedup_fwd', 0):.3g}/" + (f"{r['speedup_fwdbwd']:.3g}" if "speedup_fwdbwd" in r else "-")
        print(f"{r['name']:34s} {r['fwd_ms']:9.3f} {fb} {rate:>17s} {frac} {sp:>12s} {r['max_rel_err']:8.1e}")


LOWP_SLACK = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


def fastest(rows) -> dict:
    """Per kernel: the variant with the least forward+backward time summed over the cases, among the variants
    that ran every case and stayed within 2x the reference's own error (+ a dtype slack) everywhere."""
    out = {}
    for kernel in sorted({r["kernel"] for r in rows}):
        mine = [r for r in rows if r["kernel"] == kernel]
        ref_err = {r["case"]: r["max_rel_err"] for r in mine if r["variant"] == "reference" and "max_rel_err" in r}
        total, cases = {}, {r["case"] for r in mine}
        for r in mine:
            tol = 2 * ref_err.get(r["case"], 0.0) + LOWP_SLACK.get(r["dtype"], 1e-5)
            ok = "fwdbwd_ms" in r and r.get("max_rel_err", float("inf")) <= tol
            total.setdefault(r["variant"], {})[r["case"]] = r["fwdbwd_ms"] if ok else None
        good = {v: sum(t.values()) for v, t in total.items() if set(t) == cases and None not in t.values()}
        if good:
            best = min(good, key=good.get)
            out[kernel] = dict(variant=best, fwdbwd_ms_total=good[best],
                               reference_ms_total=good.get("reference"), correct_variants=sorted(good))
    return out


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                    help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions on cpu (cuda uses do_bench)")
    ap.add_argument("--only", choices=("attention", "embedding"), default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON file, rewritten after every row")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules define their kernels
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kernels.py: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    cfg = BASE if args.device == "cuda" else SMALL
    gen = torch.Generator().manual_seed(0)
    masks = ragged_masks(cfg, gen)
    timer = Timer(args.device, args.reps)
    result = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreted)",
                  machine=machine(args.device), torch=torch.__version__, triton=_triton_version(),
                  dtype=str(dtype).replace("torch.", ""), sizes=cfg,
                  date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  ceilings=dict(bytes_per_s=CEIL_BYTES, flops=CEIL_FLOPS),
                  command=" ".join(["python benchmarks/kernels.py", *(argv if argv is not None else sys.argv[1:])]),
                  rows=[])

    def record(row):
        result["rows"].append(row)
        print(f"  {row['name']}: " + ", ".join(f"{k}={row[k]:.4g}" for k in ("fwd_ms", "fwdbwd_ms", "max_rel_err")
                                                   if isinstance(row.get(k), float)) + (
            f" error={row['error']}" if "error" in row else ""), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))

    if args.only in (None, "embedding"):
        bench_embedding(cfg, masks, dtype, args.device, timer, record, gen)
    if args.only in (None, "attention"):
        bench_attention(cfg, masks, dtype, args.device, timer, record)
    print(f"\n{result['device']}; {result['machine']}; torch {result['torch']}, triton {result['triton']}; "
          f"{result['date']}\n{result['command']}\n{dtype}, sizes {cfg}")
    print_table(result["rows"])
    result["fastest"] = fastest(result["rows"])
    for kernel, f in result["fastest"].items():
        ratio = f" ({f['reference_ms_total'] / f['fwdbwd_ms_total']:.3g}x the reference)" \
            if f.get("reference_ms_total") else ""
        print(f"fastest correct {kernel} (forward+backward, summed over cases): {f['variant']}{ratio}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
