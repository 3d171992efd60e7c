"""What the benchmarks share: the repository root, the machine they ran on and its load, process memory, and its
fp32 matmul rate."""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def repo_relative(arg: str) -> str:
    """An argument naming a path inside the repository, relative to it: recorded commands name no machine's paths."""
    path = Path(arg)
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else arg


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    info = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import lightning
        import peft
        import transformers

        info.update(
            transformers=transformers.__version__, peft=peft.__version__, lightning=lightning.__version__
        )
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def vm_hwm_mib(pid: int) -> float | None:
    """Peak RSS of a running process (Linux), so a child killed for memory still leaves a lower bound."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def matmul_gflops(rows: int, inner: int, cols: int, seconds: float = 1.0, warmup: int = 5) -> float:
    """This machine's fp32 matmul rate at one shape, [rows, inner] x [inner, cols], with torch's current threads:
    the ceiling the benchmarks measure their matmul time against. The weight is laid out as ``nn.Linear`` keeps
    it ([cols, inner], multiplied transposed), like the model's own projections."""
    import torch
    import torch.nn.functional as F

    x, weight = torch.randn(rows, inner), torch.randn(cols, inner)
    for _ in range(warmup):
        F.linear(x, weight)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        F.linear(x, weight)
        count += 1
    return 2 * rows * inner * cols * count / (time.perf_counter() - start) / 1e9
