"""The PNG plots of ``report.py``: throughput, MFU and speed-up against micro batch, model-state memory per rank
against world size. Which plots a set of results gives (``plot_names``) is known without matplotlib, so the
markdown can name them where matplotlib is absent; drawing them (``plots``) needs it (the ``bench`` extra)."""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List

from report_tables import speedup_of

THROUGHPUT_PLOTS = (("samples_per_s", "samples/s per rank", "throughput_vs_micro_batch.png"),
                    ("mfu_measured_peak", "MFU (vs measured matmul peak)", "mfu_vs_micro_batch.png"),
                    ("speedup_value", "speed-up over the baseline (x)", "speedup_vs_micro_batch.png"))
MEMORY_PLOT = "memory_per_rank.png"


def _series(results: Dict[str, List[Dict]]) -> Dict[tuple, List[Dict]]:
    """Throughput results grouped into lines: (device, model, precision, ranks, baseline label) -> results."""
    series = defaultdict(list)
    for r in results["throughput"]:
        speedup, against = speedup_of(r)
        series[(r["device"], r["model"], r["precision"], r["world_size"], against)].append(
            dict(r, speedup_value=speedup))
    return series


def plot_names(results: Dict[str, List[Dict]]) -> List[str]:
    """The file names ``plots`` draws for these results: a plot is drawn when some result has its value."""
    series = _series(results)
    names = [fname for key, _, fname in THROUGHPUT_PLOTS
             if any(r.get(key) is not None for rs in series.values() for r in rs)]
    return names + ([MEMORY_PLOT] if results["memory"] else [])


def plots(results: Dict[str, List[Dict]], out: str) -> List[str]:
    """Draws the plots into ``out``; none (and one line saying so) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    made = []
    series = _series(results)
    for key, ylabel, fname in THROUGHPUT_PLOTS:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        drawn = False
        for (device, model, precision, world, against), rs in sorted(series.items(), key=lambda kv: str(kv[0])):
            rs = sorted((r for r in rs if r.get(key) is not None), key=lambda r: r["micro_batch"])
            if not rs:
                continue
            short = os.path.splitext(os.path.basename(model))[0]
            vs = f" vs {against}" if key == "speedup_value" and against else ""
            ax.plot([r["micro_batch"] for r in rs], [r[key] for r in rs], marker="o",
                    label=f"{device} {short} {precision} x{world}{vs}")
            if key == "samples_per_s" and any(r.get("baseline") for r in rs):
                based = [r for r in rs if r.get("baseline")]
                ax.plot([r["micro_batch"] for r in based], [r["baseline"]["samples_per_s"] for r in based],
                        marker="x", linestyle="--", label=f"{device} {short} {against or 'baseline'}")
            drawn = True
        if drawn:
            ax.set_xlabel("micro batch")
            ax.set_ylabel(ylabel)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(out, fname), dpi=110)
            made.append(fname)
        plt.close(fig)
    if results["memory"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        lines = defaultdict(list)
        for r in results["memory"]:
            lines[(r.get("asked_zero_stage", r["zero_stage"]), r["offload"])].append(r)
        for (stage, offload), rs in sorted(lines.items()):
            rs.sort(key=lambda r: r["world_size"])
            measured = [sum(x["param_bytes"] + x["grad_bytes"] + x["optimizer_state_bytes"] + x["master_bytes"]
                            for x in r["per_rank"]) / len(r["per_rank"]) / 2 ** 20 for r in rs]
            theory = [sum(r["theory"].values()) / 2 ** 20 for r in rs]
            line, = ax.plot([r["world_size"] for r in rs], measured, marker="o",
                            label=f"ZeRO-{stage}{' offload' if offload else ''}")
            ax.plot([r["world_size"] for r in rs], theory, linestyle=":", color=line.get_color())
        ax.set_xlabel("ranks")
        ax.set_ylabel("model states per rank (MiB)")
        ax.set_xticks(sorted({r["world_size"] for r in results["memory"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="measured (dotted: theory)", title_fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, MEMORY_PLOT), dpi=110)
        plt.close(fig)
        made.append(MEMORY_PLOT)
    return made
