"""Does a bf16 run track the fp32 one? The same training (seed, data, schedule) in both precisions, loss by loss.

    python benchmarks/precision_curve.py --steps 200 --out DIR [--model tiny --micro_batch 8 --stage 2]

Runs ``python -m mvptr_ds.run`` twice (``--precision fp32``, then ``bf16``) into ``DIR/fp32`` and ``DIR/bf16``,
reads each run's ``metrics.jsonl`` (logged every step) and writes ``DIR/precision_curve.json``: both loss
curves and how far apart they are, per step and averaged over windows of ``--window`` steps (per-step losses of
two runs differ by more than their trend: dropout masks and data are the same, the rounding is not). Only the
comparison is reported, no speed: on a CPU without bf16 instructions bf16 is much slower (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

from throughput import environment


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--model", default="tiny")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2))
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def train(args: argparse.Namespace, precision: str) -> List[float]:
    out = os.path.join(args.out, precision)
    cmd = [sys.executable, "-m", "mvptr_ds.run", "--stage", str(args.stage), "--model", args.model,
           "--precision", precision, "--max_steps", str(args.steps), "--micro_batch", str(args.micro_batch),
           "--seed", str(args.seed), "--log_every", "1", "--resume", "none", "--wandb", "disabled",
           "--output_dir", out]
    subprocess.run(cmd, check=True)
    return losses(os.path.join(out, "metrics.jsonl"), args.steps)


def losses(path: str, steps: int) -> List[float]:
    by_step: Dict[int, float] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                by_step[int(row["step"])] = float(row["loss"])
    if sorted(by_step) != list(range(1, steps + 1)):
        raise RuntimeError(f"{path}: expected a loss for each of steps 1..{steps}")
    return [by_step[s] for s in range(1, steps + 1)]


def compare(fp32: List[float], bf16: List[float], window: int) -> Dict[str, float]:
    """Per-step and per-window gaps between the curves (absolute, and relative to the fp32 value)."""
    step_gap = [abs(a - b) for a, b in zip(fp32, bf16)]
    means = lambda xs: [statistics.fmean(xs[i:i + window]) for i in range(0, len(xs) - window + 1, window)]  # noqa: E731
    w32, w16 = means(fp32), means(bf16)
    window_rel = [abs(a - b) / abs(a) for a, b in zip(w32, w16)]
    return {"median_step_gap": statistics.median(step_gap), "max_step_gap": max(step_gap),
            "max_window_rel_gap": max(window_rel), "last_window_fp32": w32[-1], "last_window_bf16": w16[-1],
            "first_window_fp32": w32[0], "first_window_bf16": w16[0]}


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    curves = {p: train(args, p) for p in ("fp32", "bf16")}
    import torch
    result = {"kind": "precision_curve", "model": args.model, "stage": args.stage, "micro_batch": args.micro_batch,
              "steps": args.steps, "window": args.window, "seed": args.seed, "curves": curves,
              "comparison": compare(curves["fp32"], curves["bf16"], args.window),
              "command": " ".join(["precision_curve.py"] + (argv if argv is not None else sys.argv[1:])),
              **environment(torch.device("cpu"))}
    with open(os.path.join(args.out, "precision_curve.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["comparison"], indent=1))
    return result


if __name__ == "__main__":
    main()
