"""Weights for decoding: the transposed, oneDNN-packed and streamed float layouts compute the same
logits and tokens; int8 and int4 (both int4 kernels, PyTorch's and ours) have bounded round-trip
errors, their kernels' arithmetic holds against float64, and greedy decoding agrees with the float
model on a trained checkpoint."""
import copy
import gc
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

import llm.infer.quantize
from llm.infer import int4_kernel
from llm.config import ModelConfig
from llm.infer.generate import CompiledStep, Sampling, decode_one, generate
from llm.infer.kv_cache import KVCache
from llm.runtime import Choice
from llm.model.transformer import Transformer
from llm.errors import UserError
from llm.infer.quantize import (INT4_GROUP_SIZE, Int4Linear, Int8Linear, PackedLinear, StreamedLinear, TransposedLinear,
                                 check_method, for_decoding, quantize_int8)
from sample import main as sample_main
from tests.helpers import fresh_seed, grid_id, option_grid, tiny_model

needs_vnni = pytest.mark.skipif(not int4_kernel.available(), reason=f"our int4 kernel: {int4_kernel.status()}")
INT4_KERNELS = ["pytorch", pytest.param("vnni", marks=needs_vnni)]


@settings(max_examples=40, deadline=None)
@given(out_features=st.integers(1, 70), in_features=st.sampled_from([16, 48, 64, 128, 24, 50, 100]),
       rows=st.integers(1, 9), bias=st.booleans(), data=st.data())
def test_int8_linear_round_trip_and_matmul(out_features, in_features, rows, bias, data):
    """Widths that are multiples of 16 take PyTorch's int8 kernel (bf16 activations), others the fallback."""
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    w = torch.randn(out_features, in_features) * torch.rand(out_features, 1) * 3  # rows of different ranges
    b = torch.randn(out_features) if bias else None
    layer = Int8Linear(w, b)
    assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() <= 127
    step = layer.scales.float()[:, None]
    # rounding: half a step at most, plus the fp32 rounding of w / s and q * s (ulps of w, which can exceed 1e-6 steps)
    assert torch.all((layer.dequantized() - w).abs() <= step / 2 + 2 * torch.finfo(torch.float32).eps * w.abs())
    x = torch.randn(rows, 3, in_features)
    y = layer(x)
    deq = layer.dequantized().double()
    exact = x.double() @ deq.T + (0 if b is None else b.double())
    # bf16 activations, scales and output: each contributes at most 2^-8 relative to sum |x_i w_i|
    bound = 3 * 2**-8 * (x.double().abs() @ deq.abs().T) + 1e-6
    assert y.shape == (rows, 3, out_features) and torch.all((y.double() - exact).abs() <= bound)


@settings(max_examples=10, deadline=None)
@given(out_features=st.integers(1, 70), in_features=st.sampled_from([16, 32, 48, 64, 96]), bias=st.booleans(),
       data=st.data())
def test_int8_linear_compiled_one_row_in_fp32(out_features, in_features, bias, data):
    """Made for inductor, a compiled step at one row computes x · q · s in fp32 (a reduction inductor
    fuses; aot_eager here runs it unfused), not through the bf16 kernel eager mode takes at these
    widths: against float64, fp32 rounding only."""
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    b = torch.randn(out_features) if bias else None
    layer = Int8Linear(torch.randn(out_features, in_features), b, streamed=True)
    x = torch.randn(1, 1, in_features)
    torch._dynamo.reset()
    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    deq = layer.dequantized().double()
    exact = x.double() @ deq.T + (0 if b is None else b.double())
    magnitude = x.double().abs() @ deq.abs().T + (0 if b is None else b.double().abs())
    bound = (in_features + 3) * torch.finfo(torch.float32).eps * magnitude
    assert y.shape == (1, 1, out_features) and torch.all((y.double() - exact).abs() <= bound + 1e-30)
    assert not torch.equal(y, layer(x))  # eager takes the bf16 kernel: not the same computation


@pytest.mark.parametrize("options", list(option_grid())[::5], ids=grid_id)
def test_transposed_layout_computes_the_same(options, seed):
    model = tiny_model(seed, **options)  # float64
    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        reference = model(x)
        for_decoding(model)
        assert not any(isinstance(m, nn.Linear) for m in model.modules()) and isinstance(model.output, TransposedLinear)
        stacked = [block.feed_forward.w13 is not None for block in model.layers]
        assert stacked == [model.config.ffn == "swiglu"] * len(stacked)
        torch.testing.assert_close(model(x), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build of torch")
@pytest.mark.parametrize("options", list(option_grid())[2::5], ids=grid_id)
def test_packed_layout_computes_the_same(options, seed, monkeypatch):
    """fp32 on CPU: every linear layer packed for oneDNN (here whatever its size); the same logits to
    fp32 rounding and the same greedy tokens, eager and compiled (through llm_toolkit::packed_linear), also
    with a copied layer that outlives the original. Small matrices keep the transposed layout by default."""
    model = tiny_model(seed, dtype=torch.float32, **options)
    assert isinstance(for_decoding(copy.deepcopy(model)).output, TransposedLinear)  # 97 x 32: too small to pay
    monkeypatch.setitem(llm.infer.quantize.MIN_PACKED_BYTES, torch.float32, 0)
    x = torch.randint(0, 97, (3, 20))
    prompt = x[0, :5].tolist()

    def greedy(model, step=decode_one):
        return torch.stack(list(generate(model, [prompt], 24, Sampling(temperature=0), decode_step=step)), dim=1)

    with torch.no_grad():
        reference = model(x).double()
        expected = greedy(model)
        exact = model.double()(x)  # the float64 model, to bound both fp32 computations
        model.float()
        for_decoding(model)
        assert not any(isinstance(m, (nn.Linear, TransposedLinear)) for m in model.modules())
        assert isinstance(model.output, PackedLinear)
        bound = 20 * (reference - exact).abs().max() + 1e-5  # fp32 rounding, accumulated in another order
        assert (model(x).double() - exact).abs().max() <= bound
        assert torch.equal(greedy(model), expected)
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        assert torch.equal(greedy(model, CompiledStep(counter)), expected)
        assert counter.frame_count == 1 and "packed_linear" in counter.graphs[0].code
        head = copy.copy(model.output)  # a copy shares the packed weight, under a key of its own
        assert head.key != model.output.key
        key = model.output.key
        model.output = head
        gc.collect()
        assert key not in llm.infer.quantize._PACKED  # the registry holds no layer that is gone
        assert torch.equal(greedy(model, CompiledStep(counter)), expected)  # the same step: it recompiles
        assert counter.frame_count == 2


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build of torch")
def test_compiled_step_reads_the_packed_weights_of_the_model_it_is_given(seed, monkeypatch):
    """The packed weights are found by key, a constant of the compiled graph: a step compiled for one
    model and then given another of the same shapes must recompile, not compute with the first's weights."""
    monkeypatch.setitem(llm.infer.quantize.MIN_PACKED_BYTES, torch.float32, 0)
    models = [for_decoding(tiny_model(seed + i, dtype=torch.float32)) for i in range(2)]
    counter = CompileCounterWithBackend("aot_eager")
    step = CompiledStep(counter)

    def logits(model, step):
        cache = KVCache(model.config, 1, 8, "cpu", torch.float32)
        with torch.no_grad():
            model(torch.randint(0, 97, (1, 3), generator=torch.Generator().manual_seed(seed)), cache=cache)
            return step(model, torch.tensor([[4]]), None, cache).clone()

    torch._dynamo.reset()
    for model in models:
        torch.testing.assert_close(logits(model, step), logits(model, decode_one), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 2
    assert not torch.allclose(logits(models[0], decode_one), logits(models[1], decode_one))


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="no oneDNN bf16 on this CPU")
@given(out_features=st.integers(1, 70), in_features=st.integers(1, 100), rows=st.integers(1, 9), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), data=st.data())
@settings(max_examples=40, deadline=None)
def test_packed_linear_against_float64(out_features, in_features, rows, bias, dtype, data):
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    w = torch.randn(out_features, in_features).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    x = torch.randn(rows, 2, in_features).to(dtype)
    y = PackedLinear(w, b)(x)
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    eps = torch.finfo(dtype).eps  # products exact in fp32; sums and the output rounded
    bound = (in_features + 2) * eps * (x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs()))
    assert y.dtype == dtype and y.shape == (rows, 2, out_features)
    assert torch.all((y.double() - exact).abs() <= bound + 1e-30)


def test_quantize_replaces_every_linear_and_the_head(seed):
    for tied in (True, False):
        model = tiny_model(seed, dtype=torch.float32, tie_embeddings=tied, bias=True)
        x = torch.randint(0, 97, (2, 12))
        with torch.no_grad():
            reference = model(x)
            float_bytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, nn.Linear))
            quantize_int8(model)
            assert not any(isinstance(m, nn.Linear) for m in model.modules())
            assert isinstance(model.output, Int8Linear) and model.tok_embeddings.weight.dtype == torch.float32
            int8_bytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, Int8Linear))
            head = 97 * 32 if tied else 0  # the tied head's int8 copy
            assert int8_bytes - head == float_bytes // 4
            logits = model(x)
        assert (logits - reference).abs().max() <= 0.05 * reference.abs().max()


@pytest.fixture(scope="module")
def trained():
    """A small model trained for a few hundred steps on a periodic sequence in which tokens repeat
    (the next token depends on more than the current one), and the sequence it was trained on."""
    fresh_seed()
    vocab, period = 64, 96
    cycle = torch.randint(0, vocab, (period,))
    model = Transformer(ModelConfig(vocab_size=vocab, block_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=64),
                        attention="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        x = cycle[(torch.randint(0, period, (4, 1)) + torch.arange(129)) % period]
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.2, loss.item()
    return model.eval(), cycle


def test_int8_agrees_with_fp32_on_a_trained_model(trained):
    model, cycle = trained
    prompt = cycle[(torch.randint(0, len(cycle), ()) + torch.arange(16)) % len(cycle)].tolist()
    n = 256
    greedy = torch.stack(list(generate(model, [prompt], n, Sampling(temperature=0))), dim=1)[0]
    quantized = quantize_int8(copy.deepcopy(model))
    greedy8 = torch.stack(list(generate(quantized, [prompt], n, Sampling(temperature=0))), dim=1)[0]
    sequence = torch.tensor([prompt + greedy.tolist()])
    with torch.no_grad():  # teacher-forced on the fp32 continuation: no cascade after one disagreement
        logits, logits8 = model(sequence)[0, 15:-1], quantized(sequence)[0, 15:-1]
    agreement = (logits.argmax(-1) == logits8.argmax(-1)).float().mean().item()
    diff = (logits - logits8).abs().max().item()
    same_prefix = int((greedy == greedy8).int().cumprod(0).sum())
    print(f"int8 vs fp32 over {n} greedy tokens: max |logit diff| {diff:.3g} (logits up to {logits.abs().max():.3g}), "
          f"argmax agreement {agreement:.3f}, free-running identical for {same_prefix} tokens")
    assert diff <= 0.05 * logits.abs().max()
    assert agreement >= 0.97


def test_quantize_bad_method_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--ckpt", "/no/such/run", "--quantize", "int3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --quantize int3: not supported (int8: one scale per output channel; int4:")


def test_int4_is_for_cpu_only():
    check_method("int4", "cpu")
    with pytest.raises(UserError, match="--quantize int4: CPU only"):
        check_method("int4", "cuda")


def int4_weight(out: int, width: int, constant_group: float) -> torch.Tensor:
    """Rows of different ranges and offsets, and one group of equal weights (a zero range)."""
    w = torch.randn(out, width) * torch.rand(out, 1) * 3 + torch.randn(out, 1)
    w[0, :INT4_GROUP_SIZE] = constant_group
    return w


@settings(max_examples=25, deadline=None)
@given(out_16=st.integers(1, 5), groups=st.integers(1, 4), rows=st.integers(1, 9), bias=st.booleans(), data=st.data())
def test_int4_pytorch_kernel_round_trip_and_matmul(out_16, groups, rows, bias, data):
    """Each group of 32 inputs of a row: within half a quantization step of the weight (plus the bf16
    rounding of its scale and offset); the kernel's product against float64 on the dequantized weight,
    within the bf16 rounding of activations, scales and output."""
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    out, width = 16 * out_16, INT4_GROUP_SIZE * groups
    w = int4_weight(out, width, data.draw(st.floats(-4, 4), label="constant"))
    b = torch.randn(out) if bias else None
    layer = Int4Linear(w, b, kernel="pytorch")
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == out * width // 2  # two weights a byte
    g = w.view(out, groups, INT4_GROUP_SIZE)
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(INT4_GROUP_SIZE, 1)
    bf16 = 2**-8 * (8 * step + g.abs().amax(-1).repeat_interleave(INT4_GROUP_SIZE, 1) + step)  # scale and offset
    assert torch.all((layer.dequantized() - w).abs() <= step / 2 + bf16 + 1e-6)
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    x = torch.randn(rows, 3, width, dtype=dtype)[:, -1:]  # the model's last position: a strided view
    y = layer(x)
    deq = layer.dequantized().double()
    exact = x.double() @ deq.T + (0 if b is None else b.double())
    bound = 3 * 2**-8 * (x.double().abs() @ deq.abs().T) + 2**-8 * exact.abs() * (dtype == torch.bfloat16) + 1e-5
    expected_dtype = dtype if b is None else torch.promote_types(dtype, b.dtype)  # the bias is added as it is
    assert y.shape == (rows, 1, out) and y.dtype == expected_dtype and torch.all((y.double() - exact).abs() <= bound)


def activations_as_the_kernel_quantizes(x: torch.Tensor) -> torch.Tensor:
    """llm/infer/int4_kernel.cpp's int8 activations, dequantized: per 32 inputs d = max|x| / 127,
    round(x · (127 / max|x|)) half to even, each step in fp32 as the kernel computes it (divisions
    correctly rounded: torch's scalar / tensor multiplies by a reciprocal, one ulp off at times)."""
    g = x.float().view(x.size(0), -1, INT4_GROUP_SIZE)
    amax = g.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, (127 / amax.double()).float(), 0)
    return ((g * inverse).round().double() * (amax.double() / 127).float().double()).view(x.shape)


@needs_vnni
@settings(max_examples=25, deadline=None)
@given(out_16=st.integers(1, 4), chunks=st.integers(1, 20), rows=st.integers(1, 9), bias=st.booleans(),
       data=st.data())
def test_int4_vnni_kernel_round_trip_and_matmul(out_16, chunks, rows, bias, data):
    """Ours: each weight within half a step of its group's fp16 scale from the fp16 low (plus what
    rounding the low and scale to fp16 can push past the top step); the product equal to float64
    on the dequantized weight and the activations quantized as the kernel does (for the scale term;
    the low term takes the exact sums of x), within fp32 rounding. Shapes cover every count of rows
    the kernel takes at once (up to 4) and of groups it loads at once (up to 16)."""
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    out, width = 16 * out_16, 64 * chunks
    w = int4_weight(out, width, data.draw(st.floats(-4, 4), label="constant"))
    b = torch.randn(out) if bias else None
    layer = Int4Linear(w, b, kernel="vnni")
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == out * width // 2
    scale = layer.scale.float().repeat_interleave(INT4_GROUP_SIZE, 1)
    low = layer.low.float().repeat_interleave(INT4_GROUP_SIZE, 1)
    q = torch.randint(0, 16, (out, width), dtype=torch.uint8)
    assert torch.equal(int4_kernel.unpack(int4_kernel.pack(q)), q)  # the layout loses nothing
    assert torch.all((layer.dequantized() - w).abs() <= scale / 2 + 2**-11 * (low.abs() + 16 * scale) + 1e-6)
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    x = torch.randn(rows, 3, width, dtype=dtype)[:, -1:]
    y = layer(x)
    flat = x.reshape(rows, width)
    scaled = layer.dequantized().double() - low.double()  # q · scale
    expected = activations_as_the_kernel_quantizes(flat) @ scaled.T + flat.double() @ low.double().T
    magnitude = flat.double().abs() @ (scaled.abs() + low.double().abs()).T
    bound = (width / 16 + 64) * torch.finfo(torch.float32).eps * magnitude + 1e-30
    assert y.shape == (rows, 1, out) and y.dtype == (dtype if b is None else torch.promote_types(dtype, b.dtype))
    y = (y.reshape(rows, out) - (0 if b is None else b)).double()
    if dtype == torch.bfloat16:  # the output rounded to bf16 (and the bias added in bf16)
        bound = bound + 2**-8 * (expected.abs() + (0 if b is None else 2 * b.double().abs()))
    assert torch.all((y - expected).abs() <= bound)


def test_int4_kernel_choice_and_its_reasons(monkeypatch):
    """Ours where the CPU has the instructions and it builds; otherwise PyTorch's, each with its reason."""
    status = int4_kernel.status.__wrapped__
    monkeypatch.setenv("LLM_INT4_KERNEL", "pytorch")
    assert status() == Choice("pytorch", "as LLM_INT4_KERNEL=pytorch asks")
    monkeypatch.delenv("LLM_INT4_KERNEL")
    monkeypatch.setattr(int4_kernel, "cpu_flags", lambda: {"avx512f", "fma"})
    choice = status()
    assert choice.value == "pytorch" and choice.reason.startswith("this CPU lacks ") and "avx512_vnni" in choice.reason
    monkeypatch.setattr(int4_kernel, "cpu_flags", lambda: int4_kernel.NEEDED_FLAGS)

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension 'llm_int4'\nmany more lines")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    assert status() == Choice("pytorch", "llm/infer/int4_kernel.cpp did not build: Error building extension 'llm_int4'")
    monkeypatch.setattr(int4_kernel, "available", lambda: False)  # as where it did not build: PyTorch's
    assert Int4Linear(torch.randn(16, 64)).kernel == "pytorch"
    with pytest.raises(ValueError, match="int4 kernel vnni: not for this weight or machine"):
        Int4Linear(torch.randn(16, 64), kernel="vnni")
    with pytest.raises(ValueError, match="int4 kernel 'int3': vnni or pytorch"):
        Int4Linear(torch.randn(16, 64), kernel="int3")


@needs_vnni
def test_int4_kernel_builds_after_a_killed_build():
    """A build killed with SIGKILL leaves cpp_extension's in-progress file, on which cpp_extension
    alone waits forever (even with the library built); ours removes it under its own flock."""
    from torch.utils import cpp_extension

    stale = Path(cpp_extension._get_build_directory(int4_kernel.NAME, verbose=False)) / "lock"
    stale.touch()
    code = "from llm.infer import int4_kernel; print(int4_kernel.status().value)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "vnni", result.stderr
    assert not stale.exists()


@needs_vnni
def test_int4_takes_our_kernel_where_it_can():
    assert Int4Linear(torch.randn(16, 64)).kernel == "vnni"
    assert Int4Linear(torch.randn(16, 96)).kernel == "pytorch"  # inputs not a multiple of 64
    assert Int4Linear(torch.randn(16, 64), group_size=64).kernel == "pytorch"  # ours: groups of 32


def test_int4_keeps_int8_where_the_kernel_cannot_take_the_shape(seed):
    """Like llama.cpp's quantizer: a 97-row head (not a multiple of 16 outputs) is int8, the layers int4."""
    model = tiny_model(seed, dtype=torch.float32)
    for_decoding(model, "int4")
    assert isinstance(model.output, Int8Linear)
    layers = [m for block in model.layers for m in (block.attention.wqkv, block.attention.wo, block.feed_forward.w13,
                                                     block.feed_forward.w2)]
    assert all(isinstance(m, Int4Linear) for m in layers)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


@pytest.mark.parametrize("kernel", INT4_KERNELS)
def test_int4_agrees_with_fp32_on_a_trained_model(trained, kernel, monkeypatch):
    model, cycle = trained
    prompt = cycle[(torch.randint(0, len(cycle), ()) + torch.arange(16)) % len(cycle)].tolist()
    greedy = torch.stack(list(generate(model, [prompt], 256, Sampling(temperature=0))), dim=1)[0]
    monkeypatch.setattr(int4_kernel, "available", lambda: kernel == "vnni")
    quantized = for_decoding(copy.deepcopy(model), "int4")
    layers = [m for m in quantized.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 4 * len(model.layers) + 1 and {m.kernel for m in layers} == {kernel}  # and the head
    sequence = torch.tensor([prompt + greedy.tolist()])
    with torch.no_grad():
        logits, logits4 = model(sequence)[0, 15:-1], quantized(sequence)[0, 15:-1]
    agreement = (logits.argmax(-1) == logits4.argmax(-1)).float().mean().item()
    diff = (logits - logits4).abs().max().item()
    print(f"int4 ({kernel}) vs fp32: max |logit diff| {diff:.3g} (logits up to {logits.abs().max():.3g}), "
          f"agreement {agreement:.3f}")
    assert diff <= 0.2 * logits.abs().max()
    assert agreement >= 0.9


@settings(max_examples=10, deadline=None)
@given(out_features=st.integers(1, 70), in_features=st.integers(1, 100), rows=st.integers(1, 3), bias=st.booleans(),
       data=st.data())
def test_streamed_linear_one_row_in_fp32(out_features, in_features, rows, bias, data):
    """Compiled, one row is the streamed sum (aot_eager runs it unfused), within fp32 rounding of float64;
    more rows, and eager calls, are F.linear itself."""
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    w = torch.randn(out_features, in_features)
    b = torch.randn(out_features) if bias else None
    layer = StreamedLinear(w, b)
    assert layer.weight.data_ptr() == w.data_ptr()  # shared, not copied
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 1, in_features)
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    magnitude = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    y = compiled(x)
    assert y.shape == (1, 1, out_features)
    assert torch.all((y.double() - exact).abs() <= (in_features + 3) * torch.finfo(torch.float32).eps * magnitude + 1e-30)
    many = torch.randn(rows, 2, in_features)
    assert torch.equal(compiled(many), torch.nn.functional.linear(many, w, b))


def test_streamed_format_at_batch_1_only(seed):
    """For inductor at batch 1, float weights stay (out, in) and a tied head shares the embedding; at
    other or unknown batch sizes, and for other backends, they are packed or transposed as before."""
    model = tiny_model(seed, dtype=torch.float32, tie_embeddings=True)
    streamed = for_decoding(copy.deepcopy(model), None, "inductor", batch_size=1)
    assert isinstance(streamed.output, StreamedLinear) and isinstance(streamed.layers[0].attention.wqkv, StreamedLinear)
    assert streamed.output.weight.data_ptr() == streamed.tok_embeddings.weight.data_ptr()
    for kwargs in ({"batch_size": 8}, {}, {"compile_backend": "aot_eager", "batch_size": 1}):
        other = for_decoding(copy.deepcopy(model), **kwargs)
        assert not any(isinstance(m, StreamedLinear) for m in other.modules()), kwargs


@pytest.mark.parametrize("options", list(option_grid())[1::6], ids=grid_id)
def test_streamed_compiled_step_gives_the_same_tokens(options, seed):
    """The compiled step of the streamed format (products and one-query attention as sums), traced with
    aot_eager, across the architecture options: 40 greedy tokens identical to the eager fp32 model's,
    one compilation."""
    model = tiny_model(seed, dtype=torch.float32, block_size=64, **options)
    prompt = torch.randint(0, 97, (7,)).tolist()

    def greedy(model, step=decode_one):
        return torch.stack(list(generate(model, [prompt], 40, Sampling(temperature=0), decode_step=step)), dim=1)

    expected = greedy(model)
    streamed = for_decoding(copy.deepcopy(model), None, "inductor", batch_size=1)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    assert torch.equal(greedy(streamed, CompiledStep(counter)), expected)
    assert counter.frame_count == 1


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_inductor_step_is_exact(quantize, seed):
    """The real thing, inductor's generated loops (streamed float and int8 products, one-query attention,
    realized activations), one compilation for a whole generation: fp32 greedy tokens identical to the
    eager fp32 model's; a step's logits equal to the same format's eager step within fp32 rounding
    (fp32), or the bf16 rounding of the eager int8 and int4 kernels' activations (ours, where it is
    built: the compiled step's C++ calls the same op, on activations int8-quantized from inductor's)."""
    model = tiny_model(seed, dtype=torch.float32, block_size=40, n_layer=1, d_model=64, vocab_size=128)
    prompt = torch.randint(0, 128, (5,)).tolist()
    prepared = for_decoding(copy.deepcopy(model), quantize, "inductor", batch_size=1)
    if quantize == "int4" and int4_kernel.available():
        assert "vnni" in {m.kernel for m in prepared.modules() if isinstance(m, Int4Linear)}
    step = CompiledStep("inductor")

    def greedy(model, step=decode_one):
        return torch.stack(list(generate(model, [prompt], 30, Sampling(temperature=0), decode_step=step)), dim=1)

    def logits(step):  # as in the generation (a cache of 35 slots, inference tensors): no recompilation
        with torch.inference_mode():
            cache = KVCache(model.config, 1, 35, "cpu", torch.float32)
            prepared(torch.tensor([prompt]), cache=cache)
            return step(prepared, torch.tensor([[3]]), None, cache).clone()

    tokens = greedy(prepared, step)
    if quantize is None:
        assert torch.equal(tokens, greedy(model))
    runner = step.step.runner  # compiled ahead of time (llm/infer/aot.py)
    compiled, eager = logits(step), logits(decode_one)
    assert step.step.runner is runner  # another cache of the same shapes: read, not compiled for
    tolerance = 1e-5 if quantize is None else 0.01
    torch.testing.assert_close(compiled, eager, rtol=0, atol=tolerance * eager.abs().max().item())
