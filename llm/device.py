"""The machine, used fast: the dtype training computes in, and the CPU memory allocator.

`--dtype auto`: bfloat16 where it is measurably faster, float32 elsewhere.

On CUDA bf16 autocast is the standard. On a CPU it depends on the hardware and the shapes, so
`auto` decides from the CPU's flags and, where they leave it open, from a measurement:
- AMX (`amx_bf16`, Intel Sapphire Rapids and later): bf16. Measured 1.43x fp32 on a 2-core Xeon.
- AVX512-BF16 without AMX (AMD Zen 4, some Intel): a short probe times the model's forward and
  backward in both dtypes and takes bf16 only if it is at least MIN_BF16_SPEEDUP faster. Such
  machines disagree: bf16 trained at 0.58x fp32 on one, 1.4-1.5x on the 2-core EPYC this was
  built on (torch 2.13), so no flag can say.
- neither: float32 (bf16 would be emulated).
--dtype bfloat16 or float32 forces the choice. A resumed run keeps the dtype it trained in.
"""
import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

CHOICES = ("auto", "float32", "bfloat16")
MIN_BF16_SPEEDUP = 1.1  # a near tie is not worth bf16's rounding


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing or unreadable: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((line.partition(":")[2].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def native_bf16(device: torch.device) -> bool:
    """bf16 arithmetic in hardware: CUDA, or a CPU with AVX512-BF16 or AMX."""
    return device.type == "cuda" or bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def training_dtype(setting: str, device: torch.device, flags: set[str] | None = None,
                   probe: Callable[[], float] | None = None) -> torch.dtype:
    """The dtype of --dtype `setting` on `device`. flags: the CPU's (read when not given); probe:
    measures bf16's speed-up over fp32 (bf16_speedup), called only where the flags leave it open."""
    if setting != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]
    if device.type == "cuda":
        return torch.bfloat16
    if device.type != "cpu":
        return torch.float32
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return torch.bfloat16
    if "avx512_bf16" in flags and probe is not None and probe() >= MIN_BF16_SPEEDUP:
        return torch.bfloat16
    return torch.float32


def bf16_speedup(model: torch.nn.Module, rows: int, block_size: int, repeats: int = 2) -> float:
    """fp32's time over bf16 autocast's for the model's forward and backward on `rows` windows of
    random tokens (fastest of `repeats` after a warm-up each). Gradients are cleared after; the
    global random state is not touched, and the model is in eval mode meanwhile (no dropout)."""
    device = next(model.parameters()).device
    idx = torch.randint(0, model.config.vocab_size, (rows, block_size + 1), device=device,
                        generator=torch.Generator(device).manual_seed(0))

    def seconds(dtype):
        times = []
        for _ in range(1 + repeats):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            times.append(time.perf_counter() - start)
        return min(times[1:])

    was_training = model.training
    model.eval()
    try:
        return seconds(torch.float32) / seconds(torch.bfloat16)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


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
