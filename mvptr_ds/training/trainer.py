"""The training loop: one DeepSpeed engine, one data stream, logs and checkpoints.

data -> batch -> model -> objectives (inside the engine's module) -> engine step -> logs/checkpoints.
Every rank runs the same code path on every step: the loader gives each rank a full micro batch, objectives
return an exact zero (with a graph) when they have nothing to score, all ranks save checkpoints together,
metrics are averaged with a collective that every rank enters, and every decision that could differ
between ranks (a non-finite loss or gradient, a stop signal) is all-reduced first (``guard``, ``signals``).
Resume (``checkpoint``, ``elastic``) restores model, optimizer, schedule, data position and RNG states.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from mvptr_ds.config import RunConfig
from mvptr_ds.training import checkpoint, cleanup, distributed, elastic, faults, guard, host_memory, lock, writes
from mvptr_ds.training.ds_config import (build_ds_config, offloads_optimizer, precision_warning, set_zero_stage,
                                         stage_note, zero_stage)
from mvptr_ds.training.guard import TrainingStopped
from mvptr_ds.training.logging import RunLogger
from mvptr_ds.training.optim import build_optimizer, linear_schedule
from mvptr_ds.training.launcher import LauncherWatch
from mvptr_ds.training.signals import Interrupted, StopRequest

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    final_dir: Optional[str]
    last_losses: Dict[str, float]
    stopped_by: Optional[str] = None   # "SIGTERM"/"SIGINT"/"launcher exit" when that ended the run early


NonFiniteLossError = TrainingStopped  # the name older callers know


def train(cfg: RunConfig, build: Optional[Callable] = None) -> TrainResult:
    """Run (or resume) training as described by ``cfg`` on every rank of the launch.

    ``build(cfg, dist_info) -> RunParts`` assembles the resolved config, the module (whose
    ``forward(batch)`` returns an object with ``loss`` and a ``losses`` dict) and this rank's resumable
    loader; the default is pre-training (``pipeline.build``). Fine-tuning tasks pass their own.
    SIGTERM/SIGINT, or the exit of the launcher that started this rank, end the run at the next step boundary
    with a checkpoint (``stopped_by`` says which). A second SIGINT raises ``signals.Interrupted`` (its message
    names the checkpoint that is intact).
    """
    stop = StopRequest(LauncherWatch.from_env()).install()
    try:
        return _train(cfg, build, stop)
    except Interrupted:
        raise Interrupted(interrupted_message(cfg.train.output_dir, stop.saving)) from None
    finally:
        stop.restore()


def interrupted_message(output_dir: str, saving: Optional[int]) -> str:
    """The line for Ctrl-C pressed again while stopping: what was cut short and which checkpoint is intact."""
    found = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(output_dir))
    if saving is None:
        during = "before the final checkpoint"
    elif found and found[-1][0] == saving:
        during = f"just after the checkpoint of step {saving} was completed"
    else:
        during = f"during the final checkpoint (step {saving}: left incomplete, ignored on resume)"
    kept = (f"the newest complete checkpoint {found[-1][1]} is intact: continue with --resume auto" if found
            else "no complete checkpoint exists yet")
    return f"interrupted again {during}; {kept}"


def _train(cfg: RunConfig, build: Optional[Callable], stop: StopRequest) -> TrainResult:
    train_cfg = cfg.train
    # Validate what can be validated before any process group exists, so bad input is one clear line.
    ds_cfg = build_ds_config(train_cfg.ds_config, train_cfg, int(os.environ.get("WORLD_SIZE", "1")))
    checkpoint.resolve_resume(train_cfg.resume, train_cfg.output_dir)
    info = distributed.setup()
    held = lock.acquire_on_rank0(train_cfg.output_dir, info.rank)  # before anything is written; collective
    try:
        if info.is_main:
            cleanup.remove_stale_temporaries(train_cfg.output_dir)
        distributed.barrier()
        return _train_locked(cfg, build, stop, info, ds_cfg)
    finally:
        if held is not None:
            held.release()


def _train_locked(cfg: RunConfig, build: Optional[Callable], stop: StopRequest, info, ds_cfg: Dict) -> TrainResult:
    from mvptr_ds import pipeline

    build = build or pipeline.build
    train_cfg = cfg.train
    # Under the lock: no other run can add or prune checkpoints from here on.
    resume_path = checkpoint.resolve_resume(train_cfg.resume, train_cfg.output_dir)
    fault = faults.from_env(info.rank)
    events: List[str] = []

    plan = None
    if resume_path is not None:
        meta = checkpoint.verify(resume_path)
        stage = elastic.resume_stage(meta, zero_stage(ds_cfg), offloads_optimizer(ds_cfg))
        if stage != zero_stage(ds_cfg):
            events.append(f"the checkpoint was written at ZeRO stage {stage}: continuing at stage {stage} "
                          f"(DeepSpeed converts between ZeRO stages >= 1 only)")
            set_zero_stage(ds_cfg, stage)
        plan = elastic.plan_resume(resume_path, meta, info.world_size, zero_stage(ds_cfg))
        if plan.universal:
            elastic.ensure_universal(resume_path, info.rank)
            ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
        note = plan.describe(info.world_size, zero_stage(ds_cfg))
        if note:
            events.append(note)
    for note in (stage_note(train_cfg.ds_config, ds_cfg), precision_warning(train_cfg.precision, info.device.type)):
        if note:
            events.append(note)

    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    parts = build(cfg, info)
    cfg = parts.config  # vocabulary sizes resolved from the data
    if resume_path is not None:
        checkpoint.check_compatible(resume_path, cfg)
    if train_cfg.init_from and resume_path is None:
        events.extend(pipeline.init_weights(
            parts.module, train_cfg.init_from,
            os.path.join(train_cfg.output_dir, "init_report.json") if info.is_main else None))

    engine, scheduler = build_engine(parts.module, train_cfg, ds_cfg, info.device)
    dtype = _DTYPES[train_cfg.precision]

    step, skipped_batches = 0, 0
    torch.manual_seed(train_cfg.seed + 1000 + info.rank)  # dropout differs per rank
    if resume_path is not None:
        state = checkpoint.load(engine, resume_path, tag=elastic.UNIVERSAL if plan.universal else None)
        step, skipped_batches = checkpoint.restore_train_state(state, resume_path, parts.loader)
        rng = elastic.rank_rng_state(state["rng"], info.rank)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        else:
            torch.manual_seed(train_cfg.seed + 1000 + info.rank + 7919 * step)
            events.append(f"rank {info.rank} is new (the checkpoint had {plan.saved_world_size} ranks): "
                          f"fresh dropout seed")
        events.append(f"resumed from {resume_path} at step {step}")
        if info.is_main:
            truncate_metrics(os.path.join(train_cfg.output_dir, "metrics.jsonl"), step)
    if info.is_main:  # after the resume checks: a refused resume leaves the folder's config.json as it was
        cfg.dump(os.path.join(train_cfg.output_dir, "config.json"))

    logger = RunLogger(train_cfg.output_dir, info.is_main, train_cfg.max_steps, step, train_cfg, cfg.to_dict(),
                       resume=resume_path is not None)
    for line in events:
        logger.event(line)

    batches = iter(parts.loader)
    last: Dict[str, float] = {}
    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
    ckpt_path = resume_path
    bad_steps = 0

    def save_now() -> str:
        state = {"step": step, "loader": parts.loader.state_dict(), "rng": checkpoint.all_rng_states(),
                 "skipped_batches": skipped_batches, "config": cfg.to_dict()}
        if fault is not None:
            fault.wrap_checkpoint_engine(engine, step)
        stop.saving = step
        path = checkpoint.save(engine, train_cfg.output_dir, step, state, cfg, train_cfg.keep_last,
                               fault.save_hook(step) if fault is not None else None)
        stop.saving = None
        logger.sync()  # metrics.jsonl on disk up to this checkpoint
        logger.event(f"checkpoint {path}")
        return path

    def give_up(what: str) -> None:
        """Stop after ``max_bad_steps`` bad steps in a row, with a checkpoint of the untouched weights (when they
        are finite: an update that made the weights themselves non-finite is reported instead)."""
        nonlocal ckpt_path
        head = (f"{bad_steps} consecutive steps had a non-finite {what} (limit --max_bad_steps="
                f"{train_cfg.max_bad_steps}); stopping.")
        bad = guard.nonfinite_weights(engine, info.device)
        if bad:
            found = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(train_cfg.output_dir))
            now = [p for s, p in found if s == step]
            older = [p for s, p in found if s < step]
            raise TrainingStopped(
                f"{head} The weights themselves are not finite ({bad[0]} of {bad[1]} tensors, e.g. {bad[2]}): an "
                f"update up to step {step} made them so (is --lr {train_cfg.lr:g} too high?); no checkpoint from "
                f"before the problem can be offered"
                + (f"; checkpoint {now[0]} holds these weights: do not resume from it" if now else "")
                + (f"; the newest older checkpoint, {older[-1]}, was not checked" if older else ""))
        if ckpt_path is None or not ckpt_path.endswith(f"step{step}"):
            ckpt_path = save_now()
        raise TrainingStopped(
            f"{head} No bad step changed the weights: checkpoint {ckpt_path} holds the weights of step {step} "
            f"(before the problem, checked finite); the skipped samples are named in the log above")

    try:
        while step < train_cfg.max_steps:
            losses: Dict[str, torch.Tensor] = {}
            step_ids: List[int] = []
            micro = 0
            skipped_before = engine.skipped_steps
            while micro < train_cfg.grad_accum:
                batch = next(batches)
                if fault is not None:
                    batch = fault.on_batch(batch, step + 1)
                batch = batch.to(info.device, dtype=dtype)
                out = engine(batch)
                loss = out.loss if fault is None else fault.on_loss(out.loss, step + 1)
                finite = bool(torch.isfinite(loss).item())
                if guard.agree([not finite], info.device)[0]:
                    bad_steps += 1
                    skipped_batches += 1
                    ids = guard.gather_ids(batch.sample_ids.tolist())
                    if not finite:
                        print(f"[rank {info.rank}] step {step + 1}: non-finite loss {loss.item()}", file=sys.stderr,
                              flush=True)
                    logger.event(f"step {step + 1}: non-finite loss; micro batch skipped on every rank, samples "
                                 f"by rank {ids} ({bad_steps} bad in a row)")
                    if bad_steps >= train_cfg.max_bad_steps:
                        give_up("loss")
                    continue
                engine.backward(loss)
                engine.step()
                micro += 1
                step_ids += batch.sample_ids.tolist()
                losses["loss"] = losses.get("loss", 0) + loss.detach() / train_cfg.grad_accum
                for name, value in out.losses.items():
                    losses[f"loss/{name}"] = losses.get(f"loss/{name}", 0) + value.detach() / train_cfg.grad_accum
                window_samples += batch.size
                window_tokens += batch.num_real_tokens()

            if engine.skipped_steps > skipped_before:  # DeepSpeed/guard refused this step's gradients
                ids = guard.gather_ids(step_ids)
                if train_cfg.precision == "fp16":
                    logger.event(f"step {step + 1}: fp16 loss-scale overflow, optimizer step skipped (loss scale "
                                 f"now {engine.optimizer.cur_scale if hasattr(engine.optimizer, 'cur_scale') else '?'}"
                                 f"; {engine.skipped_steps} skipped so far)")
                else:
                    bad_steps += 1
                    logger.event(f"step {step + 1}: non-finite gradient; optimizer step skipped on every rank "
                                 f"(weights unchanged), samples by rank {ids} ({bad_steps} bad in a row)")
                    if bad_steps >= train_cfg.max_bad_steps:
                        give_up("gradient")
                    continue
            bad_steps = 0
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
                          "tokens_per_s": reduced.pop("tokens") * info.world_size / elapsed,
                          "skipped_steps": int(engine.skipped_steps), "skipped_batches": skipped_batches}
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                record.update(reduced)
                logger.log(record)
                last = {k: v for k, v in record.items() if k.startswith("loss")}
                window_start, window_samples, window_tokens = time.perf_counter(), 0, 0

            if fault is not None:
                fault.after_step(step)
            stopping = train_cfg.stop_after is not None and step >= train_cfg.stop_after
            signalled = stop.agreed(info.device)
            if step % train_cfg.save_every == 0 or step == train_cfg.max_steps or stopping or signalled:
                ckpt_path = save_now()
            if signalled and step < train_cfg.max_steps:
                logger.event(f"{stop.cause}: stopped after step {step} with checkpoint {ckpt_path}; "
                             f"continue with --resume auto")
                return TrainResult(train_cfg.output_dir, step, None, last, stopped_by=stop.name)
            if stopping and step < train_cfg.max_steps:
                logger.event(f"stopped after step {step} (--stop_after); continue with --resume auto")
                return TrainResult(train_cfg.output_dir, step, None, last)

        final_dir = export_final(engine, cfg, ckpt_path, info)
        if final_dir:
            logger.event(f"final weights {final_dir}")
    finally:
        logger.close()
    return TrainResult(train_cfg.output_dir, step, final_dir, last)


def build_engine(module: torch.nn.Module, train_cfg, ds_cfg: Dict, device: torch.device):
    """AdamW (the release's decay groups), the linear schedule and the DeepSpeed engine around ``module``.

    Returns ``(engine, scheduler)``. Shared by the training loop and ``benchmarks/throughput.py``.
    """
    import deepspeed

    set_determinism(train_cfg, device)
    if device.type == "cpu":
        host_memory.keep_freed_memory()
    optimizer = build_optimizer(module, train_cfg, offloads_optimizer(ds_cfg))
    if zero_stage(ds_cfg) == 0 and train_cfg.precision == "fp32":
        guard.guard_client_optimizer(optimizer, device, train_cfg.grad_clip)
        ds_cfg = {**ds_cfg, "gradient_clipping": 0.0}  # clipped inside the guarded step, with the same rule
    scheduler = linear_schedule(optimizer, train_cfg.warmup_steps, train_cfg.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_cfg)
    writes.install_writer(engine)
    guard.install(engine)
    if zero_stage(ds_cfg) == 0 and engine.dp_world_size == 1:
        # Nothing to all-reduce, but DeepSpeed's fallback would still flatten every gradient into buckets and
        # copy them back (a full copy of the model's gradients per step: 0.4 s at the paper's size on CPU).
        engine.enable_backward_allreduce = False
    return engine, scheduler


def set_determinism(train_cfg, device: torch.device) -> bool:
    """Switch ``torch.use_deterministic_algorithms`` on when ``train.deterministic`` says so (None: on for CPU runs).

    On CPU, without it, ``index_put_(accumulate=True)`` (the backward of the boolean-mask indexing that unpads
    tokens in every encoder) sums in a thread-dependent order: at 2 threads two runs of the same step differed
    in most gradients. With it, two runs (or a killed-and-resumed one) give identical weights at the same
    thread count. Its side switch that fills fresh memory with NaN (``fill_uninitialized_memory``) is turned off:
    it costs a pass over every new tensor and changes no result. A process-wide setting: an explicit False
    turns it off; None on CUDA leaves whatever the caller set. Returns whether it is on.
    """
    on = train_cfg.deterministic if train_cfg.deterministic is not None else device.type == "cpu"
    if train_cfg.deterministic is None and device.type != "cpu":
        return torch.are_deterministic_algorithms_enabled()
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(on))
    torch.utils.deterministic.fill_uninitialized_memory = False
    return bool(on)


def truncate_metrics(path: str, step: int) -> None:
    """Drop ``metrics.jsonl`` records of steps after ``step`` (written after the checkpoint we resume from).

    Rewritten atomically, so a resumed run never shows two different records for one step.
    """
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                kept.append(json.dumps(record, sort_keys=True) + "\n")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export_final(engine, cfg: RunConfig, ckpt_path: Optional[str], info) -> Optional[str]:
    """Write ``<output_dir>/final/`` (consolidated fp32 weights of any ZeRO stage, config, tokenizer: save_final)."""
    from mvptr_ds.training.weights import save_final

    state = checkpoint.consolidated_state_dict(engine, ckpt_path)
    final_dir = os.path.join(cfg.train.output_dir, "final")
    if info.is_main:
        save_final(final_dir, state, cfg)
    distributed.barrier()
    return final_dir
