"""Host allocator policy for training on the CPU: keep freed memory for reuse instead of returning it.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back
with ``munmap`` when freed. A training step on the CPU allocates the same large tensors every step (each
parameter's gradient: 264 MB for the 86,051 x 768 word-embedding table at the paper's size, the decoders'
gradients, the optimizer's temporaries), so every step pays the kernel's page faults and zero-filling for
about a gigabyte of fresh pages. With ``M_MMAP_MAX = 0`` and the largest trim threshold mallopt accepts
(2 GiB), glibc serves them from its heap and keeps what is freed: the next step reuses the same pages. The
process then keeps its peak resident memory until it exits, which a training process does anyway.

Its effect on a whole training step is not yet a recorded benchmark (the machines it was written on were shared;
a micro-benchmark of the word-embedding backward alone ran about 2x faster with it). The environment variables
``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_``, when set, win (glibc reads them at start-up and this module
leaves them alone).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2 ** 31 - 1  # the largest value mallopt takes (an int): trim only above 2 GiB of free top
ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")

_applied = False


def keep_freed_memory() -> bool:
    """Apply the policy once per process (glibc only); returns whether it is in force.

    Not applied when the user set either glibc variable, or when the C library is not glibc (musl, macOS).
    """
    global _applied
    if _applied:
        return True
    if any(name in os.environ for name in ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError off glibc)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
