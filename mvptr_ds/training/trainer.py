"""The training loop: one DeepSpeed engine, one data stream, logs and checkpoints.

data -> batch -> model -> objectives (inside the engine's module) -> engine step -> logs/checkpoints.
Every rank runs the same code path on every step: the loader gives each rank a full micro batch, objectives
return an exact zero (with a graph) when they have nothing to score, all ranks save checkpoints together, and
metrics are averaged with a collective that every rank enters.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from mvptr_ds.config import RunConfig
from mvptr_ds.training import checkpoint, distributed
from mvptr_ds.training.ds_config import build_ds_config, offloads_optimizer
from mvptr_ds.training.logging import RunLogger
from mvptr_ds.training.optim import build_optimizer, linear_schedule

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    final_dir: Optional[str]
    last_losses: Dict[str, float]


class NonFiniteLossError(RuntimeError):
    pass


def train(cfg: RunConfig, build: Optional[Callable] = None) -> TrainResult:
    """Run (or resume) training as described by ``cfg`` on every rank of the launch.

    ``build(cfg, dist_info) -> RunParts`` assembles the resolved config, the module (whose
    ``forward(batch)`` returns an object with ``loss`` and a ``losses`` dict) and this rank's resumable
    loader; the default is pre-training (``pipeline.build``). Fine-tuning tasks pass their own.
    """
    import deepspeed

    from mvptr_ds import pipeline

    build = build or pipeline.build

    train_cfg = cfg.train
    # Validate what can be validated before any process group exists, so bad input is one clear line.
    ds_cfg = build_ds_config(train_cfg.ds_config, train_cfg, int(os.environ.get("WORLD_SIZE", "1")))
    resume_path = checkpoint.resolve_resume(train_cfg.resume, train_cfg.output_dir)
    info = distributed.setup()
    os.makedirs(train_cfg.output_dir, exist_ok=True)

    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    parts = build(cfg, info)
    cfg = parts.config  # vocabulary sizes resolved from the data
    if info.is_main:
        cfg.dump(os.path.join(train_cfg.output_dir, "config.json"))
    logger_events: List[str] = []
    if train_cfg.init_from and resume_path is None:
        logger_events.extend(pipeline.init_weights(
            parts.module, train_cfg.init_from,
            os.path.join(train_cfg.output_dir, "init_report.json") if info.is_main else None))

    optimizer = build_optimizer(parts.module, train_cfg, offloads_optimizer(ds_cfg))
    scheduler = linear_schedule(optimizer, train_cfg.warmup_steps, train_cfg.max_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=parts.module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    dtype = _DTYPES[train_cfg.precision]

    step = 0
    torch.manual_seed(train_cfg.seed + 1000 + info.rank)  # dropout differs per rank
    if resume_path is not None:
        state = checkpoint.load(engine, resume_path)
        step = int(state["step"])
        parts.loader.load_state_dict(state["loader"])
        checkpoint.set_rng_state(state["rng"])
        logger_events.append(f"resumed from {resume_path} at step {step}")

    logger = RunLogger(train_cfg.output_dir, info.is_main, train_cfg.max_steps, step, train_cfg.wandb,
                       train_cfg.wandb_project, cfg.to_dict(), resume=resume_path is not None)
    for line in logger_events:
        logger.event(line)

    batches = iter(parts.loader)
    last: Dict[str, float] = {}
    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
    ckpt_path = resume_path
    bad_steps = 0
    try:
        while step < train_cfg.max_steps:
            losses: Dict[str, torch.Tensor] = {}
            micro = 0
            while micro < train_cfg.grad_accum:
                batch = next(batches).to(info.device, dtype=dtype)
                out = engine(batch)
                finite = bool(torch.isfinite(out.loss).item())
                if distributed.any_rank(not finite, info.device):
                    bad_steps += 1
                    if not finite:
                        print(f"[rank {info.rank}] step {step + 1}: non-finite loss {out.loss.item()}; skipped "
                              f"batch of samples {batch.sample_ids.tolist()}", file=sys.stderr, flush=True)
                    logger.event(f"step {step + 1}: non-finite loss on some rank, batch skipped "
                                 f"({bad_steps} in a row)")
                    if bad_steps >= train_cfg.max_bad_steps:
                        raise NonFiniteLossError(
                            f"{bad_steps} consecutive batches gave a non-finite loss (limit --max_bad_steps="
                            f"{train_cfg.max_bad_steps}); stopping. The newest checkpoint predates the problem: "
                            f"{ckpt_path or 'none written yet'}")
                    continue
                bad_steps = 0
                engine.backward(out.loss)
                engine.step()
                micro += 1
                losses["loss"] = losses.get("loss", 0) + out.loss.detach() / train_cfg.grad_accum
                for name, value in out.losses.items():
                    losses[f"loss/{name}"] = losses.get(f"loss/{name}", 0) + value.detach() / train_cfg.grad_accum
                window_samples += batch.size
                window_tokens += batch.num_real_tokens()
            step += 1
            logger.advance()

            if step % train_cfg.log_every == 0 or step == train_cfg.max_steps:
                now = time.perf_counter()
                losses["samples"] = torch.tensor(float(window_samples))
                losses["tokens"] = torch.tensor(float(window_tokens))
                reduced = distributed.mean_over_ranks(losses, info.device)
                elapsed = max(now - window_start, 1e-9)
                record = {"step": step, "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": reduced.pop("samples") * info.world_size / elapsed,
                          "tokens_per_s": reduced.pop("tokens") * info.world_size / elapsed}
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                record.update(reduced)
                logger.log(record)
                last = {k: v for k, v in record.items() if k.startswith("loss")}
                window_start, window_samples, window_tokens = time.perf_counter(), 0, 0

            stopping = train_cfg.stop_after is not None and step >= train_cfg.stop_after
            if step % train_cfg.save_every == 0 or step == train_cfg.max_steps or stopping:
                state = {"step": step, "loader": parts.loader.state_dict(), "rng": checkpoint.rng_state(),
                         "config": cfg.to_dict()}
                ckpt_path = checkpoint.save(engine, train_cfg.output_dir, step, state, cfg, train_cfg.keep_last)
                logger.event(f"checkpoint {ckpt_path}")
            if stopping and step < train_cfg.max_steps:
                logger.event(f"stopped after step {step} (--stop_after); continue with --resume auto")
                return TrainResult(train_cfg.output_dir, step, None, last)

        final_dir = export_final(engine, cfg, ckpt_path, info)
        if final_dir:
            logger.event(f"final weights {final_dir}")
    finally:
        logger.close()
    return TrainResult(train_cfg.output_dir, step, final_dir, last)


def export_final(engine, cfg: RunConfig, ckpt_path: Optional[str], info) -> Optional[str]:
    """Write ``<output_dir>/final/model.safetensors`` + ``config.json`` (consolidated fp32, any ZeRO stage)."""
    from mvptr_ds.training.weights import save_weights

    state = checkpoint.consolidated_state_dict(engine, ckpt_path)
    final_dir = os.path.join(cfg.train.output_dir, "final")
    if info.is_main:
        save_weights(final_dir, state, cfg)
    distributed.barrier()
    return final_dir
