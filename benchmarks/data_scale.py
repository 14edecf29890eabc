"""The data path at scale: a store of 100,000 images in the real format, read the way training reads it.

    python benchmarks/data_scale.py --images 2000                      # quick check, about a minute
    python benchmarks/data_scale.py --images 100000 --workdir /tmp/scale100k \\
        --out benchmarks/results/runs/<run>/data_scale_100k.json      # ~12 GB of fp16 features

Builds, under ``--workdir`` (a temporary folder unless given; removed at the end unless ``--keep``), a data
directory in the formats :class:`~mvptr_ds.data.real_dataset.RealDataset` reads (with its text store,
``convert_text``), at the realistic base lengths
of ``benchmarks/realistic.py``: 10-50 regions per image (uniform), one caption per image of 10-25 word pieces
with 0-5 concepts, 3-18 detector tags. Words, concepts and tags come from the built-in scene world (its
captions lengthened by repeating their own words), region features are random (fp16 in the store, as
``convert_features`` writes by default). The store is written with ``write_store`` (the converter's own shard
writer; a base64 TSV of 100k images would be ~33 GB), and the converter's rate is measured on a TSV of
``--convert_images`` of the same images.

Measured (one JSON object, printed and written to ``--out``):

- ``build``: TSV -> store conversion (MB/s of TSV, regions/s), the direct store write (regions/s) and the text
  store (``convert_text``: every caption and tag row validated and encoded once; captions/s);
- ``open``: seconds to open the store and the data directory with its text store, and without it (every
  caption and tag row validated, every image looked up: the path without ``convert_text``), and the memory one
  rank keeps for the indices (RSS growth while opening, with the text store);
- ``reads``: random reads of one image's regions: fp16 as stored and converted to fp32 (regions/s);
- ``per_sample``: where one process spends the CPU time of a sample (dataset item: ids sliced from the text
  store, the regions a mapped view; a copy of its features as fp16 and as fp32, for comparison; collation,
  which copies the regions into the batch);
- ``loader``: the training loader (``ResumableLoader``, micro batch 64) with 0, 1 and 2 worker processes:
  samples/s and regions/s, and the CPU seconds per sample of the loading processes (the workers; the main
  process with 0 workers) and of the main process (receiving the batches), read from the kernel's counters,
  so that a machine shared with other jobs slows the rates but hardly the CPU cost;
- ``need``: what one GPU consumes (``--gpu_tflops`` sustained over ``--sample_gflop`` per sample) and the
  loader cores that takes (CPU seconds per sample of the workers x samples/s); the same at a true 50% MFU of
  an H200 (494.5 of its 989 dense bf16 TFLOP/s), and the share of the training process's core that receiving
  the batches takes.

Page cache: the store was just written, so reads come mostly from memory (as on a node whose RAM holds the
store); the JSON records the machine's memory and the store's size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvptr_ds.data.batching import Collator, ResumableLoader  # noqa: E402
from mvptr_ds.data.export import write_real_formats  # noqa: E402
from mvptr_ds.data.feature_store import FeatureStore, convert_features, write_store  # noqa: E402
from mvptr_ds.data.readers import FEATURE_DIM, encode_feature_row  # noqa: E402
from mvptr_ds.data.real_dataset import RealDataset, convert_text, load_tokenizer  # noqa: E402
from mvptr_ds.data.synthetic import SceneWorld, parse_synthetic_source  # noqa: E402

REGIONS = (10, 50)
CAPTION_WORDS = (10, 25)
CONCEPTS = (0, 5)
TAGS = (3, 18)
OBJECTIVES = ("mlm", "mcr", "vsc", "itm", "wpg")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def regions_of(k: int, seed: int) -> np.ndarray:
    """Image ``k``'s region features: float32 [10-50, 2054], reproducible from (seed, k)."""
    rng = np.random.default_rng([seed, 7, k])
    n = int(rng.integers(REGIONS[0], REGIONS[1] + 1))
    return rng.random((n, FEATURE_DIM), dtype=np.float32) * 8.0


def write_text_files(world: SceneWorld, out: str, images: int, seed: int) -> None:
    """captions.jsonl, predictions.tsv for ``images`` images (ids "0".."N-1") from the world's templates."""
    rng = np.random.default_rng([seed, 3])
    with open(os.path.join(out, "captions.jsonl"), "w", encoding="utf-8") as cf, \
            open(os.path.join(out, "predictions.tsv"), "w", encoding="utf-8") as pf:
        for k in range(images):
            cap = world.captions[k % len(world.captions)]
            words = cap.text.split()
            n = int(rng.integers(CAPTION_WORDS[0], CAPTION_WORDS[1] + 1))
            text = " ".join(words[i % len(words)] for i in range(n))
            phrases = [list(t) for t in cap.tuples[:int(rng.integers(CONCEPTS[0], CONCEPTS[1] + 1))]]
            cf.write(json.dumps({"image_id": str(k), "caption": text, "phrases": phrases}) + "\n")
            im = world.images[k % len(world.images)]
            tags = [im.tags[i % len(im.tags)] for i in range(int(rng.integers(TAGS[0], TAGS[1] + 1)))]
            objects = [{"class": t.name, "rect": [float(x) for x in im.boxes[t.region]], "conf": t.conf}
                       for t in tags]
            pf.write(f"{k}\t{json.dumps({'objects': objects, 'image_h': im.height, 'image_w': im.width})}\n")


def build(args, work: str) -> dict:
    world = SceneWorld(parse_synthetic_source(f"synthetic:seed={args.seed},images=64"))
    data = os.path.join(work, "data")
    write_real_formats(world, data)                       # tokenizer/ and id2phrase.json of the world
    for name in ("features.tsv", "features.lineidx", "imageid2idx.json"):
        os.remove(os.path.join(data, name))               # the world's own 64 images: replaced below
    write_text_files(world, data, args.images, args.seed)
    load_tokenizer(os.path.join(data, "tokenizer"))          # transformers imported before the clock starts
    t0 = time.perf_counter()
    text = convert_text(data, progress=False)                 # captions and tags -> DATA/text, validated once
    text_s = time.perf_counter() - t0

    conv = min(args.convert_images, args.images)
    tsv = os.path.join(work, "convert", "features.tsv")
    os.makedirs(os.path.dirname(tsv))
    regions = 0
    with open(tsv, "wb") as f:
        for k in range(conv):
            feats = regions_of(k, args.seed)
            f.write(encode_feature_row(str(k), feats))
            regions += feats.shape[0]
    t0 = time.perf_counter()
    convert_features(tsv, os.path.join(work, "convert", "store"), progress=False)
    conv_s = time.perf_counter() - t0
    tsv_mb = os.path.getsize(tsv) / 1e6
    shutil.rmtree(os.path.join(work, "convert"))

    t0 = time.perf_counter()
    summary = write_store(((str(k), regions_of(k, args.seed)) for k in range(args.images)),
                          os.path.join(data, "features"), source="generated")
    write_s = time.perf_counter() - t0
    store_bytes = sum(e.stat().st_size for e in os.scandir(os.path.join(data, "features")))
    return {"data": data, "regions": summary["num_regions"], "store_gb": round(store_bytes / 1e9, 2),
            "build": {"convert_images": conv, "convert_regions": regions, "convert_tsv_mb": round(tsv_mb, 1),
                      "convert_s": round(conv_s, 2), "convert_mb_per_s": round(tsv_mb / conv_s, 1),
                      "convert_regions_per_s": round(regions / conv_s),
                      "write_store_s": round(write_s, 1),
                      "write_store_regions_per_s": round(summary["num_regions"] / write_s),
                      "text_store_s": round(text_s, 2), "text_store_captions_per_s": round(text["captions"] / text_s)}}


def measure_open(data: str) -> tuple:
    before = rss_bytes()
    t0 = time.perf_counter()
    store = FeatureStore(os.path.join(data, "features"))
    len(store), "0" in store                            # maps the index
    store_s = time.perf_counter() - t0
    index_bytes = sum(os.path.getsize(os.path.join(data, "features", n)) for n in ("index_ids.npy", "index_loc.npy"))
    t0 = time.perf_counter()
    dataset = RealDataset(data, os.path.join(data, "tokenizer"))
    open_s = time.perf_counter() - t0
    rss = rss_bytes() - before
    hidden = os.path.join(os.path.dirname(data), "text_hidden")
    os.rename(os.path.join(data, "text"), hidden)               # the same directory without its text store
    try:
        t0 = time.perf_counter()
        RealDataset(data, os.path.join(data, "tokenizer"))
        files_s = time.perf_counter() - t0
    finally:
        os.rename(hidden, os.path.join(data, "text"))
    return store, dataset, {"store_open_s": round(store_s, 4), "store_index_mb": round(index_bytes / 1e6, 2),
                            "dataset_open_s": round(open_s, 3), "dataset_open_without_text_store_s": round(files_s, 2),
                            "rss_growth_mb": round(rss / 1e6, 1)}


def rate(fn, items) -> tuple:
    """(sum of fn over items, CPU seconds of this process it took)"""
    t0 = time.process_time()
    total = sum(fn(x) for x in items)
    return total, time.process_time() - t0


def measure_reads(store: FeatureStore, images: int, reads: int, seed: int) -> dict:
    ids = [str(k) for k in np.random.default_rng([seed, 5]).integers(0, images, reads)]
    out = {}
    for name, fn in (("fp16_raw", store.raw), ("fp32", store.__getitem__)):
        rate(lambda i: fn(i).shape[0], ids[:50])
        regions, dt = rate(lambda i: fn(i).shape[0], ids)
        out[name] = {"regions_per_s": round(regions / dt), "images_per_s": round(len(ids) / dt)}
    return out


def measure_per_sample(dataset, collator: Collator, samples: int, seed: int) -> dict:
    idx = np.random.default_rng([seed, 9]).integers(0, len(dataset), samples).tolist()
    feats = dataset.features
    keys = [dataset.caption_image(i) for i in idx]
    _, item_s = rate(lambda i: dataset[i].regions.shape[0], idx)
    _, fp16_s = rate(lambda k: feats.raw(k).shape[0], keys)
    _, fp32_s = rate(lambda k: feats[k].shape[0], keys)
    examples = [dataset[i] for i in idx]
    batches = [examples[i:i + 64] for i in range(0, len(examples) - 63, 64)]
    _, collate_s = rate(lambda b: collator(b).size, batches)
    per = 1e6 / samples
    return {"samples": samples, "item_us": round(item_s * per, 1), "features_fp16_us": round(fp16_s * per, 1),
            "features_fp32_us": round(fp32_s * per, 1),
            "collate_us": round(collate_s * 1e6 / (64 * len(batches)), 1),
            "region_dtype": str(examples[0].regions.dtype)}


def cpu_seconds(pids) -> float:
    """User + system CPU seconds of the processes ``pids`` so far."""
    import psutil

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def measure_loader(dataset, collator: Collator, workers: int, batches: int, micro_batch: int, seed: int) -> dict:
    """Samples/s of the training loader, and the CPU seconds its workers (and the main process) spend per
    sample: the cores one sample/s needs, whatever else runs on the machine."""
    import psutil

    loader = ResumableLoader(dataset, collator, micro_batch=micro_batch, rank=0, world_size=1, seed=seed,
                             num_workers=workers, prefetch_factor=4)
    it = iter(loader)
    for _ in range(max(2, workers * 4)):                  # worker start-up and the first prefetch
        next(it)
    pids = [c.pid for c in psutil.Process().children()] if workers else []
    t0, main0, work0 = time.perf_counter(), time.process_time(), cpu_seconds(pids)
    regions = 0
    for _ in range(batches):
        regions += int(next(it).region_mask.sum())
    dt = time.perf_counter() - t0
    main_cpu, work_cpu = time.process_time() - main0, cpu_seconds(pids) - work0
    del it
    samples = batches * micro_batch
    loader_cpu = work_cpu if workers else main_cpu
    return {"workers": workers, "batches": batches, "samples_per_s": round(samples / dt, 1),
            "regions_per_s": round(regions / dt),
            "loader_cpu_ms_per_sample": round(1e3 * loader_cpu / samples, 3),
            "main_cpu_ms_per_sample": round(1e3 * main_cpu / samples, 3) if workers else None,
            "samples_per_cpu_s": round(samples / loader_cpu, 1), "regions_per_cpu_s": round(regions / loader_cpu)}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def machine(commit: str) -> dict:
    """The machine, its load now, the software and the commit the benchmark started at."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    import torch
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_gb": round(mem / 1e9, 1),
            "load_average_1min": round(os.getloadavg()[0], 2), "host": socket.gethostname(),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "commit": commit}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--convert_images", type=int, default=2000, help="images in the TSV converted for the rate")
    p.add_argument("--reads", type=int, default=5000)
    p.add_argument("--samples", type=int, default=640, help="samples timed one by one (per_sample)")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--batches", type=int, default=40, help="batches timed per loader setting")
    p.add_argument("--micro_batch", type=int, default=64)
    p.add_argument("--gpu_tflops", type=float, default=395.0,
                   help="model TFLOP/s one GPU sustains (issue 18's figure for an H200 at 50%% MFU)")
    p.add_argument("--sample_gflop", type=float, default=44.0, help="model FLOPs of one stage-2 sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep --workdir")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    commit = git_commit()
    work = args.workdir or tempfile.mkdtemp(prefix="mvptr_data_scale_")
    os.makedirs(work, exist_ok=True)
    result = {"bench": "data_scale", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "images": args.images, "micro_batch": args.micro_batch,
              "command": "python benchmarks/data_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "lengths": {"regions": REGIONS, "caption_words": CAPTION_WORDS, "concepts": CONCEPTS, "tags": TAGS},
              "load_average_1min_start": round(os.getloadavg()[0], 2)}
    try:
        say(f"building {args.images} images under {work}")
        built = build(args, work)
        data = built.pop("data")
        result.update(built)
        say(f"built: {built}")
        store, dataset, result["open"] = measure_open(data)
        say(f"opened: {result['open']}")
        result["reads"] = measure_reads(store, args.images, args.reads, args.seed)
        collator = Collator(dataset.vocab_info, OBJECTIVES)
        result["per_sample"] = measure_per_sample(dataset, collator, args.samples, args.seed)
        say(f"reads: {result['reads']}; per sample: {result['per_sample']}")
        result["loader"] = []
        for w in args.workers.split(","):
            result["loader"].append(measure_loader(dataset, collator, int(w), args.batches, args.micro_batch,
                                                   args.seed))
            say(f"loader: {result['loader'][-1]}")
        result["machine"] = machine(commit)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["need"] = need(result, args)
    text = json.dumps(result)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    return result


H200_DENSE_BF16_TFLOPS = 989.0        # the SXM H200's dense bf16 peak: a true 50% MFU is half of it


def need(result: dict, args) -> dict:
    """Samples and regions one GPU consumes, and the loader cores that takes: CPU seconds per sample of the
    loader's workers (the best worker setting) times samples/s; also at a true 50% MFU of an H200, and the
    training process's own CPU for receiving the batches (a share of its core, not a loader core)."""
    samples = args.gpu_tflops * 1e12 / (args.sample_gflop * 1e9)
    regions = samples * result["regions"] / args.images
    runs = [r for r in result["loader"] if r["workers"] > 0] or result["loader"]
    best = min(runs, key=lambda r: r["loader_cpu_ms_per_sample"])
    half = H200_DENSE_BF16_TFLOPS / 2 * 1e12 / (args.sample_gflop * 1e9)
    return {"gpu_tflops": args.gpu_tflops, "sample_gflop": args.sample_gflop,
            "samples_per_s": round(samples), "regions_per_s": round(regions),
            "loader_cpu_ms_per_sample": best["loader_cpu_ms_per_sample"],
            "cores": round(samples * best["loader_cpu_ms_per_sample"] / 1e3, 1),
            "main_cpu_ms_per_sample": best["main_cpu_ms_per_sample"],
            "main_core_share": None if best["main_cpu_ms_per_sample"] is None else
            round(samples * best["main_cpu_ms_per_sample"] / 1e3, 2),
            "true_half_mfu_tflops": H200_DENSE_BF16_TFLOPS / 2, "true_half_mfu_samples_per_s": round(half),
            "true_half_mfu_cores": round(half * best["loader_cpu_ms_per_sample"] / 1e3, 1)}


if __name__ == "__main__":
    main()
