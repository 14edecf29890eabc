"""Training throughput per rank: samples/s, real tokens/s, model TFLOP/s, MFU, step-time breakdown, peak memory.

    python benchmarks/throughput.py --device cpu --model tiny --steps 5           # also: python -m mvptr_ds.run bench
    python benchmarks/throughput.py --device cuda --model base --stage 2 --precision bf16 --micro_batch 64 \\
        --baseline authors --out DIR
    deepspeed --num_gpus 2 benchmarks/throughput.py --device cpu --model tiny      # per-rank figures, 2 ranks

It runs ``--warmup`` then ``--steps`` timed optimizer steps of the real training step (``pipeline.build``:
data, model, objectives; ``trainer.build_engine``: AdamW + DeepSpeed engine; then ``engine(batch)``,
``engine.backward``, ``engine.step`` as in ``trainer.py``) and times four phases per step, with a device
synchronisation at each boundary: data wait (next batch from the loader, to the device), forward,
backward (gradient reduction of ZeRO >= 2 happens inside it, in DeepSpeed's hooks), optimizer (ZeRO 1/2
all-gather the updated parameters inside it). ``--stage`` is the MVPTR pre-training stage (1: MCR on the
uni-modal encoders, 2: all five objectives), as for ``mvptr_ds.run train``; the ZeRO stage comes from
``--ds_config``.

Data: the built-in scene world re-cut to realistic lengths (``realistic.py``: captions of 10-25 word pieces,
0-5 concepts, 10-50 regions, 3-18 tag pieces) unless ``--data`` names another source.

FLOPs: ``flop_count.py`` (the work required, unpadded; documented there). TFLOP/s = required FLOPs of the
timed steps / their time, per rank. MFU = that / the peak: ``--peak_tflops``, else the datasheet figure of a
known GPU (``DATASHEET_TFLOPS``), and with ``--measure_peak`` also against a matmul ceiling measured here.

``--baseline authors`` then runs the same model, weights, data and steps computed the authors' way
(``authors_baseline.py``) in the same process and reports ``speedup_vs_authors`` = samples/s ratio.
One JSON per run goes to ``--out`` (plus a line in ``results.jsonl`` and ``table.md`` there).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

# Dense peak TFLOP/s from the vendors' datasheets (no sparsity), by (name fragment, precision).
DATASHEET_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="tiny", help="preset (tiny, base) or a JSON file of ModelConfig fields")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2), help="MVPTR pre-training stage")
    p.add_argument("--precision", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--micro_batch", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--ds_config", default="ds_configs/zero2.json", help="DeepSpeed template (ZeRO stage, offload)")
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument("--data", default="realistic", help="'realistic' (default) or any --data source of train")
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--baseline", choices=("none", "authors"), default=None,
                   help="authors: also run the authors-style computation and report the speed-up "
                        "(default: authors on CPU, none on CUDA, where a base-size baseline takes minutes)")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak dense TFLOP/s per device for MFU")
    p.add_argument("--measure_peak", action="store_true", help="also measure a matmul ceiling for MFU")
    p.add_argument("--out", default="runs/bench", help="directory for the JSON result, results.jsonl and table.md")
    p.add_argument("--tag", default="", help="label added to the result's file name")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per rank (default: 1 on CPU, so figures are per core and robust to a shared "
                        "machine; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--wandb", choices=("disabled", "offline", "online"), default="disabled")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.micro_batch = args.micro_batch or (64 if cuda else 8)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.baseline = args.baseline or ("none" if cuda else "authors")
    if args.steps < 1 or args.micro_batch < 1 or args.warmup < 0:
        p.error("--steps and --micro_batch must be >= 1, --warmup >= 0")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def run_config(args: argparse.Namespace):
    """The RunConfig of the benchmarked run (the same typed config ``mvptr_ds.run train`` builds)."""
    from mvptr_ds.config import DataConfig, RunConfig, TrainConfig, model_config_from

    model = dataclasses.replace(model_config_from(args.model), kernels=args.kernels,
                                activation_checkpointing=args.activation_checkpointing)
    source = "synthetic:images=512,held_out=0,regions=10-50" if args.data == "realistic" else args.data
    steps = args.warmup + args.steps
    train = TrainConfig(stage=args.stage, ds_config=resolve(args.ds_config), max_steps=steps, warmup_steps=1,
                        micro_batch=args.micro_batch, precision=args.precision, seed=args.seed, wandb="disabled")
    return RunConfig(model=model, data=DataConfig(source=source), train=train).validate()


def resolve(path: str) -> str:
    if os.path.exists(path) or os.path.isabs(path):
        return path
    return str(HERE.parent / path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory(device: torch.device) -> Dict[str, object]:
    """CUDA: max_memory_allocated since the last reset; CPU: peak resident set size of this process."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "cuda_max_allocated"}
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        return {"peak_memory_bytes": hwm, "peak_memory_kind": "cpu_peak_rss"}
    except (OSError, StopIteration):
        import resource
        return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_memory_kind": "cpu_max_rss_lifetime"}


def measure_matmul_peak(device: torch.device, precision: str, seconds: float = 2.0, min_trials: int = 8) -> float:
    """Best dense matmul TFLOP/s over square products (8192 on CUDA, 1024 on CPU): at least ``min_trials``
    timed products and as many as fit in ``seconds``. The best, not the mean: on a shared machine a trial
    during which the process was descheduled says nothing about the ceiling."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = DTYPES[precision] if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, trials, deadline = 0.0, 0, time.perf_counter() + seconds
    a @ b
    while trials < min_trials or time.perf_counter() < deadline:
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e12)
        trials += 1
    return best


def datasheet_peak(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v.get(precision) for k, v in DATASHEET_TFLOPS.items() if k in name), None)


def run_phase(cfg, info, args, authors: bool) -> Dict[str, object]:
    """Build, warm up and time one configuration; returns this rank's averaged figures (see module doc)."""
    from authors_baseline import AuthorsStyleModule, authors_config, fixed_lengths, pad_fixed
    from flop_count import FlopCounter, param_count
    from realistic import realistic_loader

    from mvptr_ds import pipeline
    from mvptr_ds.training import distributed
    from mvptr_ds.training.ds_config import build_ds_config, zero_stage
    from mvptr_ds.training.trainer import build_engine

    if authors:
        cfg = authors_config(cfg, info.device)
    torch.manual_seed(cfg.train.seed)  # the same initial weights in both phases
    parts = pipeline.build(cfg, info)
    cfg = parts.config
    module = AuthorsStyleModule.wrap(parts.module) if authors else parts.module
    loader = realistic_loader(parts, cfg, info) if args.data == "realistic" else parts.loader
    ds_cfg = build_ds_config(cfg.train.ds_config, cfg.train, info.world_size)
    counter = FlopCounter(cfg.model).attach(module)
    engine, _ = build_engine(module, cfg.train, ds_cfg, info.device)
    torch.manual_seed(cfg.train.seed + 1000 + info.rank)
    dtype = DTYPES[cfg.train.precision]
    lengths = fixed_lengths(cfg) if authors else None
    batches = iter(loader)
    totals = {k: 0.0 for k in ("data_wait_s", "forward_s", "backward_s", "optimizer_s", "samples", "tokens",
                               "flops", "executed_flops", "padded_positions")}
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(info.device)
            reset_peak_memory(info.device)
            distributed.barrier()
        t0 = time.perf_counter()
        batch = next(batches)
        if lengths is not None:
            batch = pad_fixed(batch, *lengths)
        batch = batch.to(info.device, dtype=dtype)
        sync(info.device)
        t1 = time.perf_counter()
        out = engine(batch)
        sync(info.device)
        t2 = time.perf_counter()
        engine.backward(out.loss)
        sync(info.device)
        t3 = time.perf_counter()
        engine.step()
        sync(info.device)
        t4 = time.perf_counter()
        flops = counter.count(batch)
        if step < args.warmup:
            continue
        for key, value in (("data_wait_s", t1 - t0), ("forward_s", t2 - t1), ("backward_s", t3 - t2),
                           ("optimizer_s", t4 - t3), ("samples", batch.size), ("tokens", batch.num_real_tokens()),
                           ("flops", flops.train), ("executed_flops", 3 * flops.executed_forward),
                           ("padded_positions", batch.text_mask.numel() + batch.tag_mask.numel()
                            + batch.region_mask.numel())):
            totals[key] += value
    result = {
        "kernels": cfg.model.kernels, "precision": cfg.train.precision, "zero_stage": zero_stage(ds_cfg),
        "parameters": param_count(module), "loss_last": float(out.loss.detach().float()),
        **peak_memory(info.device),
    }
    counter.detach()
    del engine, parts, module, batches, out
    gc.collect()
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    reduced = distributed.mean_over_ranks({k: torch.tensor(v) for k, v in totals.items()}, info.device)
    peak = distributed.mean_over_ranks({"m": torch.tensor(float(result["peak_memory_bytes"]))}, info.device)
    step_time = sum(reduced[k] for k in ("data_wait_s", "forward_s", "backward_s", "optimizer_s"))
    result.update({
        "steps": args.steps, "micro_batch": cfg.train.micro_batch,
        "samples_per_s": reduced["samples"] / step_time,
        "tokens_per_s": reduced["tokens"] / step_time,
        "tflops": reduced["flops"] / step_time / 1e12,
        "executed_tflops": reduced["executed_flops"] / step_time / 1e12,
        "flops_per_sample": reduced["flops"] / reduced["samples"],
        "real_token_fraction": reduced["tokens"] / reduced["padded_positions"],
        "step_time_s": step_time / args.steps,
        "breakdown_s": {k[:-2]: reduced[k] / args.steps for k in ("data_wait_s", "forward_s", "backward_s",
                                                                   "optimizer_s")},
        "peak_memory_bytes_mean_over_ranks": peak["m"],
    })
    return result


def environment(device: torch.device) -> Dict[str, object]:
    import deepspeed

    env = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
           "torch": torch.__version__, "deepspeed": deepspeed.__version__, "cpu_threads": torch.get_num_threads(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            env["cpu"] = platform.processor()
    return env


def add_mfu(result: Dict[str, object], peak: Optional[float], measured: Optional[float]) -> None:
    result["mfu"] = result["tflops"] / peak if peak else None
    result["mfu_measured_peak"] = result["tflops"] / measured if measured else None


def write_result(result: Dict[str, object], out_dir: str) -> str:
    """``<out>/throughput_<name>.json`` plus one line in ``results.jsonl`` and in ``table.md``."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"throughput_{result['name']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(result, sort_keys=True) + "\n")
    from report import throughput_row, THROUGHPUT_HEADER
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


def summary_lines(r: Dict[str, object]) -> List[str]:
    gib = r["peak_memory_bytes"] / 2 ** 30
    lines = [f"{r['name']}: {r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:.0f} tokens/s, "
             f"{r['tflops']:.4f} TFLOP/s per rank, peak memory {gib:.2f} GiB ({r['peak_memory_kind']})"]
    if r.get("mfu") is not None:
        lines.append(f"  MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s")
    if r.get("mfu_measured_peak") is not None:
        lines.append(f"  MFU {100 * r['mfu_measured_peak']:.1f}% of the measured matmul ceiling "
                     f"{r['measured_peak_tflops']:.3f} TFLOP/s")
    b = r["breakdown_s"]
    lines.append("  step {:.1f} ms = data {:.1f} + forward {:.1f} + backward {:.1f} + optimizer {:.1f} ms".format(
        1e3 * r["step_time_s"], *(1e3 * b[k] for k in ("data_wait", "forward", "backward", "optimizer"))))
    if r.get("baseline"):
        base = r["baseline"]
        lines.append(f"  authors-style baseline: {base['samples_per_s']:.2f} samples/s, {base['tflops']:.4f} "
                     f"TFLOP/s, peak memory {base['peak_memory_bytes'] / 2 ** 30:.2f} GiB -> speed-up "
                     f"{r['speedup_vs_authors']:.2f}x")
    return lines


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    threads = 1 if args.threads is None and args.device == "cpu" else args.threads
    if threads:
        torch.set_num_threads(threads)
    from mvptr_ds.training import distributed

    info = distributed.setup()
    cfg = run_config(args)
    measured = measure_matmul_peak(info.device, args.precision) if args.measure_peak else None
    peak = args.peak_tflops or datasheet_peak(info.device, args.precision)
    result = run_phase(cfg, info, args, authors=False)
    if args.measure_peak:  # measured again after the run: the better of the two (a shared machine's load varies)
        measured = max(measured, measure_matmul_peak(info.device, args.precision))
    name = f"{args.device}_{args.model if '/' not in args.model else Path(args.model).stem}_s{args.stage}_" \
           f"{args.precision}_mb{args.micro_batch}_w{info.world_size}" + (f"_{args.tag}" if args.tag else "")
    result.update({"name": name, "device": args.device, "model": args.model, "stage": args.stage,
                   "world_size": info.world_size, "data": args.data, "peak_tflops": peak,
                   "measured_peak_tflops": measured, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                   **environment(info.device)})
    add_mfu(result, peak, measured)
    if args.baseline == "authors":
        base = run_phase(cfg, info, args, authors=True)
        base_peak = args.peak_tflops or datasheet_peak(info.device, base["precision"])
        add_mfu(base, base_peak, measured)
        result["baseline"] = base
        result["speedup_vs_authors"] = result["samples_per_s"] / base["samples_per_s"]
    else:
        result["speedup_vs_authors"] = None
    if info.is_main:
        path = write_result(result, args.out)
        for line in summary_lines(result):
            print(line, flush=True)
        print(f"wrote {path}", flush=True)
        if args.wandb != "disabled":
            import wandb
            run = wandb.init(project="mvptr_ds-bench", name=name, mode=args.wandb, config=vars(args))
            run.log(flat_numbers(result))
            run.finish()
    distributed.barrier()
    return result


if __name__ == "__main__":
    main()
