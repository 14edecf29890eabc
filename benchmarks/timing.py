"""Per-step times of two sides measured against each other: steps interleaved (baseline, ours, baseline, ours,
...) so both see the same machine load, each phase summarised by its median and spread, and the speed-up as the
ratio of medians."""
from __future__ import annotations

from typing import Dict, List, Sequence

PHASES = ("forward", "backward", "optimizer", "step")  # step = forward + backward + optimizer


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ascending ``sorted_values``, linear between order statistics (numpy's default)."""
    n = len(sorted_values)
    if not n:
        raise ValueError("quantile of no values")
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, min and max of ``values`` (seconds); ``n`` the number of values."""
    xs = sorted(float(v) for v in values)
    return {"median": quantile(xs, 0.5), "q1": quantile(xs, 0.25), "q3": quantile(xs, 0.75), "min": xs[0],
            "max": xs[-1], "n": len(xs)}


def phase_stats(records: List[Dict[str, float]], phases: Sequence[str] = PHASES) -> Dict[str, Dict[str, float]]:
    """``{phase: spread of its per-step seconds}`` for the phases present in every record."""
    return {k: spread([r[k] for r in records]) for k in phases if records and all(k in r for r in records)}


def median_ratios(baseline: Dict[str, Dict[str, float]], ours: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Baseline median / our median per phase present in both (above 1: we are faster)."""
    return {k: baseline[k]["median"] / ours[k]["median"] for k in PHASES
            if k in baseline and k in ours and ours[k]["median"] > 0}



def interleave(ours, baseline, warmup: int, steps: int, on_timed_start=None):
    """Per step: ``ours.prepare()`` draws the batch (its sample indices), ``baseline.step(indices)``, then
    ``ours.step(indices)``: A, O, A, O, ... Returns (our timed records, the baseline's, the order of calls as
    ``"<kind>:<step>"`` with warm-up steps ``w0``, ``w1``, ..)."""
    ours_records, base_records, order = [], [], []
    for k in range(warmup + steps):
        if k == warmup and on_timed_start is not None:
            on_timed_start()
        timed = k >= warmup
        label = str(k - warmup) if timed else f"w{k}"
        ids = ours.prepare()
        if baseline is not None:
            record = baseline.step(ids)
            order.append(f"{baseline.kind}:{label}")
            if timed:
                base_records.append(record)
        record = ours.step(ids)
        order.append(f"ours:{label}")
        if timed:
            ours_records.append(record)
    return ours_records, base_records, order
