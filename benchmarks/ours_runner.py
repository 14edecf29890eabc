"""``throughput.py``'s own side: this project's training step (or the eager re-creation of the authors'
computation on the same engine), built as ``trainer.py`` builds it, timed phase by phase, and its figures."""
from __future__ import annotations

import contextlib
import gc
import time
from typing import Dict, List, Optional

import torch

from machine import DTYPES, peak_memory, reset_peak_memory, sync
from timing import PHASES, phase_stats


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
