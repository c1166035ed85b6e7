"""What the machine runs fast and what it has, decided from what it is rather than assumed.

bf16 is a large win only where the hardware multiplies bf16 natively: NVIDIA GPUs from Ampere on,
and x86 CPUs with AMX-BF16 or AVX512-BF16. Elsewhere (an AVX2-only CPU, say) PyTorch emulates it
and bf16 runs several times *slower* than fp32 (measurements: benchmarks/RESULTS.md). So
`precision="auto"` asks the hardware.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from reslab.errors import ReslabError

PRECISIONS = ("fp32", "bf16", "auto")
# Device types reslab runs on; `--device` takes one, with an index for cuda (cuda:1).
DEVICE_TYPES = ("cpu", "cuda", "mps")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    if os.environ.get("RESLAB_CPU_BF16") in ("0", "1"):  # an override for odd platforms
        return os.environ["RESLAB_CPU_BF16"] == "1"
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cpu_has_vnni() -> bool:
    """int8 dot products in one instruction (AVX512-VNNI, AVX-VNNI, AMX-INT8). Without them an x86 int8
    kernel sums u8 x s8 pairs in int16 (vpmaddubsw), which can saturate: see reslab.inference.quantize."""
    if os.environ.get("RESLAB_CPU_VNNI") in ("0", "1"):  # an override, as for bf16
        return os.environ["RESLAB_CPU_VNNI"] == "1"
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(spec: str) -> torch.device:
    """The device `spec` names (cpu, cuda, cuda:N, mps), refused with the reason when this machine
    has no such device: before a run starts, not at its first tensor."""
    kind = str(spec).split(":", 1)[0].strip()
    if kind not in DEVICE_TYPES:
        raise ReslabError(f"--device {spec}: unknown device type {kind!r}; use one of {', '.join(DEVICE_TYPES)} "
                          "(cuda:N for the N-th GPU)")
    try:
        device = torch.device(str(spec).strip())
    except (RuntimeError, ValueError):
        raise ReslabError(f"--device {spec} is not a device name; give cpu, cuda or cuda:N (N a GPU index)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ReslabError(f"--device {spec}: no CUDA device is available; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ReslabError(f"--device {spec}: only {count} CUDA device{'s' if count > 1 else ''} visible "
                              f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''}); give one of those")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ReslabError(f"--device {spec}: no Apple MPS device is available; use --device cpu")
    return device


def bf16_is_fast(device: str | torch.device = "cpu") -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """"fp32" or "bf16": `auto` takes bf16 only where this hardware runs it fast."""
    if precision not in PRECISIONS:
        raise ReslabError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def available_memory() -> int | None:
    """Bytes of RAM this process can still take (MemAvailable, capped by a cgroup v2 limit inside a
    container), or None where the system does not say."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            available = int(limit) if available is None else min(available, int(limit))
    except (OSError, ValueError):
        pass
    return available


def format_bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_memory(need: int, what: str, advice: Callable[[int], str]) -> None:
    """Refuse `need` bytes of RAM for `what` before allocating them when the machine lacks them;
    `advice(available_bytes)` says what would fit. A no-op where the available memory is unknown."""
    available = available_memory()
    if available is not None and need > available:
        raise ReslabError(f"{what} needs {format_bytes(need)} of memory but {format_bytes(available)} is available; "
                          f"{advice(available)}")


def describe() -> dict:
    """A JSON-able description of the machine, for benchmark records and run configs."""
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_native": cpu_has_fast_bf16(),
        "cpu_int8_vnni": cpu_has_vnni(),
        # The instruction sets every speed figure depends on, recorded with it.
        "cpu_flags": sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                           "amx_bf16", "amx_int8", "amx_tile"}),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def train_channels_last(precision: str, device: str | torch.device = "cpu") -> bool:
    """Whether training runs channels_last by default: yes on the CPU and on CUDA, at every
    precision, because it was measured faster everywhere it was measured (benchmarks/RESULTS.md,
    "Training step": ResNet-20 at batch 128, fp32 on AVX2 and AVX-512, bf16 on AVX-512-BF16);
    other devices (mps) keep NCHW. `--no-channels-last` turns it off."""
    return torch.device(device).type in ("cpu", "cuda")
