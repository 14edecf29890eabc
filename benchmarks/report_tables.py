"""The markdown tables of ``report.py``: one row per throughput result (and its baseline) or memory result, and
the data-path tables of a ``data_scale.py`` result, each with the command, machine, software versions and date
it was measured with."""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

THROUGHPUT_HEADER = (
    "| run | device | model | stage | precision | ZeRO | micro batch | ranks | parameters | samples/s | tokens/s | "
    "TFLOP/s | MFU | MFU (measured peak) | speed-up (vs) | peak memory | data / fwd / bwd / opt ms | "
    "step ms, median [min-max] |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
BASELINE_HEADER = (
    "| run | baseline | parameters | precision | samples/s | step ms, median [min-max] | fwd / bwd / opt ms, medians | "
    "speed-up, ratio of medians (step; fwd / bwd / opt) | peak memory |\n|---|---|---|---|---|---|---|---|---|\n")
MEMORY_HEADER = (
    "| ZeRO | offload | ranks | params/rank | grads/rank | optimizer state/rank | fp32 master/rank | "
    "theory params / grads / optim+master | peak RSS/rank |\n|---|---|---|---|---|---|---|---|---|\n")

def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _gib(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _params(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f}M"


def _median_ms(phases: Optional[Dict], key: str = "step") -> str:
    s = (phases or {}).get(key)
    return "n/a" if not s else f"{1e3 * s['median']:.1f} [{1e3 * s['min']:.1f}-{1e3 * s['max']:.1f}]"


def speedup_of(r: Dict):
    """(speed-up, label of what it is against) of a result; (None, None) when it has none."""
    kind = r.get("baseline_kind")
    if kind == "authors":
        return r.get("speedup_vs_authors"), "authors' code"
    if kind == "eager":
        return r.get("speedup_vs_eager_recreation"), "eager re-creation"
    if kind is None and r.get("speedup_vs_authors") is not None:  # written before issue 13
        return r["speedup_vs_authors"], "re-creation (old, means)"
    return None, None


def throughput_row(r: Dict) -> str:
    b = r["breakdown_s"]
    speedup, against = speedup_of(r)
    model = os.path.splitext(os.path.basename(r["model"]))[0]
    cells = [r["name"], r["device"], model, r["stage"], r["precision"], r["zero_stage"], r["micro_batch"],
             r["world_size"], _params(r.get("parameters")), f"{r['samples_per_s']:.2f}", f"{r['tokens_per_s']:.0f}",
             f"{r['tflops']:.4f}", _pct(r.get("mfu")), _pct(r.get("mfu_measured_peak")),
             "n/a" if speedup is None else f"{speedup:.2f}x ({against})", _gib(r["peak_memory_bytes"]),
             " / ".join(f"{1e3 * b[k]:.1f}" for k in ("data_wait", "forward", "backward", "optimizer")),
             _median_ms(r.get("phases_s"))]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def baseline_row(r: Dict) -> str:
    """The baseline of result ``r`` (which has one): what it is, its medians and the ratios."""
    base = r["baseline"]
    speedup, against = speedup_of(r)
    phases = base.get("phases_s")
    if phases:
        fbo = " / ".join(f"{1e3 * phases[k]['median']:.1f}" for k in ("forward", "backward", "optimizer"))
    else:
        fbo = " / ".join(f"{1e3 * base['breakdown_s'][k]:.1f}" for k in ("forward", "backward", "optimizer")
                         if k in base.get("breakdown_s", {})) + " (means)"
    ratios = r.get("speedup") or {}
    ratio = "n/a" if speedup is None else f"{speedup:.2f}x"
    if ratios:
        ratio += " (" + " / ".join(f"{ratios[k]:.2f}x" for k in ("forward", "backward", "optimizer")
                                   if k in ratios) + ")"
    cells = [r["name"], against or "?", _params(base.get("parameters")), base.get("precision", "?"),
             f"{base['samples_per_s']:.2f}", _median_ms(phases), fbo, ratio, _gib(base.get("peak_memory_bytes"))]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def template_stage(r) -> int:
    """The ZeRO stage the run's template asked for (memory.py's --zero; older results record only the stage run)."""
    return r.get("asked_zero_stage", r["zero_stage"])


def template_stage_label(r) -> str:
    """The asked stage, with the stage actually run when they differ (one fp32 process runs stage 0)."""
    asked = template_stage(r)
    return str(asked) if asked == r["zero_stage"] else f"{asked} (ran {r['zero_stage']})"


def memory_row(r: Dict) -> str:
    ranks = r["per_rank"]

    def mean(key):
        vals = [x[key] for x in ranks if x.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    t = r["theory"]
    states = t["optimizer_state_bytes"] + t["master_bytes"]
    theory = f"{_gib(t['param_bytes'])} / {_gib(t['grad_bytes'])} / {_gib(states)}"
    cells = [template_stage_label(r), "cpu" if r["offload"] else "-", r["world_size"], _gib(mean("param_bytes")),
             _gib(mean("grad_bytes")), _gib(mean("optimizer_state_bytes")), _gib(mean("master_bytes")), theory,
             _gib(mean("rss_peak_bytes"))]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def provenance(r: Dict) -> str:
    machine = r.get("gpu") or r.get("cpu", "?")
    load = r.get("load_average_1min")
    shared = "" if load is None else f", {r.get('cpu_count', '?')} cores with 1-min load average {load:.1f}"
    command = re.sub(r"--local_rank=\d+ ", "", r["command"])
    vocab = r.get("vocab")
    vocab = f", vocabulary {vocab['vocab_size']} rows / {vocab['only_word_size']} word pieces ({vocab['source']})" \
        if vocab else ""
    return (f"`{command}` on {machine} ({r.get('cpu_threads', '?')} threads per rank{shared}{vocab}), torch "
            f"{r['torch']}, deepspeed {r['deepspeed']}, Python {r['python']}, {r['date']}")


def tables(results: Dict[str, List[Dict]], images: List[str]) -> str:
    """The throughput, baseline and memory tables of ``results``, each with its provenance, then ``images``
    (paths of the plots, as the markdown links them)."""
    lines = []
    tp = sorted(results["throughput"], key=lambda r: (r["device"], r["model"], r["world_size"], r["micro_batch"]))
    if tp:
        lines += ["### Training throughput per rank", "", THROUGHPUT_HEADER.rstrip("\n")]
        lines += [throughput_row(r) for r in tp]
        based = [r for r in tp if r.get("baseline")]
        if based:
            lines += ["", "Baselines of the same runs. *authors' code*: the authors' released "
                      "`BiBertImgForPreTraining` with torch AdamW in a separate process (`authors_driver.py`), "
                      "fixed padding 40 + 20 + 50, same sizes, sample indices and thread count, its steps "
                      "interleaved with ours; speed-up = its median step / ours (forward + backward + "
                      "optimizer; data wait excluded on both sides). *eager re-creation*: this project's "
                      "re-creation of their computation (fixed padding, eager attention, per-pair WPG loop) on our "
                      "engine, in-process; not their code. *re-creation (old, means)*: results written before "
                      "the two were told apart, whose \"authors\" baseline was that re-creation, run after ours, "
                      "compared by mean samples/s.", "", BASELINE_HEADER.rstrip("\n")]
            lines += [baseline_row(r) for r in based]
        lines += ["", "Measured with:", ""] + [f"- {r['name']}: {provenance(r)}" for r in tp] + [""]
    mem = sorted(results["memory"], key=lambda r: (template_stage(r), r["offload"], r["world_size"]))
    if mem:
        lines += ["### Model-state memory per rank vs world size", "", MEMORY_HEADER.rstrip("\n")]
        lines += [memory_row(r) for r in mem]
        lines += ["", "Measured with:", ""]
        lines += [f"- ZeRO-{template_stage_label(r)}{' offload' if r['offload'] else ''} x{r['world_size']}: "
                  f"{provenance(r)}"
                  for r in mem] + [""]
    for r in sorted(results.get("data_scale", []), key=lambda r: r["images"]):
        lines += data_scale_tables(r)
    for img in images:
        lines += [f"![{os.path.splitext(os.path.basename(img))[0]}]({img})", ""]
    return "\n".join(lines)


def _n(x) -> str:
    return f"{x:,.0f}"


def data_scale_tables(r: Dict) -> List[str]:
    """The tables of one ``data_scale.py`` result: building and opening the store, reads, the training loader
    by worker count, and the loader cores one GPU needs."""
    b, o, rd, ps, need, m = r["build"], r["open"], r["reads"], r["per_sample"], r["need"], r["machine"]
    lines = [f"### Data path at {_n(r['images'])} images ({_n(r['regions'])} regions, "
             f"{r['store_gb']:.1f} GB store)", "",
             "| step | figure |", "|---|---:|",
             f"| TSV -> store, `convert_features` ({_n(b['convert_images'])} images, {b['convert_tsv_mb']:,.0f} MB "
             f"of base64 TSV) | {b['convert_mb_per_s']:.1f} MB/s, {_n(b['convert_regions_per_s'])} regions/s |",
             f"| store written directly, `write_store` (all images) | {_n(b['write_store_regions_per_s'])} regions/s "
             f"({b['write_store_s']:,.0f} s) |"]
    if "text_store_s" in b:       # results from before the text store have no such rows
        lines.append(f"| captions and tags -> text store, `convert_text` (every row validated and encoded once) | "
                     f"{_n(b['text_store_captions_per_s'])} captions/s ({b['text_store_s']:,.0f} s) |")
    lines += [f"| open the store (index memory-mapped: {o['store_index_mb']:.1f} MB) | "
              f"{1e3 * o['store_open_s']:.1f} ms |"]
    if "dataset_open_without_text_store_s" in o:
        lines += [f"| open the data directory with its text store (arrays mapped and checked, every image's "
                  f"features located) | {o['dataset_open_s']:.2f} s |",
                  f"| the same without the text store (every caption and tag row read and validated) | "
                  f"{o['dataset_open_without_text_store_s']:.1f} s |"]
    else:
        lines.append(f"| open the data directory (every caption and tag row validated, every image looked up) | "
                     f"{o['dataset_open_s']:.1f} s |")
    text, copy = ("ids sliced from the text store, regions a mapped view", "; the regions copied into the batch") \
        if "text_store_s" in b else ("text, tags, regions as stored", "")
    lines += [
        f"| memory a rank keeps for the indices (RSS growth while opening) | {o['rss_growth_mb']:.0f} MB |",
        f"| random reads of one image's regions, fp16 as stored (one process) | "
        f"{_n(rd['fp16_raw']['regions_per_s'])} regions/s |",
        f"| the same, converted to fp32 on the host (before: what the loader did) | "
        f"{_n(rd['fp32']['regions_per_s'])} regions/s |",
        f"| CPU per sample: dataset item ({text}) | {ps['item_us']:.0f} us |",
        f"| a copy of its regions, fp16 as stored / fp32 on the host | {ps['features_fp16_us']:.0f} / "
        f"{ps['features_fp32_us']:.0f} us |",
        f"| CPU per sample: collation (corruption, padding, WPG draws{copy}) | {ps['collate_us']:.0f} us |",
        "", f"Training loader (`ResumableLoader`, micro batch {r['micro_batch']}; CPU seconds from the kernel's "
        "counters of the loading processes):", "",
        "| workers | samples/s | regions/s | loader CPU ms per sample | main process CPU ms per sample | "
        "samples per loader core-second |", "|---:|---:|---:|---:|---:|---:|"]
    for w in r["loader"]:
        main = "-" if w["main_cpu_ms_per_sample"] is None else f"{w['main_cpu_ms_per_sample']:.2f}"
        lines.append(f"| {w['workers']} | {w['samples_per_s']:,.0f} | {_n(w['regions_per_s'])} | "
                     f"{w['loader_cpu_ms_per_sample']:.2f} | {main} | {w['samples_per_cpu_s']:,.0f} |")
    lines += ["", f"One GPU at {need['gpu_tflops']:.0f} TFLOP/s over {need['sample_gflop']:.0f} GFLOP per sample "
              f"consumes {_n(need['samples_per_s'])} samples/s ({_n(need['regions_per_s'])} regions/s): at "
              f"{need['loader_cpu_ms_per_sample']:.2f} ms of loader CPU per sample that is **{need['cores']:.1f} "
              f"cores**" + (f"; at a true 50% MFU of an H200 ({need['true_half_mfu_tflops']:.1f} TFLOP/s, "
                            f"{_n(need['true_half_mfu_samples_per_s'])} samples/s) {need['true_half_mfu_cores']:.1f} "
                            f"cores" if "true_half_mfu_cores" in need else "")
              + (f". Receiving the batches takes {need['main_core_share']:.2f} of the training process's core"
                 if need.get("main_core_share") is not None else "") + ".", "",
              f"Measured with: `{r['command']}` on {m['cpu']} ({m['cpu_count']} cores, {m['memory_gb']:.0f} GB, "
              f"1-min load average {r.get('load_average_1min_start', float('nan')):.1f} at the start and "
              f"{m['load_average_1min']:.1f} at the end), Python {m['python']}, numpy {m['numpy']}, torch "
              f"{m['torch']}, commit {m['commit'] or '?'}, {r['date']}", ""]
    return lines
