"""The short table at the end of ``benchmarks/gpu_check.sh``: step results, kernel timings, throughput figures.

    python benchmarks/gpu_check_summary.py --steps steps.tsv --results DIR [--throughput DIR] --device cuda

Reads the script's step log (``name<TAB>status<TAB>seconds`` per line), ``DIR/kernels_<device>.json`` written by
``benchmarks/kernels.py`` and any JSON files the throughput benchmark left in its output folder; prints Markdown.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

# The variant each kernel ships with on that device (mvptr_ds.kernels: --kernels auto uses the Triton kernel on
# CUDA, 64 x 64 blocks).
SHIPPED = {("attention", "cuda"): "triton_64x64", ("attention", "cpu"): "triton",
           ("embedding", "cuda"): "fused", ("embedding", "cpu"): "fused"}
THROUGHPUT_KEYS = re.compile(r"samples|tokens|tflop|mfu|speedup|peak|memory|micro_batch|baseline", re.I)


def step_table(steps_file: Path) -> list[str]:
    lines = ["| step | status | seconds |", "| --- | --- | ---: |"]
    for row in steps_file.read_text().splitlines():
        if row.strip():
            name, status, secs = (row.split("\t") + ["", ""])[:3]
            lines.append(f"| {name} | {status} | {secs} |")
    return lines


def kernel_table(result: dict, device: str) -> list[str]:
    rows = result["rows"]
    lines = [f"Kernels: {result['device']}; {result.get('machine', '')}; torch {result['torch']}, "
             f"triton {result.get('triton', '?')}; {result['dtype']}; {result['date']}",
             f"`{result['command']}`", "",
             "| kernel/case | reference f+b ms | shipped variant | f+b ms | x reference | % ceiling | "
             "fastest correct | f+b ms | max rel err (shipped) |",
             "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    by = {(r["kernel"], r["case"], r["variant"]): r for r in rows}
    for kernel, case in dict.fromkeys((r["kernel"], r["case"]) for r in rows):
        ref = by.get((kernel, case, "reference"), {})
        ship_name = SHIPPED.get((kernel, device), "")
        ship = by.get((kernel, case, ship_name), {})
        ref_tol = 2 * ref.get("max_rel_err", 0.0) + {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}.get(
            result["dtype"], 1e-5)
        correct = [r for r in rows if r["kernel"] == kernel and r["case"] == case and "fwdbwd_ms" in r
                   and r.get("max_rel_err", float("inf")) <= ref_tol]
        best = min(correct, key=lambda r: r["fwdbwd_ms"]) if correct else {}
        ratio = ref["fwdbwd_ms"] / ship["fwdbwd_ms"] if ref.get("fwdbwd_ms") and ship.get("fwdbwd_ms") else None
        frac = ship.get("fwdbwd_frac_ceiling")
        lines.append(
            f"| {kernel}/{case} | {_num(ref.get('fwdbwd_ms'))} | {ship_name} | {_num(ship.get('fwdbwd_ms'))} | "
            f"{_num(ratio)} | {'-' if frac is None else f'{100 * frac:.1f}%'} | {best.get('variant', '-')} | "
            f"{_num(best.get('fwdbwd_ms'))} | {_num(ship.get('max_rel_err'))} |")
    for kernel, f in result.get("fastest", {}).items():
        lines.append(f"\nfastest correct {kernel} over all cases: {f['variant']} "
                     f"({_num(f['fwdbwd_ms_total'])} ms; reference {_num(f.get('reference_ms_total'))} ms)")
    return lines


# Columns of the throughput table: (header, key path in benchmarks/throughput.py's JSON, scale).
THROUGHPUT_COLUMNS = (("samples/s", "samples_per_s", 1), ("tokens/s", "tokens_per_s", 1),
                      ("TFLOP/s", "tflops", 1), ("MFU", "mfu", 1), ("MFU (measured peak)", "mfu_measured_peak", 1),
                      ("peak GiB", "peak_memory_bytes", 2 ** -30), ("authors samples/s", "baseline.samples_per_s", 1),
                      ("speed-up vs authors", "speedup_vs_authors", 1))


def throughput_lines(folder: Path) -> list[str]:
    """One table row per JSON result under ``folder`` (one sub-folder per run); unknown layouts listed raw."""
    files = sorted(folder.rglob("*.json")) if folder.is_dir() else []
    head = ["| run | " + " | ".join(c[0] for c in THROUGHPUT_COLUMNS) + " |",
            "| --- |" + " ---: |" * len(THROUGHPUT_COLUMNS)]
    rows, other = [], []
    for path in files:
        name = str(path.relative_to(folder))
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            other.append(f"- {name}: unreadable ({exc})")
            continue
        leaves = dict(_leaves(data))
        values = [leaves.get(key) for _, key, _ in THROUGHPUT_COLUMNS]
        if all(v is None for v in values):
            found = [f"{k}={_num(v)}" for k, v in leaves.items() if THROUGHPUT_KEYS.search(k)]
            other.append(f"- {name}: " + (", ".join(found[:14]) or "no throughput figures found"))
            continue
        cells = [_num(v * scale if isinstance(v, (int, float)) else v)
                 for v, (_, _, scale) in zip(values, THROUGHPUT_COLUMNS)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if not rows and not other:
        return ["- no throughput results"]
    return (head + rows if rows else []) + other


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj
    elif isinstance(obj, str) and THROUGHPUT_KEYS.search(prefix):
        yield prefix, obj


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=Path, required=True)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--throughput", type=Path, default=None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--seconds", type=int, default=None, help="wall time of the whole check")
    args = ap.parse_args(argv)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    took = f", {args.seconds} s" if args.seconds is not None else ""
    out = [f"## gpu_check.sh on {args.device} ({when}{took})", "", *step_table(args.steps), ""]
    kernels_json = args.results / f"kernels_{args.device}.json"
    if kernels_json.is_file():
        out += kernel_table(json.loads(kernels_json.read_text()), args.device)
    else:
        out.append(f"Kernels: no {kernels_json.name} (the kernel benchmark did not run or failed)")
    out += ["", "Throughput:", *throughput_lines(args.throughput or Path("/nonexistent"))]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
