"""Training throughput per rank: samples/s, real tokens/s, model TFLOP/s, MFU, step-time breakdown, peak memory,
and the speed-up over the authors' released code, measured step by step against it.

    python benchmarks/throughput.py --device cpu --model tiny --steps 5           # also: python -m mvptr_ds.run bench
    python benchmarks/throughput.py --device cpu --model base --micro_batch 8 --steps 4 --threads 2 --baseline authors
    python benchmarks/throughput.py --device cuda --model base --stage 2 --precision bf16 --micro_batch 64 --out DIR
    deepspeed --num_gpus 2 benchmarks/throughput.py --device cpu --model tiny      # per-rank figures, 2 ranks

Our side runs ``--warmup`` then ``--steps`` timed optimizer steps of the real training step
(``assembly.build``: data, model, objectives; ``trainer.build_engine``: AdamW + DeepSpeed engine; then
``engine(batch)``, ``engine.backward``, ``engine.step`` as in ``trainer.py``) and times four phases per step,
with a device synchronisation at each boundary: data wait (next batch from the loader, to the device), forward,
backward (gradient reduction of ZeRO >= 2 happens inside it, in DeepSpeed's hooks), optimizer (ZeRO 1/2
all-gather the updated parameters inside it). ``--stage`` is the MVPTR pre-training stage (1: MCR on the
uni-modal encoders, 2: all five objectives), as for ``mvptr_ds.run train``; the ZeRO stage comes from
``--ds_config``.

Vocabulary and data (``--vocab``): ``authors`` (the default for ``--model base``) gives the model the authors'
table, 86,051 rows of which 30,522 word pieces (245.5M parameters at base size with all five objectives'
heads, as their ``BiBertImgForPreTraining``), and draws the data at those sizes with their harness's length
distribution (``authors_data.py``: captions of 10-25 word pieces spread over the word-piece range + 0-5 concept
ids, 5-18 tag pieces, 10-50 regions of 2054-d features, 15% masking). ``data`` (the default otherwise) takes
the data's own vocabulary: the built-in scene world (439 ids; base then has 133M parameters) re-cut to
realistic lengths (``realistic.py``) unless ``--data`` names another source.

Baselines (``--baseline``), each interleaved step by step with ours: per step our loader draws the batch,
then the baseline steps, then we step (A, O, A, O, ...; ``order`` in the JSON), so both see the same
machine load; each phase is reported as the median and spread (min, max, quartiles) over the timed steps,
and the speed-up as the ratio of medians (baseline / ours) of the step = forward + backward + optimizer
(data wait excluded on both sides: the authors' harness builds its batches untimed; ours is reported apart).

* ``authors``: the authors' released code (``--authors_repo``, default ``../shared/peer/mvp_pytorch`` beside
  the repository), driven in a subprocess by ``authors_driver.py`` (their vendored ``transformers`` package
  clashes with the real one) that builds ``BiBertImgForPreTraining`` at our sizes as their harness does and
  times forward / backward / ``torch.optim.AdamW`` on the same sample indices, with the same thread count.
  Where their code is absent (or cannot be imported, or the run has several ranks) one line says why and the
  run continues without it.
* ``eager``: this project's in-process *re-creation* of the authors' computation (``authors_baseline.py``:
  fixed padding, eager attention, per-pair WPG loop, on our engine). Not the authors' code; labelled so.

FLOPs: ``flop_count.py`` (the work required, unpadded; documented there). TFLOP/s = required FLOPs of the
timed steps / their time, per rank. MFU = that / the peak: ``--peak_tflops``, else the datasheet figure of a
known GPU (``DATASHEET_TFLOPS``), and with ``--measure_peak`` also against a matmul ceiling measured here.
One JSON per run goes to ``--out`` (plus a line in ``results.jsonl`` and ``table.md`` there).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# Dense peak TFLOP/s from the vendors' datasheets (no sparsity), by (name fragment, precision).
DATASHEET_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_AUTHORS_REPO = REPO.parent / "shared" / "peer" / "mvp_pytorch"
DEFAULT_THREADS = torch.get_num_threads()  # torch's default for this machine (OMP_NUM_THREADS or the cores)
PHASES = ("forward", "backward", "optimizer", "step")  # step = forward + backward + optimizer
BASELINE_LABELS = {
    "authors": "the authors' released code (BiBertImgForPreTraining + torch AdamW, separate process)",
    "eager": "eager re-creation of the authors' computation in this project's code (not the authors' code)",
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="tiny", help="preset (tiny, base) or a JSON file of ModelConfig fields")
    p.add_argument("--vocab", choices=("authors", "data"), default=None,
                   help="authors: the authors' vocabulary (86,051 rows, 30,522 word pieces) and data generated at "
                        "those sizes with their harness's lengths; data: the data's own vocabulary (scene world: "
                        "439 ids). Default: authors for --model base, data otherwise")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2), help="MVPTR pre-training stage")
    p.add_argument("--precision", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--micro_batch", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--ds_config", default="ds_configs/zero2.json", help="DeepSpeed template (ZeRO stage, offload)")
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument("--data", default="realistic",
                   help="'realistic' (default: generated at the authors' sizes with --vocab authors, the scene "
                        "world re-cut otherwise) or any --data source of train (needs --vocab data)")
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--baseline", choices=("none", "authors", "eager"), default=None,
                   help="authors: the authors' released code from --authors_repo, in a subprocess, interleaved "
                        "step by step with ours; eager: this project's in-process re-creation of the authors' "
                        "computation (a re-creation, not their code), interleaved likewise; none. Default: "
                        "authors on CPU (skipped with one line where their code is absent), none on CUDA")
    p.add_argument("--authors_repo", default=None,
                   help=f"the authors' repository for --baseline authors (default: {DEFAULT_AUTHORS_REPO})")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak dense TFLOP/s per device for MFU")
    p.add_argument("--measure_peak", action="store_true", help="also measure a matmul ceiling for MFU")
    p.add_argument("--out", default="runs/bench", help="directory for the JSON result, results.jsonl and table.md")
    p.add_argument("--tag", default="", help="label added to the result's file name")
    p.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads per process, ours and the authors' alike (default: torch's default here, "
                        f"{DEFAULT_THREADS})")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--wandb", choices=("disabled", "offline", "online"), default="disabled")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.micro_batch = args.micro_batch or (64 if cuda else 8)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.baseline = args.baseline or ("none" if cuda else "authors")
    if args.vocab is None:
        args.vocab = "authors" if args.model == "base" and args.data == "realistic" else "data"
    if args.vocab == "authors" and args.data != "realistic":
        p.error(f"--vocab authors generates its data; --data {args.data} needs --vocab data")
    args.authors_repo = args.authors_repo or str(DEFAULT_AUTHORS_REPO)
    args.threads = args.threads or DEFAULT_THREADS
    if args.steps < 1 or args.micro_batch < 1 or args.warmup < 0:
        p.error("--steps and --micro_batch must be >= 1, --warmup >= 0")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def run_config(args: argparse.Namespace):
    """The RunConfig of the benchmarked run (the same typed config ``mvptr_ds.run train`` builds)."""
    from authors_data import AUTHORS_ONLY_WORD_SIZE, AUTHORS_VOCAB_SIZE
    from mvptr_ds.config import DataConfig, RunConfig, TrainConfig, model_config_from

    model = dataclasses.replace(model_config_from(args.model), kernels=args.kernels,
                                activation_checkpointing=args.activation_checkpointing)
    if args.vocab == "authors":
        model = dataclasses.replace(model, vocab_size=AUTHORS_VOCAB_SIZE, only_word_size=AUTHORS_ONLY_WORD_SIZE)
        source = "generated:authors_vocab"  # never read: build_parts hands assembly.build the generated data
    elif args.data == "realistic":
        source = "synthetic:images=512,held_out=0,regions=10-50"
    else:
        source = args.data
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


# ---------------------------------------------------------------------------------------------------------------
# Statistics


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


# ---------------------------------------------------------------------------------------------------------------
# Our side


@contextlib.contextmanager
def data_bundle_for_build(bundle):
    """While active, ``assembly.build`` gets ``bundle`` from ``build_data`` (whatever ``cfg.data.source`` says)."""
    import mvptr_ds.data.pipeline as data_pipeline

    original = data_pipeline.build_data
    data_pipeline.build_data = lambda data_cfg, objectives, *args, **kwargs: bundle
    try:
        yield
    finally:
        data_pipeline.build_data = original


def generated_size(args, world_size: int) -> int:
    return max(512, args.micro_batch * world_size * (args.warmup + args.steps))


def build_parts(cfg, info, args):
    """``assembly.build(cfg, info)`` and the loader to time. ``--vocab authors``: the data bundle is
    ``authors_data.authors_bundle`` (the authors' vocabulary sizes; ``resolve_model_config`` checks the model's
    86,051 / 30,522 against it); otherwise the configured source, re-cut by ``realistic.py`` by default."""
    from authors_data import authors_bundle
    from realistic import realistic_loader

    from mvptr_ds import assembly

    if args.vocab == "authors":
        bundle = authors_bundle(cfg.data, cfg.objective_names, generated_size(args, info.world_size),
                                seed=cfg.train.seed)
        with data_bundle_for_build(bundle):
            parts = assembly.build(cfg, info)
        if parts.data is not bundle:
            raise RuntimeError("assembly.build did not take the generated data (does it still call "
                               "mvptr_ds.data.pipeline.build_data?)")
        return parts, parts.loader
    parts = assembly.build(cfg, info)
    return parts, (realistic_loader(parts, parts.config, info) if args.data == "realistic" else parts.loader)


class OursRunner:
    """This project's training step, built as ``trainer.py`` builds it; ``recreation=True``: the eager
    re-creation of the authors' computation (``authors_baseline.py``) on the same engine.

    ``prepare()`` draws the next batch (timed: data wait) and returns its sample indices; ``step()`` times
    forward, backward and optimizer on it (drawing first if nothing was prepared) and returns the record."""

    def __init__(self, cfg, info, args, recreation: bool = False):
        from authors_baseline import AuthorsStyleModule, authors_config, fixed_lengths
        from flop_count import FlopCounter, param_count

        from mvptr_ds.training.ds_config import build_ds_config, zero_stage
        from mvptr_ds.training.trainer import build_engine

        self.kind = "eager" if recreation else "ours"
        self.info = info
        if recreation:
            cfg = authors_config(cfg, info.device)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on both sides
        self.parts, loader = build_parts(cfg, info, args)
        self.cfg = cfg = self.parts.config
        self.module = AuthorsStyleModule.wrap(self.parts.module) if recreation else self.parts.module
        self.ds_cfg = build_ds_config(cfg.train.ds_config, cfg.train, info.world_size)
        self.zero_stage = zero_stage(self.ds_cfg)
        self.counter = FlopCounter(cfg.model).attach(self.module)
        self.engine, _ = build_engine(self.module, cfg.train, self.ds_cfg, info.device)
        self.parameters = param_count(self.module)
        torch.manual_seed(cfg.train.seed + 1000 + info.rank)
        self.dtype = DTYPES[cfg.train.precision]
        self.lengths = fixed_lengths(cfg) if recreation else None
        self.batches = iter(loader)
        self.pending = None
        self.last_loss = float("nan")

    def prepare(self) -> List[int]:
        from authors_baseline import pad_fixed

        t0 = time.perf_counter()
        batch = next(self.batches)
        if self.lengths is not None:
            batch = pad_fixed(batch, *self.lengths)
        batch = batch.to(self.info.device, dtype=self.dtype)
        sync(self.info.device)
        self.pending = (batch, time.perf_counter() - t0)
        return batch.sample_ids.tolist()

    def step(self, sample_ids: Optional[List[int]] = None) -> Dict[str, float]:
        if self.pending is None:
            self.prepare()
        (batch, data_wait), self.pending = self.pending, None
        device = self.info.device
        t1 = time.perf_counter()
        out = self.engine(batch)
        sync(device)
        t2 = time.perf_counter()
        self.engine.backward(out.loss)
        sync(device)
        t3 = time.perf_counter()
        self.engine.step()
        sync(device)
        t4 = time.perf_counter()
        flops = self.counter.count(batch)
        self.last_loss = float(out.loss.detach().float())
        return {"data_wait": data_wait, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3,
                "step": t4 - t1, "samples": batch.size, "tokens": batch.num_real_tokens(), "flops": flops.train,
                "executed_flops": 3 * flops.executed_forward,
                "padded_positions": batch.text_mask.numel() + batch.tag_mask.numel() + batch.region_mask.numel(),
                "same_samples": sample_ids is None or batch.sample_ids.tolist() == list(sample_ids)}

    def reset_peak(self) -> None:
        reset_peak_memory(self.info.device)

    def close(self) -> None:
        self.counter.detach()
        del self.engine, self.parts, self.module, self.batches
        gc.collect()
        if self.info.device.type == "cuda":
            torch.cuda.empty_cache()


def summarize_ours(runner: OursRunner, records: List[Dict[str, float]], args) -> Dict[str, object]:
    """Throughput figures (sums over the timed steps, averaged over ranks), per-phase medians and spread."""
    from mvptr_ds.training import distributed

    info, cfg = runner.info, runner.cfg
    result = {"kernels": cfg.model.kernels, "precision": cfg.train.precision, "zero_stage": runner.zero_stage,
              "parameters": runner.parameters, "loss_last": runner.last_loss, **peak_memory(info.device),
              "vocab_size": cfg.model.vocab_size, "only_word_size": cfg.model.only_word_size}
    keys = ("data_wait", "forward", "backward", "optimizer", "samples", "tokens", "flops", "executed_flops",
            "padded_positions")
    totals = {k: torch.tensor(float(sum(r[k] for r in records))) for k in keys}
    per_step = {f"{k}/{i}": torch.tensor(float(r[k])) for i, r in enumerate(records)
                for k in ("data_wait",) + PHASES}
    reduced = distributed.mean_over_ranks(totals, info.device)
    steps = distributed.mean_over_ranks(per_step, info.device)
    peak = distributed.mean_over_ranks({"m": torch.tensor(float(result["peak_memory_bytes"]))}, info.device)
    mean_records = [{k: steps[f"{k}/{i}"] for k in ("data_wait",) + PHASES} for i in range(len(records))]
    step_time = sum(reduced[k] for k in ("data_wait", "forward", "backward", "optimizer"))
    n = len(records)
    result.update({
        "steps": n, "micro_batch": cfg.train.micro_batch,
        "samples_per_s": reduced["samples"] / step_time,
        "tokens_per_s": reduced["tokens"] / step_time,
        "tflops": reduced["flops"] / step_time / 1e12,
        "executed_tflops": reduced["executed_flops"] / step_time / 1e12,
        "flops_per_sample": reduced["flops"] / reduced["samples"],
        "real_token_fraction": reduced["tokens"] / reduced["padded_positions"],
        "step_time_s": step_time / n,
        "breakdown_s": {k: reduced[k] / n for k in ("data_wait", "forward", "backward", "optimizer")},
        "phases_s": phase_stats(mean_records, ("data_wait",) + PHASES),
        "same_samples": all(r.get("same_samples", True) for r in records),
        "peak_memory_bytes_mean_over_ranks": peak["m"],
    })
    return result


# ---------------------------------------------------------------------------------------------------------------
# The authors' side


class BaselineUnavailable(Exception):
    """The authors' code cannot run here; the message is the one line the benchmark prints."""


def authors_spec(cfg, vocab, args, threads: int) -> Dict[str, object]:
    """What ``authors_driver.py`` builds: our sizes and vocabulary, the authors' fixed lengths, our batch."""
    from authors_baseline import fixed_lengths
    from authors_data import ids_of_vocab

    m = cfg.model
    if not m.text_layers == m.visual_layers == m.cross_layers:
        raise BaselineUnavailable(f"their model has three encoders of equal depth; ours has {m.text_layers}/"
                                  f"{m.visual_layers}/{m.cross_layers} layers")
    text_len, tag_len, region_len = fixed_lengths(cfg)
    return {"hidden": m.hidden_size, "heads": m.num_attention_heads, "layers": m.text_layers,
            "intermediate": m.intermediate_size, "max_position": m.max_position_embeddings,
            "dropout": m.hidden_dropout, "vocab_size": m.vocab_size, "only_word_size": m.only_word_size,
            "ids": ids_of_vocab(vocab).to_dict(), "text_len": text_len, "tag_len": tag_len,
            "region_len": region_len, "micro_batch": cfg.train.micro_batch, "seed": cfg.train.seed,
            "data_seed": cfg.train.seed, "threads": threads, "device": args.device,
            "precision": cfg.train.precision, "mask_prob": cfg.data.mask_prob}


class AuthorsProcess:
    """``authors_driver.py`` in a subprocess, stepped over a pipe (protocol in its docstring)."""

    kind = "authors"

    def __init__(self, repo: str, spec: Dict[str, object], timeout_s: float = 3600.0):
        if not os.path.isdir(os.path.join(repo, "oscar")):
            raise BaselineUnavailable(f"the authors' code is not at {repo} (--authors_repo; it ships in "
                                      f"../shared/peer, not with a clone)")
        self.repo, self.spec = repo, spec
        env = dict(os.environ)  # their repository goes first on the driver's sys.path, before any transformers
        env["OMP_NUM_THREADS"] = str(spec["threads"])
        self.proc = subprocess.Popen([sys.executable, str(HERE / "authors_driver.py"), "--authors_repo", repo,
                                      "--spec", json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(HERE))
        hello = self._read()
        if "error" in hello:
            self.close()
            raise BaselineUnavailable(hello["error"])
        self.hello = hello
        self.parameters = int(hello["parameters"])

    def _read(self) -> Dict[str, object]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"authors_driver.py exited ({code}) without answering; its stderr is above")
        return json.loads(line)

    def call(self, msg: Dict[str, object]) -> Dict[str, object]:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"authors_driver.py: {reply['error']}")
        return reply

    def prepare(self):
        return None

    def step(self, sample_ids: Optional[List[int]]) -> Dict[str, float]:
        if sample_ids is None:
            raise ValueError("the authors' driver steps on sample indices drawn by our loader")
        return self.call({"cmd": "step", "ids": [int(i) for i in sample_ids]})

    def reset_peak(self) -> None:
        self.call({"cmd": "reset_peak"})

    def stats(self) -> Dict[str, object]:
        return self.call({"cmd": "stats"})

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def summarize_authors(proc: AuthorsProcess, records: List[Dict[str, float]]) -> Dict[str, object]:
    stats = proc.stats()
    total = sum(r["step"] for r in records)
    samples = sum(r["samples"] for r in records)
    return {"parameters": proc.parameters, "precision": proc.hello["precision"],
            "threads": proc.hello["threads"], "vocab_size": proc.hello["vocab_size"],
            "only_word_size": proc.hello["only_word_size"], "fixed_lengths": proc.hello["fixed_lengths"],
            "repo": proc.repo, "steps": len(records), "micro_batch": proc.spec["micro_batch"],
            "samples_per_s": samples / total, "step_time_s": total / len(records),
            "breakdown_s": {k: sum(r[k] for r in records) / len(records) for k in ("forward", "backward",
                                                                                   "optimizer")},
            "phases_s": phase_stats(records), "loss_last": records[-1]["loss"],
            "peak_memory_bytes": stats["peak_memory_bytes"], "peak_memory_kind": stats["peak_memory_kind"]}


# ---------------------------------------------------------------------------------------------------------------
# Interleaving


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


def make_baseline(args, cfg_ours, ours: OursRunner, info):
    """(baseline runner or None, one-line reason when ``--baseline`` asked for one that cannot run)."""
    if args.baseline == "eager":
        return OursRunner(cfg_ours, info, args, recreation=True), None
    if args.baseline != "authors":
        return None, None
    try:
        if info.world_size > 1:
            raise BaselineUnavailable(f"their harness is one process; this run has {info.world_size} ranks")
        spec = authors_spec(ours.cfg, ours.parts.data.vocab, args, torch.get_num_threads())
        return AuthorsProcess(os.path.abspath(args.authors_repo), spec), None
    except BaselineUnavailable as exc:
        return None, str(exc)


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
    from report_tables import THROUGHPUT_HEADER, throughput_row
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


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(args.threads)
    from mvptr_ds.training import distributed

    info = distributed.setup()
    cfg = run_config(args)
    measured = measure_matmul_peak(info.device, args.precision) if args.measure_peak else None
    peak = args.peak_tflops or datasheet_peak(info.device, args.precision)
    ours = OursRunner(cfg, info, args)
    baseline, skipped = make_baseline(args, cfg, ours, info)
    if skipped and info.is_main:
        print(f"--baseline {args.baseline}: skipped: {skipped}", flush=True)

    def on_timed_start():
        sync(info.device)
        ours.reset_peak()
        if baseline is not None:
            baseline.reset_peak()
        distributed.barrier()

    try:
        ours_records, base_records, order = interleave(ours, baseline, args.warmup, args.steps, on_timed_start)
        result = summarize_ours(ours, ours_records, args)
        base = None
        if isinstance(baseline, AuthorsProcess):
            base = summarize_authors(baseline, base_records)
        elif baseline is not None:
            base = summarize_ours(baseline, base_records, args)
    finally:
        if baseline is not None:
            baseline.close()
        ours.close()
    if args.measure_peak:  # measured again after the run: the better of the two (a shared machine's load varies)
        measured = max(measured, measure_matmul_peak(info.device, args.precision))
    model = args.model if "/" not in args.model else Path(args.model).stem
    name = f"{args.device}_{model}_s{args.stage}_{args.precision}_mb{args.micro_batch}_w{info.world_size}" + \
           ("_authorsvocab" if args.vocab == "authors" else "") + (f"_{args.tag}" if args.tag else "")
    result.update({"name": name, "device": args.device, "model": args.model, "stage": args.stage,
                   "world_size": info.world_size, "data": args.data, "threads": torch.get_num_threads(),
                   "vocab": {"source": args.vocab, "vocab_size": result.pop("vocab_size"),
                             "only_word_size": result.pop("only_word_size")},
                   "peak_tflops": peak, "measured_peak_tflops": measured,
                   "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), **environment(info.device)})
    add_mfu(result, peak, measured)
    result.update({"baseline_kind": args.baseline if base else "none",
                   "baseline_label": BASELINE_LABELS.get(args.baseline) if base else None,
                   "baseline_skipped": skipped, "baseline": base, "order": order,
                   "speedup": None, "speedup_vs_authors": None, "speedup_vs_eager_recreation": None})
    result.pop("same_samples", None)  # ours against its own indices: always true
    if base and args.baseline == "eager":
        result["same_samples"] = base.pop("same_samples")
        result["samples_note"] = "the same batches: the re-creation's loader has our seed and order" \
            if result["same_samples"] else "the re-creation's loader drew other samples than ours"
    elif base:
        result["same_samples"] = args.vocab == "authors"
        result["samples_note"] = (
            "the same samples: the driver redraws our batch's indices from the generated set (its own masking)"
            if args.vocab == "authors" else
            "the same sample indices and length distribution, but the driver draws them in the data's id space "
            "(authors_data.py) while ours come from the scene world re-cut to realistic lengths")
    if base:
        if args.baseline == "eager":
            add_mfu(base, args.peak_tflops or datasheet_peak(info.device, base["precision"]), measured)
        ratios = median_ratios(base["phases_s"], result["phases_s"])
        result["speedup"] = {"baseline": args.baseline, "definition": "baseline median / our median", **ratios}
        key = "speedup_vs_authors" if args.baseline == "authors" else "speedup_vs_eager_recreation"
        result[key] = ratios["step"]
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
