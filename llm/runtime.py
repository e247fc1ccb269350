"""What `auto` means for the device and the dtype: decided here only, for every command.

    device   auto: cuda (the process's local rank) when CUDA is available, else cpu
    training auto: bfloat16 on CUDA and on CPUs with AMX; float32 on CPUs without AVX512-BF16;
             in between (AVX512-BF16 without AMX) bfloat16 only where a probe finds it at least
             MIN_BF16_SPEEDUP faster for this model shape, a verdict cached per machine and shape
             so that the same command on the same machine always decides the same way
    inference auto: bfloat16 on CUDA, float32 on CPU (the exact reference; bf16 is opt-in there)

Each choice comes with its reason (`Choice.reason`), which the commands print at start, with the
number of CPU threads torch uses. Also here: the CPU's flags and glibc's allocator setting.
"""
import ctypes
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_BF16_SPEEDUP = 1.1  # a near tie is not worth bf16's rounding


@dataclass
class Choice:
    value: object
    reason: str

    def __str__(self):
        name = str(self.value).removeprefix("torch.")
        return f"{name} ({self.reason})"


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


def choose_device(setting: str = "auto", local_rank: int = 0) -> Choice:
    """--device: auto, cpu, cuda or cuda:N, checked."""
    if setting == "auto":
        if torch.cuda.is_available():
            return Choice(torch.device(f"cuda:{local_rank}"), "auto: CUDA is available")
        return Choice(torch.device("cpu"), "auto: no CUDA device")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise UserError(f"--device {setting}: not a device (auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {setting}: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {setting}: only cpu and cuda are supported")
    return Choice(device, "as asked")


def inference_dtype(setting: str, device: torch.device) -> Choice:
    """--dtype for loading, sampling, evaluation and serving."""
    if setting != "auto":
        return Choice(dtype_named(setting), "as asked")
    if device.type == "cuda":
        return Choice(torch.bfloat16, "auto: CUDA")
    return Choice(torch.float32, "auto: float32 on CPU")


def training_dtype(setting: str, device: torch.device, flags: set[str] | None = None,
                   probe: Callable[[], float] | None = None) -> Choice:
    """--dtype for training. flags: the CPU's (read when not given); probe: bf16's speed-up over
    fp32 for this run (see cached_probe), called only where the flags leave it open."""
    if setting != "auto":
        return Choice(dtype_named(setting), "as asked")
    if device.type == "cuda":
        return Choice(torch.bfloat16, "auto: CUDA")
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return Choice(torch.bfloat16, "auto: the CPU has AMX")
    if "avx512_bf16" not in flags or probe is None:
        return Choice(torch.float32, "auto: the CPU has no native bf16 matrix products")
    speedup = probe()
    dtype = torch.bfloat16 if speedup >= MIN_BF16_SPEEDUP else torch.float32
    return Choice(dtype, f"auto: a forward and backward of this model ran {speedup:.2f}x as fast in bfloat16 as "
                         f"in float32 on this CPU (bfloat16 needs {MIN_BF16_SPEEDUP}x)")


def dtype_named(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def threads() -> str:
    return f"{torch.get_num_threads()} CPU threads (torch's default: one per physical core)"


def cached_probe(cache_dir: Path, shape: dict, measure: Callable[[], float]) -> Callable[[], float]:
    """The bf16 probe with its verdict remembered per machine and model shape (in cache_dir), so
    that a noisy machine cannot decide differently from one launch to the next."""
    identity = {"cpu": cpu_name(), "flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"}),
                "threads": torch.get_num_threads(), "torch": torch.__version__, **shape}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / "bf16-probe" / f"{key}.json"

    def probe() -> float:
        try:
            return float(json.loads(path.read_text())["speedup"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        speedup = measure()
        try:
            from llm.files import write_json

            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {**identity, "speedup": speedup, "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
        except OSError:
            pass  # an unwritable cache measures again next time; the run goes on
        return speedup

    return probe


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
    """Ask glibc's allocator to keep freed memory for reuse: by default it returns large blocks to
    the system, so every training step maps and zeroes its activations' pages again (most of a
    small model's system time). Returns whether the setting took (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # another C library (musl) has no mallopt
        return False
