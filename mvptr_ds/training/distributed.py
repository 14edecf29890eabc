"""Process-group setup and the few collective helpers the training loop needs.

A plain ``python -m mvptr_ds.run`` has no launcher environment; DeepSpeed's ``init_distributed`` would then
try MPI. ``setup`` fills in a single-process environment (rank 0 of 1, a free loopback port) first, so the
same code path serves one process, the ``deepspeed`` launcher and ``torchrun``. Once the group is up, each
rank unlinks the shared-memory buffer DeepSpeed's CPU all-reduce created for it (``cleanup``), so no run leaves
one in ``/dev/shm``.
"""
from __future__ import annotations

import datetime
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist

from mvptr_ds.training import cleanup

_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_FILLED_IN = False  # setup wrote the launcher variables itself (a plain single-process run)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on CUDA) and return this rank's info."""
    global _FILLED_IN
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        _FILLED_IN = True
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    missing = [v for v in _LAUNCH_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"incomplete launcher environment: {', '.join(missing)} not set")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed calls it; every rank would print this once, and there is nothing for the user to do about it.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)

    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
        barrier()  # every rank has mapped every rank's shm buffer: the names can go
        cleanup.unlink_shm_buffer(dist.get_rank())
    local_rank = int(os.environ["LOCAL_RANK"])
    acc = get_accelerator()
    if acc.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(acc.device_name())
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device)


def launched() -> bool:
    """True in a process started by a launcher (deepspeed, torchrun: ``LOCAL_RANK`` set by it, not by setup)."""
    return "LOCAL_RANK" in os.environ and not _FILLED_IN


def mean_over_ranks(values: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, float]:
    """Average scalar tensors over all ranks (every rank must call this with the same keys)."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
