"""The machine, used fast: the dtype training computes in, and the CPU memory allocator.

`--dtype auto`: bfloat16 where it is fast, float32 elsewhere.

On CUDA bf16 autocast is the standard. On a CPU it pays only with AMX, Intel's matrix units
(Sapphire Rapids and later): measured with the same shapes, --dtype bfloat16 trained 1.43x
faster than fp32 on a Xeon with AMX, but 0.58x on an AMD EPYC with AVX512-BF16 and no AMX,
where PyTorch's bf16 matmuls run slower than its fp32 ones. So `auto` picks bf16 on a CPU only
when it has the `amx_bf16` flag; --dtype bfloat16 still forces it.
"""
import ctypes
import sys
from pathlib import Path

import torch

CHOICES = ("auto", "float32", "bfloat16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing or unreadable: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def training_dtype(setting: str, device: torch.device, flags: set[str] | None = None) -> torch.dtype:
    """The dtype of --dtype `setting` on `device` (flags: the CPU's, read when not given)."""
    if setting != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and "amx_bf16" in (cpu_flags() if flags is None else flags):
        return torch.bfloat16
    return torch.float32


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc accepts on 64-bit systems


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it to the system.

    By default glibc serves large blocks by mmap and trims the heap's free top back to the
    system, so every training step allocates its activations afresh and the kernel maps and
    zeroes their pages again: 31,000 page faults and 75 ms of system time in a 540 ms step of a
    5M-parameter model on a 2-core CPU, measured. With blocks up to 32 MB taken from the heap and
    no trimming, the same step has 600. Returns whether the setting took (glibc on Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # another C library (musl) has no mallopt
        return False
