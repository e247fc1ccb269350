"""The machine, used fast: --dtype auto picks bf16 only where it is fast; freed memory is kept for reuse."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.device import bf16_speedup, cpu_flags, cpu_name, training_dtype
from tests.helpers import tiny_model

CPUINFO = "processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: Test CPU 9000 @ 3.0GHz\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbogomips\t: 4000\n"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(vendor="GenuineIntel", extra="avx512_bf16 amx_bf16 amx_tile"))
    assert {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} <= cpu_flags(path)
    assert cpu_flags(tmp_path / "missing") == set()  # not Linux, or no /proc: no flags, no error
    assert cpu_name(path) == "Test CPU 9000 @ 3.0GHz"
    assert cpu_name(tmp_path / "missing") == "unknown CPU"


def test_auto_picks_bf16_only_with_amx_on_cpu():
    cpu = torch.device("cpu")
    assert training_dtype("auto", cpu, {"avx512f", "avx512_bf16", "amx_bf16"}) == torch.bfloat16
    assert training_dtype("auto", cpu, {"avx512f", "avx512_bf16"}) == torch.float32  # AVX512-BF16 alone is slower
    assert training_dtype("auto", cpu, set()) == torch.float32
    assert training_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert training_dtype("bfloat16", cpu, set()) == torch.bfloat16  # an explicit choice is kept
    assert training_dtype("float32", torch.device("cuda")) == torch.float32


def test_auto_measures_where_the_flags_leave_it_open():
    """AVX512-BF16 without AMX: bf16 only if the probe finds it at least 1.1x faster; elsewhere
    the flags decide and the probe is never run."""
    cpu, calls = torch.device("cpu"), []

    def probe(speedup):
        return lambda: calls.append(speedup) or speedup

    assert training_dtype("auto", cpu, {"avx512_bf16"}, probe(1.45)) == torch.bfloat16
    assert training_dtype("auto", cpu, {"avx512_bf16"}, probe(1.05)) == torch.float32  # a near tie
    assert training_dtype("auto", cpu, {"avx512_bf16"}, probe(0.58)) == torch.float32
    assert len(calls) == 3
    assert training_dtype("auto", cpu, {"avx512_bf16", "amx_bf16"}, probe(0.5)) == torch.bfloat16
    assert training_dtype("auto", cpu, {"avx2"}, probe(9.0)) == torch.float32
    assert training_dtype("float32", cpu, {"avx512_bf16"}, probe(9.0)) == torch.float32
    assert training_dtype("auto", torch.device("cuda"), set(), probe(0.1)) == torch.bfloat16
    assert len(calls) == 3


def test_bf16_probe_leaves_the_model_as_it_was(seed):
    model = tiny_model(seed, dtype=torch.float32).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    speedup = bf16_speedup(model, rows=2, block_size=16, repeats=1)
    assert speedup > 0 and speedup != float("inf")
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())  # the run's random stream is untouched


PAGE_FAULTS = """
import ctypes, resource, sys, torch
from llm.device import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)  # glibc's initial settings, without the thresholds it
libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)  # may have raised already during start-up
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():  # like a training step: several large buffers live at once, then all are freed
    buffers = [torch.empty(4 << 20).fill_(1.0) for _ in range(6)]  # 6 x 16 MB
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_without_page_faults():
    root = Path(__file__).resolve().parent.parent
    faults = {mode: float(subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], cwd=root, capture_output=True,
                                         text=True, check=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 6 * 4096 * 0.9  # every buffer's 4,096 pages mapped again, every step
    assert faults["keep"] < 200
