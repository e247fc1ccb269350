"""Our 4-bit matrix product for CPUs with AVX512-VNNI (int4_kernel.cpp says why and how).

torch.utils.cpp_extension compiles int4_kernel.cpp once per machine (about half a minute, with
ninja and the C++ compiler torch.compile on CPU needs too) into torch's extensions folder
(TORCH_EXTENSIONS_DIR), and later processes load it from there. `status()` says whether it is in
use and why: not on a CPU without the instructions, not where the build fails, not with
LLM_INT4_KERNEL=pytorch (for comparisons); the commands print it at start. Where it is not,
int4 layers use PyTorch's kernel (llm/infer/quantize.py). The product is a C++ custom op, so a
step compiled ahead of time (llm/infer/aot.py) calls it from its C++ too.
"""
import functools
import os
import shutil
from pathlib import Path

import torch

from llm.files import lock
from llm.runtime import Choice, cpu_flags

NEEDED_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"}
COMPILER_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                  "-mf16c", "-mfma"]  # -fopenmp: at::parallel_for's threads are torch's OpenMP ones
GROUP = 32  # inputs per scale and low
OUTPUTS_PER_TILE = 4
NAME = "llm_int4"  # the library and its build folder (the ops: TORCH_LIBRARY(llm_int4) in the .cpp)


@functools.cache
def status() -> Choice:
    """Choice("vnni", why) where the kernel is built and loaded, else Choice("pytorch", why not)."""
    if os.environ.get("LLM_INT4_KERNEL") == "pytorch":
        return Choice("pytorch", "as LLM_INT4_KERNEL=pytorch asks")
    missing = NEEDED_FLAGS - cpu_flags()
    if missing:
        return Choice("pytorch", f"this CPU lacks {', '.join(sorted(missing))}")
    try:
        build()
    except Exception as e:  # no compiler, no ninja, a failed build: decoding goes on with PyTorch's
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return Choice("pytorch", f"llm/infer/int4_kernel.cpp did not build: {first_line}")
    torch.library.register_fake("llm_int4::int4_mm")(  # its output's shape, for torch.compile and export
        lambda x, weight, scale, low: x.new_empty(x.size(0), weight.size(0)))
    return Choice("vnni", "ours, llm/infer/int4_kernel.cpp: the CPU has AVX512-VNNI")


def build():
    """cpp_extension's build (or load) of the kernel, one process at a time. cpp_extension marks a
    build in progress with a file that a killed build (kill -9, a full disk) leaves behind, and
    then waits for it forever; our flock is released by the kernel whatever ends its holder, so
    under it such a file can only be stale."""
    from torch.utils import cpp_extension

    ninja_on_path()
    folder = Path(cpp_extension._get_build_directory(NAME, verbose=False))  # makes it too
    with lock(folder / "llm.lock", wait=True):
        (folder / "lock").unlink(missing_ok=True)
        cpp_extension.load(name=NAME, sources=[str(Path(__file__).with_name("int4_kernel.cpp"))],
                           extra_cflags=COMPILER_FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)


def ninja_on_path():
    """cpp_extension runs `ninja` from PATH: the ninja package's own where its folder is not on it
    (a virtual environment's python run without activating it)."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def available() -> bool:
    return status().value == "vnni"


def supports(weight: torch.Tensor) -> bool:
    out, width = weight.shape
    return (weight.device.type == "cpu" and width % (2 * GROUP) == 0 and out % OUTPUTS_PER_TILE == 0
            and bool(weight.abs().max() < 6e4))  # scale and low fit fp16


def pack(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in 0..15 -> the kernel's uint8 (N, K/2): per tile of 4 outputs and chunk of 64
    inputs, each output's 32 bytes, input j in the low nibble and j + 32 in the high one."""
    n, k = q.shape
    chunks = q.to(torch.uint8).view(n // OUTPUTS_PER_TILE, OUTPUTS_PER_TILE, k // 64, 64)
    pairs = chunks[..., :32] | (chunks[..., 32:] << 4)
    return pairs.transpose(1, 2).contiguous().view(n, k // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """pack's inverse: (N, K/2) uint8 -> q (N, K) uint8."""
    n, half = packed.shape
    pairs = packed.view(n // OUTPUTS_PER_TILE, half // 32, OUTPUTS_PER_TILE, 32).transpose(1, 2)
    return torch.cat([pairs & 15, pairs >> 4], -1).reshape(n, 2 * half)


def int4_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(M, K) x times the packed weight's transpose: (M, N) fp32 (activations quantized per 32 inputs)."""
    return torch.ops.llm_int4.int4_mm(x.float().contiguous(), weight, scale, low)
