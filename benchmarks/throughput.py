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
known GPU (``machine.DATASHEET_TFLOPS``), and with ``--measure_peak`` also against a matmul ceiling measured here.
One JSON per run goes to ``--out`` (plus a line in ``results.jsonl`` and ``table.md`` there).

This module reads the options and runs the comparison; the parts: ``ours_runner.py`` (our step, timed),
``authors_process.py`` (the authors' step in its own process), ``timing.py`` (interleaving, medians, ratios),
``machine.py`` (synchronisation, peak memory, the peaks MFU is measured against, the machine's record) and
``throughput_summary.py`` (the JSON and the printed lines).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from authors_process import AuthorsProcess, BaselineUnavailable, authors_spec, summarize_authors  # noqa: E402
from machine import DTYPES, add_mfu, datasheet_peak, environment, measure_matmul_peak, sync  # noqa: E402
from ours_runner import OursRunner, summarize_ours  # noqa: E402
from throughput_summary import flat_numbers, summary_lines, write_result  # noqa: E402
from timing import interleave, median_ratios  # noqa: E402

DEFAULT_AUTHORS_REPO = REPO.parent / "shared" / "peer" / "mvp_pytorch"
DEFAULT_THREADS = torch.get_num_threads()  # torch's default for this machine (OMP_NUM_THREADS or the cores)
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


def measure(args, cfg, info):
    """Our side and the baseline built, stepped interleaved and summarised: (our result, the baseline's or
    None, the order of the steps, the one-line reason the baseline was skipped or None)."""
    from mvptr_ds.training import distributed

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
    return result, base, order, skipped


def run_name(args, world_size: int) -> str:
    model = args.model if "/" not in args.model else Path(args.model).stem
    return f"{args.device}_{model}_s{args.stage}_{args.precision}_mb{args.micro_batch}_w{world_size}" + \
        ("_authorsvocab" if args.vocab == "authors" else "") + (f"_{args.tag}" if args.tag else "")


def add_baseline(result, base, order, skipped, args, info, measured) -> None:
    """The baseline's figures, what it is, whether it saw our samples, and the ratios of medians."""
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
    result, base, order, skipped = measure(args, cfg, info)
    if args.measure_peak:  # measured again after the run: the better of the two (a shared machine's load varies)
        measured = max(measured, measure_matmul_peak(info.device, args.precision))
    name = run_name(args, info.world_size)
    result.update({"name": name, "device": args.device, "model": args.model, "stage": args.stage,
                   "world_size": info.world_size, "data": args.data, "threads": torch.get_num_threads(),
                   "vocab": {"source": args.vocab, "vocab_size": result.pop("vocab_size"),
                             "only_word_size": result.pop("only_word_size")},
                   "peak_tflops": peak, "measured_peak_tflops": measured,
                   "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), **environment(info.device)})
    add_mfu(result, peak, measured)
    add_baseline(result, base, order, skipped, args, info, measured)
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
