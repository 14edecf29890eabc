"""Leftovers: DeepSpeed's shared-memory all-reduce buffers, and temporary files of killed writers.

Shared memory. On CPU, DeepSpeed's ``shm_comm`` op (``deepspeed/ops/csrc/cpu/comm/shm.cpp``, loaded by
``deepspeed.comm.torch.TorchBackend`` when the process group starts) creates one POSIX shared-memory object per
rank when all ranks are on one machine (``LOCAL_SIZE == WORLD_SIZE``, as the ``deepspeed`` launcher sets):
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (66 MB), and maps every
rank's object. It never unlinks them, so every run leaves them behind. Once every rank has mapped every
buffer (a barrier after the process group is up) the names are no longer needed: each rank unlinks its own
right away (:func:`unlink_shm_buffer`). The mappings stay valid, and the memory is freed when the last rank
exits, however it exits (an error, a signal, SIGKILL). Other runs' buffers carry another address or port and
are never touched.

Temporary files. Files are written as ``<name>.tmp<pid>`` and renamed into place; a writer killed in between
leaves the temporary behind. Under the output-folder lock (``lock``) no other run can be writing, so
:func:`remove_stale_temporaries` deletes them when a run starts.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import List, Optional

SHM_DIR = "/dev/shm"
_TMP = re.compile(r"\.tmp\d+$")


def shm_buffer_name(rank: int, addr: Optional[str] = None, port: Optional[str] = None) -> str:
    """The name DeepSpeed's shm op gives rank ``rank``'s buffer (``shm_initialize``: uid, address, port, rank)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def shm_buffers(addr: str, port: str) -> List[str]:
    """Paths of the shm buffers of the run with this master address and port that exist now."""
    if not os.path.isdir(SHM_DIR):
        return []
    prefix = shm_buffer_name(0, addr, port)[:-1]
    return sorted(os.path.join(SHM_DIR, n) for n in os.listdir(SHM_DIR)
                  if n.startswith(prefix) and n[len(prefix):].isdigit())


def unlink_shm_buffer(rank: int) -> bool:
    """Unlink this rank's buffer (call when every rank has mapped all of them). True if there was one."""
    name = shm_buffer_name(rank)
    try:
        import _posixshmem
        _posixshmem.shm_unlink("/" + name)
        return True
    except ImportError:  # not a POSIX system with shm_open: DeepSpeed's op does not create buffers there
        return False
    except FileNotFoundError:
        return False


def remove_stale_temporaries(output_dir: str) -> List[str]:
    """Delete ``*.tmp<pid>`` files (and directories) of killed writers in a run folder; returns their paths.

    Looks where the trainer writes: the folder, ``final/``, ``checkpoints/`` and each ``checkpoints/step<N>/``.
    Call only while holding the folder's lock.
    """
    folders = [output_dir, os.path.join(output_dir, "final"), os.path.join(output_dir, "checkpoints")]
    root = folders[-1]
    if os.path.isdir(root):
        folders += [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.startswith("step")]
    removed = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if _TMP.search(name):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
                removed.append(path)
    return sorted(removed)
