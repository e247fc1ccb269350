"""The decode step compiled ahead of time on CPU (llm/infer/aot.py): exact against the eager step,
reading the caches it is given, its packages kept under a key and written whole."""
import copy
import os
import shutil

import pytest
import torch

import llm.infer.aot
import llm.infer.quantize
from llm.infer.aot import AheadOfTimeStep, compiled_package, package_key
from llm.infer.generate import CompiledStep, Sampling, generate
from llm.infer.quantize import PackedLinear, for_decoding
from tests.helpers import tiny_model

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="inductor needs a C++ compiler")


def greedy(model, prompts, step=None, n=6):
    kwargs = {} if step is None else {"decode_step": step}
    return torch.stack(list(generate(model, prompts, n, Sampling(temperature=0), **kwargs)), dim=1)


@needs_compiler
def test_ahead_of_time_step_equals_eager_with_left_padding_and_a_new_cache(seed):
    """fp32 greedy tokens identical to the eager model's, for rows of different lengths (padding, the
    kv_start input), then for new prompts of the same sizes: the same runner, reading the new cache
    (had it kept reading the first generation's, the tokens would differ from eager's)."""
    model = tiny_model(seed, dtype=torch.float32, n_layer=1, d_model=64, vocab_size=128)
    prepared = for_decoding(copy.deepcopy(model), None, "inductor", batch_size=1)
    step = CompiledStep("inductor")
    for _ in range(2):
        lengths = torch.randint(1, 6, (2,)).tolist()
        lengths[0] = 6  # the same widths each time: the same shapes
        prompts = [torch.randint(0, 128, (n,)).tolist() for n in lengths]
        assert torch.equal(greedy(prepared, prompts, step), greedy(model, prompts))
        if _ == 0:
            runner = step.step.runner
    assert isinstance(step.step, AheadOfTimeStep) and step.step.runner is runner


def test_packed_models_stay_on_torch_compile(seed, monkeypatch):
    model = tiny_model(seed, dtype=torch.float32, d_model=64)
    assert AheadOfTimeStep.supports(for_decoding(copy.deepcopy(model), None, "inductor", batch_size=1))
    assert AheadOfTimeStep.supports(for_decoding(copy.deepcopy(model), "int8", "inductor", batch_size=1))
    assert AheadOfTimeStep.supports(for_decoding(copy.deepcopy(model), "int4", "inductor", batch_size=1))
    if torch.backends.mkldnn.is_available():
        monkeypatch.setitem(llm.infer.quantize.MIN_PACKED_BYTES, torch.float32, 0)
        packed = for_decoding(copy.deepcopy(model), None, "inductor", batch_size=8)  # batches: oneDNN
        assert any(isinstance(m, PackedLinear) for m in packed.modules())
        assert not AheadOfTimeStep.supports(packed)


def test_packages_are_kept_by_key_and_written_whole(tmp_path, monkeypatch, seed):
    """One compilation per key (graph, shapes, options, threads); a compilation that fails leaves
    nothing that a later call would take for a package."""
    monkeypatch.setattr(torch._inductor.runtime.cache_dir_utils, "cache_dir", lambda: str(tmp_path))
    calls = []

    def compile_package(program, package_path, inductor_configs):
        calls.append(package_path)
        if inductor_configs.get("fail"):
            with open(package_path, "wb") as f:
                f.write(b"half a package")
            raise RuntimeError("the compiler failed")
        with open(package_path, "wb") as f:
            f.write(b"a package")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_package)
    program = torch.export.export(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    first = compiled_package(program, {"a": 1})
    assert compiled_package(program, {"a": 1}) == first and len(calls) == 1
    assert first.read_bytes() == b"a package"
    assert compiled_package(program, {"a": 2}) != first and len(calls) == 2
    assert package_key(program, {"a": 1}) != package_key(torch.export.export(torch.nn.Linear(4, 5), (torch.randn(2, 4),)), {"a": 1})
    with pytest.raises(RuntimeError):
        compiled_package(program, {"fail": True})
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, compiled_package(program, {"a": 2}).name])
    # the folder keeps the packages used last: {"a": 1} is used again, so {"a": 2} goes first
    monkeypatch.setattr(llm.infer.aot, "KEPT_PACKAGES", 2)
    os.utime(first, (0, 0))
    os.utime(compiled_package(program, {"a": 2}), (1, 1))
    compiled_package(program, {"a": 1})  # used now
    third = compiled_package(program, {"a": 3})
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, third.name]) and len(calls) == 4


@needs_compiler
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_ahead_of_time_batch_equals_eager(quantize, seed):
    """Rows of a batch go through PyTorch's int8 and int4 kernels (the server's slots, sample.py's
    prompts): the compiled step calls the same kernels as the eager one, so its tokens are the same."""
    model = tiny_model(seed, dtype=torch.float32, n_layer=1, d_model=64, vocab_size=128)
    prepared = for_decoding(model, quantize, "inductor", batch_size=2)
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (5, 3)]
    step = CompiledStep("inductor")
    assert torch.equal(greedy(prepared, prompts, step), greedy(prepared, prompts))
    assert isinstance(step.step, AheadOfTimeStep)
