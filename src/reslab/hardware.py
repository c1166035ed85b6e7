"""What the machine runs fast, decided from what it is rather than assumed.

bf16 is a large win only where the hardware multiplies bf16 natively: NVIDIA GPUs from Ampere on,
and x86 CPUs with AMX-BF16 or AVX512-BF16. Elsewhere (an AVX2-only CPU, say) PyTorch emulates it
and bf16 runs several times *slower* than fp32 (measured on a 2-core AVX2 EPYC: resnet20
inference 322 img/s fp32 against 48 img/s bf16). So `precision="auto"` asks the hardware.
"""

from __future__ import annotations

import functools
import os

import torch

from reslab.errors import ReslabError

PRECISIONS = ("fp32", "bf16", "auto")


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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def describe() -> dict:
    """A JSON-able description of the machine, for benchmark records and run configs."""
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_native": cpu_has_fast_bf16(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def train_channels_last(precision: str, device: str | torch.device = "cpu") -> bool:
    """Whether training runs channels_last by default: with bf16 or on a GPU, where kernels want it.

    On the 2-core AVX2 CPU in fp32 a resnet20 step at batch 128 also measured 1.16-1.24x faster
    channels_last (`reslab bench --mode train --channels-last` against `--no-channels-last`: 345
    against 297 img/s, 277 against 224), but it changes the arithmetic order, and the recorded
    default-run and experiment results were made in NCHW; `--channels-last` opts in.
    """
    return precision == "bf16" or torch.device(device).type == "cuda"
