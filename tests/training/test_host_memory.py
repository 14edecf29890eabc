"""training/host_memory.py: after the policy a large tensor freed and allocated again reuses heap pages instead of a
fresh mmap (glibc's mallinfo2 counts mmapped bytes); the user's MALLOC_* variables win. Subprocesses: the
policy is process-wide."""
import ctypes
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

PROBE = textwrap.dedent("""
    import ctypes, sys
    import torch
    from mvptr_ds.training import host_memory

    class Info(ctypes.Structure):  # struct mallinfo2 (glibc >= 2.33): ten size_t fields
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    applied = host_memory.keep_freed_memory() if sys.argv[1] == "policy" else False
    before = libc.mallinfo2().hblkhd
    x = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MiB: above glibc's largest mmap threshold
    during = libc.mallinfo2().hblkhd
    print(applied, during - before)
""")


def probe(mode, **env):
    import os
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        if name not in env:
            full.pop(name, None)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, mmapped = out.stdout.split()
    return applied == "True", int(mmapped)


def glibc_with_mallinfo2() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return False
    return True


pytestmark = pytest.mark.skipif(not glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")


def test_large_tensors_come_from_the_heap_under_the_policy():
    applied, mmapped = probe("policy")
    assert applied and mmapped == 0


def test_without_the_policy_glibc_maps_large_tensors():  # the probe can see the difference
    applied, mmapped = probe("none")
    assert not applied and mmapped >= 64 << 20


def test_the_users_malloc_variables_win():
    applied, mmapped = probe("policy", MALLOC_MMAP_MAX_="65536")
    assert not applied and mmapped >= 64 << 20
