"""What `auto` means (device, dtypes), decided once and the same every time; freed memory kept for reuse."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.errors import UserError
from llm.runtime import (bf16_speedup, cached_probe, choose_device, cpu_flags, cpu_name, inference_dtype,
                         training_dtype)
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
    assert training_dtype("auto", cpu, {"avx512f", "avx512_bf16", "amx_bf16"}).value == torch.bfloat16
    assert training_dtype("auto", cpu, {"avx512f", "avx512_bf16"}).value == torch.float32  # AVX512-BF16 alone is slower
    assert training_dtype("auto", cpu, set()).value == torch.float32
    assert training_dtype("auto", torch.device("cuda")).value == torch.bfloat16
    assert training_dtype("bfloat16", cpu, set()).value == torch.bfloat16  # an explicit choice is kept
    assert training_dtype("float32", torch.device("cuda")).value == torch.float32


def test_auto_measures_where_the_flags_leave_it_open():
    """AVX512-BF16 without AMX: bf16 only if the probe finds it at least 1.1x faster; elsewhere
    the flags decide and the probe is never run."""
    cpu, calls = torch.device("cpu"), []

    def probe(speedup):
        return lambda: calls.append(speedup) or speedup

    assert training_dtype("auto", cpu, {"avx512_bf16"}, probe(1.45)).value == torch.bfloat16
    assert training_dtype("auto", cpu, {"avx512_bf16"}, probe(1.05)).value == torch.float32  # a near tie
    assert training_dtype("auto", cpu, {"avx512_bf16"}, probe(0.58)).value == torch.float32
    assert len(calls) == 3
    assert training_dtype("auto", cpu, {"avx512_bf16", "amx_bf16"}, probe(0.5)).value == torch.bfloat16
    assert training_dtype("auto", cpu, {"avx2"}, probe(9.0)).value == torch.float32
    assert training_dtype("float32", cpu, {"avx512_bf16"}, probe(9.0)).value == torch.float32
    assert training_dtype("auto", torch.device("cuda"), set(), probe(0.1)).value == torch.bfloat16
    assert len(calls) == 3


def test_the_probe_verdict_is_remembered_per_machine_and_shape(tmp_path):
    """A noisy machine must not decide differently from one launch to the next: the first
    measurement is kept (per model shape) and every later launch reads it."""
    measured = []

    def measure(speedup):
        return lambda: measured.append(speedup) or speedup

    shape = {"model": {"d_model": 256, "n_layer": 4}, "rows": 4}
    assert cached_probe(tmp_path, shape, measure(1.3))() == 1.3
    assert cached_probe(tmp_path, shape, measure(0.9))() == 1.3  # the first verdict, not a new one
    assert cached_probe(tmp_path, {**shape, "rows": 2}, measure(0.9))() == 0.9  # another shape measures
    assert measured == [1.3, 0.9]
    cpu = torch.device("cpu")
    first = training_dtype("auto", cpu, {"avx512_bf16"}, cached_probe(tmp_path, shape, measure(0.5)))
    assert first.value == torch.bfloat16 and "1.30x" in first.reason


def test_inference_and_device_choices():
    assert inference_dtype("auto", torch.device("cpu")).value == torch.float32
    assert inference_dtype("auto", torch.device("cuda")).value == torch.bfloat16
    assert inference_dtype("float16", torch.device("cpu")).value == torch.float16
    assert choose_device("cpu").value == torch.device("cpu")
    auto = choose_device("auto")
    assert auto.value.type == ("cuda" if torch.cuda.is_available() else "cpu") and auto.reason.startswith("auto")
    with pytest.raises(UserError, match="not a device"):
        choose_device("gpu0")
    with pytest.raises(UserError, match="choose from"):
        inference_dtype("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            choose_device("cuda:0")


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
from llm.runtime import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
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
