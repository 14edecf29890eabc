"""Every Triton kernel of mvptr_ds compiles for the GPUs users run, checked here without a GPU.

Each launch the CUDA wrappers make (``mvptr_ds.kernels.aot.launches()``: every kernel x fp32/bf16/fp16 x the
constexprs the wrappers choose on CUDA, for the model presets) is compiled ahead of time with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` for sm_90 (H100/H200) and sm_80 (A100), through
all of Triton's stages: ttir, ttgir, llir, ptx and cubin (ptxas shipped with Triton). The test fails if any
launch does not compile, if its shared memory exceeds what one block may use on that GPU, or if a
``@triton.jit`` function of the kernel modules is neither compiled as a launch nor called by one.

Compilation runs in worker processes (one per core, at most 8) without ``TRITON_INTERPRET``, so the kernels
are the compiled JITFunctions even where other test modules interpret them. Results are cached by Triton under
``.cache/triton_aot`` (the key covers the kernel source and the jit functions it calls, the signature, Triton
and ptxas): a changed kernel is always compiled again; unchanged ones come from the cache on later runs. With
an empty cache the 136 compilations take about 5 CPU-minutes (40% of it the fp32 attention kernels, whose dot
products are FMA loops rather than tensor-core instructions); with the cache, seconds.
"""
import concurrent.futures
import multiprocessing
import os
import re

import pytest

pytest.importorskip("triton", reason="triton is not importable")

from conftest import REPO  # noqa: E402

from mvptr_ds.kernels import aot  # noqa: E402

CACHE = REPO / ".cache" / "triton_aot"


@pytest.fixture(scope="module")
def results(monkeypatch_module):
    """{(launch, arch name): compile_report} for every launch and target, compiled in parallel."""
    monkeypatch_module.delenv("TRITON_INTERPRET", raising=False)  # read by the workers at spawn
    monkeypatch_module.setenv("TRITON_CACHE_DIR", str(CACHE))
    jobs = [(launch, arch) for launch in aot.launches() for arch in aot.ARCHS]
    # The fp32 attention kernels (FMA dot products, no tensor cores) take most of the time: start them first.
    jobs.sort(key=lambda j: (j[0].module != "triton_attention" or "fp32" not in j[0].tag, j[0].kernel))
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {job: pool.submit(aot.compile_report, job[0], aot.ARCHS[job[1]]) for job in jobs}
        return {job: f.result() for job, f in futures.items()}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_every_launch_compiles_to_cubin_for_sm90_and_sm80(results):
    failed = [f"{launch.name} for {arch}: {r['error']}" for (launch, arch), r in results.items() if "error" in r]
    assert not failed, f"{len(failed)} of {len(results)} compilations failed:\n" + "\n\n".join(failed)
    for (launch, arch), r in results.items():
        assert r["stages"] == ["ttir", "ttgir", "llir", "ptx", "cubin"] and r["cubin_bytes"] > 0, (launch.name, r)
        assert r["ptx_target"] == {"sm_90": "sm_90a", "sm_80": "sm_80"}[arch], (launch.name, arch, r)


def test_shared_memory_fits_one_block(results):
    over = [f"{launch.name} for {arch}: {r['shared']} bytes > {aot.MAX_SHARED[aot.ARCHS[arch]]}"
            for (launch, arch), r in results.items() if r.get("shared", 0) > aot.MAX_SHARED[aot.ARCHS[arch]]]
    assert not over, "\n".join(over)


def test_every_jit_function_is_covered(results):
    """A new @triton.jit kernel without a launch in aot.launches() fails here; helpers count when compiled into
    a launched kernel."""
    found = set(aot.jit_functions())
    launched = {f"{launch.module}.{launch.kernel}" for launch, _ in results}
    called = {c for r in results.values() for c in r.get("callees", ())}
    assert found, "no @triton.jit functions found in mvptr_ds.kernels"
    assert launched <= found, f"launches of unknown kernels: {sorted(launched - found)}"
    missing = sorted(found - launched - called)
    assert not missing, f"jit functions without AOT coverage (add their launches to aot.launches()): {missing}"
    for module in aot.MODULES:  # every module of the package that uses triton.jit is listed
        assert any(name.startswith(module + ".") for name in found), module
    kernel_files = {p.stem for p in (REPO / "mvptr_ds" / "kernels").glob("*.py")
                    if re.search(r"^@triton\.jit", p.read_text(), re.M)}
    assert kernel_files == set(aot.MODULES), f"modules with @triton.jit vs aot.MODULES: {kernel_files}"
