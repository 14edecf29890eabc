"""What ``throughput.py`` leaves behind: the result JSON (plus ``results.jsonl`` and ``table.md``) in ``--out``,
the lines it prints, and the flat numbers it logs to W&B."""
from __future__ import annotations

import json
import os
from typing import Dict, List

from report_tables import THROUGHPUT_HEADER, throughput_row


def write_result(result: Dict[str, object], out_dir: str) -> str:
    """``<out>/throughput_<name>.json`` plus one line in ``results.jsonl`` and in ``table.md``."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"throughput_{result['name']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(result, sort_keys=True) + "\n")
    table = os.path.join(out_dir, "table.md")
    new = not os.path.exists(table)
    with open(table, "a") as f:
        if new:
            f.write(THROUGHPUT_HEADER)
        f.write(throughput_row(result) + "\n")
    return path


def flat_numbers(d: Dict[str, object], prefix: str = "") -> Dict[str, float]:
    """The numbers of ``d`` with nested dicts flattened (``baseline/samples_per_s``, ``breakdown_s/forward``)."""
    out: Dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = v
    return out


def _ms(s: Dict[str, float]) -> str:
    return f"{1e3 * s['median']:.1f} ms [{1e3 * s['min']:.1f}-{1e3 * s['max']:.1f}]"


def summary_lines(r: Dict[str, object]) -> List[str]:
    gib = r["peak_memory_bytes"] / 2 ** 30
    lines = [f"{r['name']}: {r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:.0f} tokens/s, "
             f"{r['tflops']:.4f} TFLOP/s per rank, peak memory {gib:.2f} GiB ({r['peak_memory_kind']}); "
             f"{r['parameters'] / 1e6:.1f}M parameters (vocabulary {r['vocab']['vocab_size']} rows, "
             f"{r['vocab']['only_word_size']} word pieces: {r['vocab']['source']}), {r['threads']} threads"]
    if r.get("mfu") is not None:
        lines.append(f"  MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s")
    if r.get("mfu_measured_peak") is not None:
        lines.append(f"  MFU {100 * r['mfu_measured_peak']:.1f}% of the measured matmul ceiling "
                     f"{r['measured_peak_tflops']:.3f} TFLOP/s")
    p = r["phases_s"]
    lines.append(f"  ours, median [min-max] of {p['step']['n']} steps: step {_ms(p['step'])} = forward "
                 f"{_ms(p['forward'])} + backward {_ms(p['backward'])} + optimizer {_ms(p['optimizer'])}; "
                 f"data wait {_ms(p['data_wait'])} (not in the step)")
    base = r.get("baseline")
    if base:
        b = base["phases_s"]
        lines.append(f"  {r['baseline_kind']} baseline ({r['baseline_label']}): {base['parameters'] / 1e6:.1f}M "
                     f"parameters, peak memory {base['peak_memory_bytes'] / 2 ** 30:.2f} GiB")
        lines.append(f"  {r['baseline_kind']}, median [min-max]: step {_ms(b['step'])} = forward {_ms(b['forward'])} "
                     f"+ backward {_ms(b['backward'])} + optimizer {_ms(b['optimizer'])}")
        s = r["speedup"]
        lines.append(f"  speed-up, ratio of medians ({r['baseline_kind']} / ours): step {s['step']:.2f}x "
                     f"(forward {s['forward']:.2f}x, backward {s['backward']:.2f}x, optimizer "
                     f"{s['optimizer']:.2f}x); interleaved {', '.join(r['order'][:4])}, ...")
    elif r.get("baseline_skipped"):
        lines.append(f"  speed-up: n/a (baseline skipped: {r['baseline_skipped']})")
    else:
        lines.append("  speed-up: n/a (--baseline none)")
    return lines
