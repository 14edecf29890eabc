"""Non-finite guard: no NaN/inf loss or gradient ever reaches the weights, and every rank agrees.

Loss: checked after the forward pass; the flag is all-reduced (MAX), so when any rank's loss is not finite
every rank drops that micro batch before backward. Gradients: checked inside ``engine.step()`` before the
optimizer applies anything, on the reduced (and, with ZeRO, partitioned) gradients, with the verdict
all-reduced across ranks:

- ZeRO-1/2: DeepSpeed's own overflow check (``has_overflow`` over the partitioned gradients) is switched on
  for every precision (``check_grad_overflow``; by default fp32/bf16 runs skip it);
- ZeRO-3: DeepSpeed computes the global gradient norm before each step and skips the step when it is
  not finite, in every precision;
- stage 0 (fp32): the client optimizer's ``step`` is wrapped by :func:`guard_client_optimizer`, which also
  does the clipping (one multi-tensor norm for both).

A skipped step leaves the weights, the Adam moments and the schedule unchanged and increments the engine's
``skipped_steps`` (fp16 loss-scale overflows are counted there too); the trainer reports both kinds.
"""
from __future__ import annotations

import types
from typing import List

import torch
import torch.distributed as dist


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); the message says why and what to do."""


def agree(flags: List[bool], device: torch.device) -> List[bool]:
    """Element-wise OR of ``flags`` over all ranks (one all-reduce; every rank must call it)."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def clip_and_check(params, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to total L2 norm ``max_norm`` (0: no clipping) and return that norm.

    One multi-tensor pass (``torch.nn.utils.clip_grad_norm_``, foreach): the same rule as DeepSpeed's
    ``clip_grad_norm_`` (scale by ``max_norm / (norm + 1e-6)`` when below 1) without its per-tensor loop. A
    NaN or inf in any gradient makes the norm non-finite (so does a finite gradient whose squares overflow
    fp32, above ~1e19: such a step would be clipped to noise).
    """
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in grads])))


def guard_client_optimizer(optimizer: torch.optim.Optimizer, device: torch.device,
                           max_norm: float) -> torch.optim.Optimizer:
    """Clip, then make ``optimizer.step`` a no-op when any rank has a non-finite gradient (``overflow``).

    For ZeRO stage 0 in fp32, where DeepSpeed calls the client optimizer directly (the engine's own clipping
    is then switched off, see ``trainer.build_engine``): the engine reads ``optimizer.overflow`` after the
    step, counts a skipped step and holds the schedule, and logs ``optimizer._global_grad_norm``. The
    gradients are already all-reduced here, so the norm and the verdict are the same on every rank.
    """
    inner = optimizer.step

    def step(self, *args, **kwargs):
        norm = clip_and_check([p for g in self.param_groups for p in g["params"]], max_norm)
        self.overflow = agree([not bool(torch.isfinite(norm))], device)[0]
        self._global_grad_norm = float(norm)
        if self.overflow:
            return None
        return inner(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = types.MethodType(step, optimizer)  # bound, as LR schedulers expect
    return optimizer


def install(engine) -> None:
    """Switch on DeepSpeed's pre-step gradient check where it is off by default (ZeRO-1/2)."""
    if engine.zero_optimization_stage() in (1, 2) and hasattr(engine.optimizer, "check_grad_overflow"):
        engine.optimizer.check_grad_overflow = True


def nonfinite_weights(engine, device: torch.device):
    """``(bad, total, first name)`` when any parameter holds a NaN/inf on any rank, else None. Collective.

    Reads each rank's own copy (with ZeRO-3, its partition ``ds_tensor``), so the verdict covers the whole model.
    """
    names, flags = [], []
    for name, p in engine.module.named_parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        names.append(name)
        flags.append(t.numel() > 0 and not bool(torch.isfinite(t).all()))
    flags = agree(flags, device)
    bad = [n for n, f in zip(names, flags) if f]
    return (len(bad), len(names), bad[0]) if bad else None


def gather_ids(ids: List[int]) -> List[List[int]]:
    """Every rank's sample ids (for the log line of a skipped step). Collective."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [ids]
    out: List = [None] * dist.get_world_size()
    dist.all_gather_object(out, ids)
    return out
