"""The training loop: one DeepSpeed engine, one data stream, logs and checkpoints.

data -> batch -> model -> objectives (inside the engine's module) -> engine step -> logs/checkpoints.
The caller builds the parts (``build(cfg, dist_info) -> RunParts``: ``assembly.build`` for pre-training,
``finetune.runner.TaskBuilder`` for tasks); this module runs them. Every rank runs the same code path on every
step: the loader gives each rank a full micro batch, objectives return an exact zero (with a graph) when they
have nothing to score, all ranks save checkpoints together, metrics are averaged with a collective that every
rank enters, and every decision that could differ between ranks (a non-finite loss or gradient, a stop signal)
is all-reduced first (``guard``, ``signals``). Resume (``resume``, ``checkpoint``, ``elastic``) restores model,
optimizer, schedule, data position and RNG states. Test seams (fault injection) are one ``LoopHooks`` object.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch

from mvptr_ds.config import RunConfig
from mvptr_ds.training import checkpoint, cleanup, distributed, faults, guard, host_memory, lock, resume, writes
from mvptr_ds.training.ds_config import (build_ds_config, offloads_optimizer, precision_warning, stage_note,
                                         zero_stage)
from mvptr_ds.training.guard import TrainingStopped
from mvptr_ds.training.hooks import LoopHooks
from mvptr_ds.training.init_from import init_weights
from mvptr_ds.training.launcher import LauncherWatch
from mvptr_ds.training.logging import LogWindow, RunLogger, truncate_metrics
from mvptr_ds.training.optim import build_optimizer, linear_schedule
from mvptr_ds.training.signals import Interrupted, StopRequest

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunParts:
    """What the caller builds for the loop (after the process group exists, so per rank)."""

    config: RunConfig        # resolved (e.g. vocabulary sizes from the data)
    data: object             # the data bundle (kept for the caller, e.g. evaluation after training)
    module: torch.nn.Module  # forward(batch) -> output with ``loss`` and a ``losses`` dict
    loader: object           # this rank's resumable loader (state_dict / load_state_dict)
    fresh_start_notes: List[str] = field(default_factory=list)  # logged when the weights start untrained


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    final_dir: Optional[str]
    last_losses: Dict[str, float]
    stopped_by: Optional[str] = None   # "SIGTERM"/"SIGINT"/"launcher exit" when that ended the run early


Build = Callable[[RunConfig, distributed.DistInfo], RunParts]


def train(cfg: RunConfig, build: Build, hooks: Optional[LoopHooks] = None) -> TrainResult:
    """Run (or resume) training as described by ``cfg`` on every rank of the launch, with the parts ``build``
    makes. ``hooks``: test seams (default: ``MVPTR_FAULT_INJECT``'s fault plan, a no-op when it is unset).

    SIGTERM/SIGINT, or the exit of the launcher that started this rank, end the run at the next step boundary
    with a checkpoint (``stopped_by`` says which). A second SIGINT raises ``signals.Interrupted`` (its message
    names the checkpoint that is intact).
    """
    stop = StopRequest(LauncherWatch.from_env()).install()
    try:
        return _train(cfg, build, stop, hooks)
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


@dataclass
class _Run:
    """The loop's state: the built engine and parts, where the run stands, and where it reports."""

    cfg: RunConfig
    parts: RunParts
    engine: object
    scheduler: object
    info: distributed.DistInfo
    hooks: LoopHooks
    stop: StopRequest
    logger: RunLogger
    step: int = 0
    skipped_batches: int = 0
    bad_steps: int = 0                  # consecutive non-finite micro batches or steps
    checkpoint: Optional[str] = None    # the newest checkpoint of this run (or the one it resumed from)
    last: Dict[str, float] = field(default_factory=dict)  # the last record's losses


def _train(cfg: RunConfig, build: Build, stop: StopRequest, hooks: Optional[LoopHooks]) -> TrainResult:
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
        run = _restore(cfg, build, ds_cfg, info, hooks or faults.from_env(info.rank), stop)
        try:
            batches, window = iter(run.parts.loader), LogWindow()
            while run.step < train_cfg.max_steps:
                if not _optimizer_step(run, batches, window):
                    continue  # a non-finite gradient: the step was skipped on every rank
                run.step += 1
                run.logger.advance()
                if run.step % train_cfg.log_every == 0 or run.step == train_cfg.max_steps:
                    _log_window(run, window)
                run.hooks.after_step(run.step)
                stopped = _save_or_stop(run)
                if stopped is not None:
                    return stopped
            return _finish(run)
        finally:
            run.logger.close()
    finally:
        if held is not None:
            held.release()


def _restore(cfg: RunConfig, build: Build, ds_cfg: Dict, info, hooks: LoopHooks, stop: StopRequest) -> _Run:
    """Under the lock: plan the resume, build the parts and the engine, load the checkpoint, open the logs."""
    train_cfg = cfg.train
    start = resume.plan(train_cfg, ds_cfg, info.rank, info.world_size)
    start.events += [n for n in (stage_note(train_cfg.ds_config, ds_cfg),
                                 precision_warning(train_cfg.precision, info.device.type)) if n]
    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    parts = build(cfg, info)
    cfg = parts.config
    if start.resumed:
        checkpoint.check_compatible(start.path, cfg)
    elif train_cfg.init_from:
        report = os.path.join(train_cfg.output_dir, "init_report.json") if info.is_main else None
        start.events.extend(init_weights(parts.module, train_cfg.init_from, report,
                                         reset_decoders=train_cfg.reset_decoders_on_init))
    else:
        start.events += parts.fresh_start_notes
    engine, scheduler = build_engine(parts.module, train_cfg, ds_cfg, info.device)
    step, skipped_batches = resume.restore(start, engine, parts.loader, train_cfg.seed, info.rank)
    if info.is_main:
        if start.resumed:
            truncate_metrics(os.path.join(train_cfg.output_dir, "metrics.jsonl"), step)
        cfg.dump(os.path.join(train_cfg.output_dir, "config.json"))  # after the resume checks (a refusal keeps it)
    logger = RunLogger(train_cfg.output_dir, info.is_main, train_cfg.max_steps, step, train_cfg, cfg.to_dict(),
                       resume=start.resumed)
    for line in start.events:
        logger.event(line)
    return _Run(cfg, parts, engine, scheduler, info, hooks, stop, logger, step=step,
                skipped_batches=skipped_batches, checkpoint=start.path)


def _optimizer_step(run: _Run, batches: Iterator, window: LogWindow) -> bool:
    """Accumulate ``grad_accum`` micro batches with finite losses into one optimizer step.

    A micro batch whose loss is not finite on any rank is dropped on every rank before backward (and replaced
    by the next one). Returns False when DeepSpeed (or the guard) skipped the update: a non-finite gradient.
    """
    train_cfg, engine, step = run.cfg.train, run.engine, run.step + 1
    losses: Dict[str, torch.Tensor] = {}
    sample_ids: List[int] = []
    skipped_before = engine.skipped_steps
    micro = 0
    while micro < train_cfg.grad_accum:
        batch = run.hooks.on_batch(next(batches), step).to(run.info.device, dtype=_DTYPES[train_cfg.precision])
        out = engine(batch)
        loss = run.hooks.on_loss(out.loss, step)
        if _drop_nonfinite_loss(run, loss, batch):
            continue
        engine.backward(loss)
        engine.step()
        micro += 1
        sample_ids += batch.sample_ids.tolist()
        losses["loss"] = losses.get("loss", 0) + loss.detach() / train_cfg.grad_accum
        for name, value in out.losses.items():
            losses[f"loss/{name}"] = losses.get(f"loss/{name}", 0) + value.detach() / train_cfg.grad_accum
        window.count(batch.size, batch.num_real_tokens())
    if engine.skipped_steps > skipped_before and _skipped_update(run, sample_ids):
        return False
    run.bad_steps = 0
    window.add_step(losses)
    return True


def _drop_nonfinite_loss(run: _Run, loss: torch.Tensor, batch) -> bool:
    """True (on every rank) when the loss is not finite on any rank: the micro batch is skipped everywhere."""
    finite = bool(torch.isfinite(loss).item())
    if not guard.agree([not finite], run.info.device)[0]:
        return False
    run.bad_steps += 1
    run.skipped_batches += 1
    ids = guard.gather_ids(batch.sample_ids.tolist())
    step = run.step + 1
    if not finite:
        print(f"[rank {run.info.rank}] step {step}: non-finite loss {loss.item()}", file=sys.stderr, flush=True)
    run.logger.event(f"step {step}: non-finite loss; micro batch skipped on every rank, samples by rank {ids} "
                     f"({run.bad_steps} bad in a row)")
    if run.bad_steps >= run.cfg.train.max_bad_steps:
        _give_up(run, "loss")
    return True


def _skipped_update(run: _Run, sample_ids: List[int]) -> bool:
    """DeepSpeed skipped this step's update. fp16: a loss-scale overflow, the step counts (False); otherwise
    a non-finite gradient (True): the step is redone with the next batches."""
    ids = guard.gather_ids(sample_ids)
    engine, step = run.engine, run.step + 1
    if run.cfg.train.precision == "fp16":
        scale = getattr(engine.optimizer, "cur_scale", "?")
        run.logger.event(f"step {step}: fp16 loss-scale overflow, optimizer step skipped (loss scale now {scale}; "
                         f"{engine.skipped_steps} skipped so far)")
        return False
    run.bad_steps += 1
    run.logger.event(f"step {step}: non-finite gradient; optimizer step skipped on every rank (weights unchanged), "
                     f"samples by rank {ids} ({run.bad_steps} bad in a row)")
    if run.bad_steps >= run.cfg.train.max_bad_steps:
        _give_up(run, "gradient")
    return True


def _give_up(run: _Run, what: str) -> None:
    """Stop after ``max_bad_steps`` bad steps in a row, with a checkpoint of the untouched weights (when they
    are finite: an update that made the weights themselves non-finite is reported instead)."""
    train_cfg, step = run.cfg.train, run.step
    head = (f"{run.bad_steps} consecutive steps had a non-finite {what} (limit --max_bad_steps="
            f"{train_cfg.max_bad_steps}); stopping.")
    bad = guard.nonfinite_weights(run.engine, run.info.device)
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
    if run.checkpoint is None or not run.checkpoint.endswith(f"step{step}"):
        _save(run)
    raise TrainingStopped(
        f"{head} No bad step changed the weights: checkpoint {run.checkpoint} holds the weights of step {step} "
        f"(before the problem, checked finite); the skipped samples are named in the log above")


def _log_window(run: _Run, window: LogWindow) -> None:
    """One record of the steps since the last one (a collective)."""
    engine = run.engine
    extra = {"step": run.step, "lr": run.scheduler.get_last_lr()[0], "skipped_steps": int(engine.skipped_steps),
             "skipped_batches": run.skipped_batches}
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        extra["grad_norm"] = float(grad_norm)
    record = window.record(run.info.device, run.info.world_size, **extra)
    run.logger.log(record)
    run.last = {k: v for k, v in record.items() if k.startswith("loss")}


def _save(run: _Run) -> str:
    """A checkpoint of the current step on every rank; ``metrics.jsonl`` synced up to it."""
    train_cfg, step = run.cfg.train, run.step
    state = {"step": step, "loader": run.parts.loader.state_dict(), "rng": checkpoint.all_rng_states(),
             "skipped_batches": run.skipped_batches, "config": run.cfg.to_dict()}
    save_hook = run.hooks.before_save(run.engine, step)
    run.stop.saving = step
    run.checkpoint = checkpoint.save(run.engine, train_cfg.output_dir, step, state, run.cfg, train_cfg.keep_last,
                                     save_hook)
    run.stop.saving = None
    run.logger.sync()
    run.logger.event(f"checkpoint {run.checkpoint}")
    return run.checkpoint


def _save_or_stop(run: _Run) -> Optional[TrainResult]:
    """Save when due (every ``save_every``, the last step, a stop); the result when the run stops early here."""
    train_cfg, step = run.cfg.train, run.step
    stopping = train_cfg.stop_after is not None and step >= train_cfg.stop_after
    signalled = run.stop.agreed(run.info.device)  # a collective: every rank asks at every step
    if step % train_cfg.save_every == 0 or step == train_cfg.max_steps or stopping or signalled:
        _save(run)
    if step >= train_cfg.max_steps or not (stopping or signalled):
        return None
    if signalled:
        run.logger.event(f"{run.stop.cause}: stopped after step {step} with checkpoint {run.checkpoint}; "
                         f"continue with --resume auto")
        return TrainResult(train_cfg.output_dir, step, None, run.last, stopped_by=run.stop.name)
    run.logger.event(f"stopped after step {step} (--stop_after); continue with --resume auto")
    return TrainResult(train_cfg.output_dir, step, None, run.last)


def _finish(run: _Run) -> TrainResult:
    final_dir = export_final(run.engine, run.cfg, run.checkpoint, run.info)
    run.logger.event(f"final weights {final_dir}")
    return TrainResult(run.cfg.train.output_dir, run.step, final_dir, run.last)


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


def export_final(engine, cfg: RunConfig, ckpt_path: Optional[str], info) -> Optional[str]:
    """Write ``<output_dir>/final/`` (consolidated fp32 weights of any ZeRO stage, config, tokenizer: save_final)."""
    from mvptr_ds.training.weights import save_final

    state = checkpoint.consolidated_state_dict(engine, ckpt_path)
    final_dir = os.path.join(cfg.train.output_dir, "final")
    if info.is_main:
        save_final(final_dir, state, cfg)
    distributed.barrier()
    return final_dir
