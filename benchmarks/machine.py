"""The machine side of a benchmark: device synchronisation, peak memory, the matmul ceiling and datasheet peak
that MFU is measured against, and the record of the machine and software a result was measured on."""
from __future__ import annotations

import datetime
import os
import platform
import socket
import time
from typing import Dict, Optional

import torch

# Dense peak TFLOP/s from the vendors' datasheets (no sparsity), by (name fragment, precision).
DATASHEET_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory(device: torch.device) -> Dict[str, object]:
    """CUDA: max_memory_allocated since the last reset; CPU: peak resident set size of this process."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "cuda_max_allocated"}
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        return {"peak_memory_bytes": hwm, "peak_memory_kind": "cpu_peak_rss"}
    except (OSError, StopIteration):
        import resource
        return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_memory_kind": "cpu_max_rss_lifetime"}


def measure_matmul_peak(device: torch.device, precision: str, seconds: float = 2.0, min_trials: int = 8) -> float:
    """Best dense matmul TFLOP/s over square products (8192 on CUDA, 1024 on CPU): at least ``min_trials``
    timed products and as many as fit in ``seconds``. The best, not the mean: on a shared machine a trial
    during which the process was descheduled says nothing about the ceiling."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = DTYPES[precision] if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, trials, deadline = 0.0, 0, time.perf_counter() + seconds
    a @ b
    while trials < min_trials or time.perf_counter() < deadline:
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e12)
        trials += 1
    return best


def datasheet_peak(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v.get(precision) for k, v in DATASHEET_TFLOPS.items() if k in name), None)



def environment(device: torch.device) -> Dict[str, object]:
    import deepspeed

    env = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
           "torch": torch.__version__, "deepspeed": deepspeed.__version__, "cpu_threads": torch.get_num_threads(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            env["cpu"] = platform.processor()
    return env


def add_mfu(result: Dict[str, object], peak: Optional[float], measured: Optional[float]) -> None:
    result["mfu"] = result["tflops"] / peak if peak else None
    result["mfu_measured_peak"] = result["tflops"] / measured if measured else None
