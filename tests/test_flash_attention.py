"""Tests for triton_kernels.flash_attention (triton_kernels/flash.py) against a float64 reference.

Without CUDA, tests/conftest.py turns on Triton's interpreter, so sizes stay small. Every test
draws a fresh seed (set FA_TEST_SEED to replay one); it is printed and named in failure messages.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton

from triton_kernels import flash_attention

from triton_kernels import flash as fa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Bounds on ||out - ref|| / max(||ref||, 1) against the float64 reference. Measured in the
# interpreter (which upcasts 16-bit tiles to fp32): fp32 <1e-6, fp16 ~3e-4, bf16 ~2e-3, i.e.
# essentially the rounding of inputs and results. On the GPU, P and dS are also rounded to the
# input dtype for the tensor-core dots (not measurable here); the 16-bit bounds leave ~5x room.
TOLERANCE = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def seed():
    value = int(os.environ.get("FA_TEST_SEED", int.from_bytes(os.urandom(4), "little") >> 1))
    torch.manual_seed(value)
    print(f"seed={value} (FA_TEST_SEED={value} replays this test)")
    return value


def visibility(B, Nq, Nk, causal, kv_start=None):
    """(B, Nq, Nk) bool: query i of batch row b sees key j."""
    i = torch.arange(Nq, device=DEVICE)[:, None]
    j = torch.arange(Nk, device=DEVICE)[None, :]
    visible = (j <= i + (Nk - Nq)) if causal else (j >= 0) & (i >= 0)
    visible = visible.expand(B, Nq, Nk)
    if kv_start is not None:
        visible = visible & (j >= kv_start[:, None, None])
    return visible


def reference(q, k, v, causal, sm_scale, kv_start=None):
    """Naive float64 attention with repeated K/V, bottom-right causal mask and kv_start."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    visible = visibility(q.shape[0], q.shape[2], k.shape[2], causal, kv_start)[:, None]
    scores = (q @ k.transpose(-1, -2) * sm_scale).masked_fill(~visible, float("-inf"))
    # Softmax that gives 0 (not NaN) for rows without any visible key.
    row_max = scores.amax(-1, keepdim=True)
    e = torch.exp(scores - torch.where(torch.isinf(row_max), 0.0, row_max))
    total = e.sum(-1, keepdim=True)
    return (e / torch.where(total == 0, 1.0, total)) @ v


def rel_err(out, ref):
    # Denominator floored at 1 so that an exactly-zero reference (dq when every query sees a
    # single key) is checked in absolute terms instead of dividing by zero.
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1.0)).item()


def randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def make_qkv(B, H, Hkv, Nq, Nk, D, dtype):
    return randn(B, H, Nq, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype), \
        randn(B, Hkv, Nk, D, dtype=dtype)


def run_and_compare(q, k, v, seed, causal=True, sm_scale=None, kv_start=None, do=None):
    """Run forward + backward for kernel and reference; assert shapes, finiteness, tolerance.
    q, k, v may be non-leaf views: gradients are taken w.r.t. them via autograd.grad."""
    dtype = q.dtype
    tol = TOLERANCE[dtype]
    q, k, v = (t.requires_grad_() if t.is_leaf else t for t in (q, k, v))
    out = flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, kv_start=kv_start)
    assert out.shape == q.shape and out.dtype == dtype
    if do is None:
        do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    ref = reference(q64, k64, v64, causal, scale, kv_start)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())

    errors = {}
    for name, got, want, like in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads),
                                      (q, q, k, v)):
        assert got.shape == like.shape and got.dtype == dtype, name
        assert torch.isfinite(got).all(), f"{name} has NaN/inf (seed={seed})"
        errors[name] = rel_err(got, want)
    print(f"{dtype} relative errors: " + ", ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative error above {tol:g} for {dtype}: {bad} (seed={seed})"
    return out, grads


CASES = [
    # B, H, Hkv, Nq, Nk, D, causal, dtype
    pytest.param(1, 2, 2, 1, 1, 16, True, torch.float32, id="N1-causal"),
    pytest.param(1, 2, 2, 1, 1, 16, False, torch.bfloat16, id="N1-bf16"),
    pytest.param(2, 2, 2, 17, 17, 32, True, torch.float32, id="N17-causal"),
    pytest.param(1, 2, 2, 17, 17, 32, False, torch.bfloat16, id="N17-bf16"),
    pytest.param(1, 2, 1, 129, 129, 64, True, torch.float32, id="N129-causal-mqa"),
    pytest.param(1, 4, 2, 129, 129, 16, False, torch.bfloat16, id="N129-bf16-gqa"),
    pytest.param(2, 4, 1, 1, 33, 64, True, torch.float32, id="decode-mqa"),
    pytest.param(1, 4, 1, 1, 33, 32, True, torch.bfloat16, id="decode-mqa-bf16"),
    pytest.param(1, 4, 2, 17, 40, 32, True, torch.bfloat16, id="Nq<Nk-causal-gqa-bf16"),
    pytest.param(1, 4, 2, 17, 40, 16, False, torch.float32, id="Nq<Nk-gqa"),
    pytest.param(1, 2, 2, 40, 17, 32, False, torch.float32, id="Nq>Nk-noncausal"),
    pytest.param(1, 2, 1, 33, 33, 128, True, torch.float16, id="D128-fp16-mqa"),
]


@pytest.mark.parametrize("B, H, Hkv, Nq, Nk, D, causal, dtype", CASES)
def test_matches_reference(seed, B, H, Hkv, Nq, Nk, D, causal, dtype):
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, dtype)
    run_and_compare(q, k, v, seed, causal=causal)


def test_explicit_sm_scale(seed):
    q, k, v = (randn(1, 2, 24, 32, dtype=torch.float32) for _ in range(3))
    out, _ = run_and_compare(q, k, v, seed, causal=True, sm_scale=0.7)
    # Guard against the scale being ignored: the default scale gives a different answer.
    assert rel_err(out, reference(q, k, v, True, 32 ** -0.5)) > 1e-3, f"seed={seed}"


@pytest.mark.parametrize("causal, Nq, dtype", [(True, 40, torch.float32),
                                               (False, 17, torch.bfloat16)])
def test_kv_start(seed, causal, Nq, dtype):
    """Left padding: row 0 unpadded, row 1 cut mid-block, row 2 sees no key at all."""
    B, H, Hkv, Nk, D = 3, 4, 2, 40, 32
    kv_start = torch.tensor([0, 7, Nk], device=DEVICE)
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, dtype)
    empty_rows = ~visibility(B, Nq, Nk, causal, kv_start).any(-1)  # (B, Nq): see nothing
    assert empty_rows[2].all() and empty_rows[0].sum() == 0 and empty_rows[1].any() == causal
    # A huge upstream gradient on rows that see nothing: any leak would dominate the error.
    do = torch.randn(B, H, Nq, D, device=DEVICE)
    do[empty_rows[:, None, :].expand(B, H, Nq)] *= 1e4
    do = do.to(dtype)

    out, (dq, dk, dv) = run_and_compare(q, k, v, seed, causal=causal, kv_start=kv_start, do=do)
    rows = empty_rows[:, None, :].expand(B, H, Nq)
    assert (out[rows] == 0).all() and (dq[rows] == 0).all(), f"seed={seed}"
    masked_keys = (torch.arange(Nk, device=DEVICE) < kv_start[:, None])[:, None, :]
    masked_keys = masked_keys.expand(B, Hkv, Nk)
    assert (dk[masked_keys] == 0).all() and (dv[masked_keys] == 0).all(), f"seed={seed}"


def test_noncontiguous_views(seed):
    """q from a strided transpose, k/v slices of a preallocated KV cache, a strided dO."""
    B, H, Hkv, D, capacity = 2, 4, 2, 32, 64
    cache_k = torch.randn(B, Hkv, capacity, D, device=DEVICE, requires_grad=True)
    cache_v = torch.randn(B, Hkv, capacity, D, device=DEVICE, requires_grad=True)
    for Nq, L in ((20, 20), (1, 37)):  # prefill, then one decode step
        q = torch.randn(B, Nq, H, 2 * D, device=DEVICE)[..., ::2].transpose(1, 2)  # stride_d 2
        k, v = cache_k[:, :, :L], cache_v[:, :, :L]
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        do = torch.randn(B, H, D, Nq, device=DEVICE).transpose(-1, -2)  # strided dO
        cache_k.grad = cache_v.grad = None
        run_and_compare(q, k, v, seed, causal=True, do=do)
        # Gradients reach the cache through the slices; positions past L get none.
        out = flash_attention(q, k, v)
        out.backward(do)
        assert (cache_k.grad[:, :, L:] == 0).all() and (cache_v.grad[:, :, L:] == 0).all()
        assert cache_k.grad[:, :, :L].abs().sum() > 0


@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16), (16, 16)])
def test_other_block_shapes(seed, monkeypatch, block_m, block_n):
    """The block-range arithmetic (diagonal, kv_start, ragged edges) with other tile shapes."""
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)
    for kernel in (fa._attn_fwd, fa._attn_bwd_dkdv, fa._attn_bwd_dq):
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
    B, H, Hkv, D = 2, 2, 1, 16
    kv_start = torch.tensor([16, 20], device=DEVICE)  # on a block boundary, and inside a block
    # Nk - Nq = 14: some query block's first row sees keys exactly up to a key-block boundary;
    # Nk - Nq = 1: some query block's last row sees exactly one key of the next key block.
    for Nq, Nk in ((37, 51), (40, 41)):
        q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, torch.float32)
        run_and_compare(q, k, v, seed, causal=True, kv_start=kv_start)


def _inputs(q_shape=(1, 2, 8, 32), kv_shape=(1, 2, 8, 32), dtype=torch.float32):
    return tuple(torch.randn(shape).to(dtype) for shape in (q_shape, kv_shape, kv_shape))


@pytest.mark.parametrize("make_args, message", [
    (lambda: _inputs((1, 2, 8, 48), (1, 2, 8, 48)),
     "head dim 48 is not supported; supported head dims are 16, 32, 64, 128"),
    (lambda: _inputs((1, 3, 8, 32), (1, 2, 8, 32)), "must be a multiple of the number of kv heads"),
    (lambda: _inputs((1, 2, 9, 32), (1, 2, 8, 32)), "causal attention needs Nq <= Nk"),
    (lambda: _inputs((1, 2, 8, 32), (1, 2, 8, 16)), "must agree on batch size and head dim"),
    (lambda: _inputs((2, 2, 8, 32), (1, 2, 8, 32)), "must agree on batch size and head dim"),
    (lambda: (*_inputs()[:2], torch.randn(1, 2, 9, 32)), "k and v must have the same shape"),
    (lambda: (*_inputs()[:2], torch.randn(1, 2, 8, 32).half()), "must share one dtype"),
    (lambda: _inputs(dtype=torch.float64), "dtype torch.float64 is not supported"),
    (lambda: (torch.randn(2, 8, 32), *_inputs()[1:]), "q must be a 4-D tensor"),
    (lambda: (*_inputs()[:2], torch.randn(1, 2, 8, 32, device="meta")), "must be on one device"),
])
def test_bad_inputs(make_args, message):
    with pytest.raises(ValueError, match=message):
        flash_attention(*make_args())


@pytest.mark.parametrize("kv_start, message", [
    (torch.tensor([0.0]), "kv_start must be an integer tensor of shape"),
    (torch.tensor([0, 1]), "kv_start must be an integer tensor of shape"),
])
def test_bad_kv_start(kv_start, message):
    with pytest.raises(ValueError, match=message):
        flash_attention(*_inputs(), kv_start=kv_start)


def test_cpu_without_interpreter_fails_clearly():
    """triton imported without TRITON_INTERPRET + CPU tensors: one clear RuntimeError."""
    script = ("import triton, torch\n"
              "from triton_kernels import flash_attention\n"
              "q = torch.randn(1, 1, 4, 16)\n"
              "flash_attention(q, q, q)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr
    assert "set TRITON_INTERPRET=1 in the environment before triton is first imported" \
        in result.stderr


@pytest.mark.skipif(not fa.INTERPRETED, reason="only the interpreter warns")
def test_interpreter_warns_once(monkeypatch):
    monkeypatch.setattr(fa, "_warned_interpreter", False)
    q, k, v = _inputs((1, 1, 4, 16), (1, 1, 4, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flash_attention(q, k, v)
        flash_attention(q, k, v)
    messages = [str(w.message) for w in caught if "interpreter" in str(w.message)]
    assert len(messages) == 1 and "not for speed" in messages[0]
