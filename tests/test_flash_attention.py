"""Tests for triton_kernels.flash_attention and flash_attention_varlen (triton_kernels/flash.py)
against a float64 reference.

Without CUDA, tests/conftest.py turns on Triton's interpreter, so sizes stay small. Every test
draws a fresh seed (set FA_TEST_SEED to replay one); it is printed and named in failure messages.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from triton_kernels import flash as fa
from triton_kernels import flash_attention, flash_attention_varlen
from triton_kernels.reference import attention_reference as reference
from triton_kernels.reference import attention_reference_varlen as reference_varlen
from triton_kernels.reference import poison_unused_kv, rel_err
from triton_kernels.reference import visibility as reference_visibility
from triton_kernels.tuning import Tile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Bounds on ||out - ref|| / max(||ref||, 1) against the float64 reference. Measured in the
# interpreter (which upcasts 16-bit tiles to fp32): fp32 <1e-6, fp16 ~3e-4, bf16 ~2e-3, i.e.
# essentially the rounding of inputs and results. On the GPU, P and dS are also rounded to the
# input dtype for the tensor-core dots (not measurable here); the 16-bit bounds leave ~5x room.
TOLERANCE = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# One pinned tile on a GPU, instead of measuring every candidate for every new shape (minutes);
# a small one, since fp32 cases use exact dots that need small tiles (flash.CANDIDATES_FP32).
GPU_TILE = "tile=32x32x4x2"


@pytest.fixture(autouse=True)
def pinned_tile_on_gpu(monkeypatch):
    if DEVICE == "cuda" and "FLASH_ATTENTION_OPTIONS" not in os.environ:
        monkeypatch.setenv("FLASH_ATTENTION_OPTIONS", GPU_TILE)


@pytest.fixture
def seed():
    value = int(os.environ.get("FA_TEST_SEED", int.from_bytes(os.urandom(4), "little") >> 1))
    torch.manual_seed(value)
    print(f"seed={value} (FA_TEST_SEED={value} replays this test)")
    return value


def visibility(B, Nq, Nk, causal, kv_start=None, kv_end=None, window=None):
    return reference_visibility(B, Nq, Nk, causal, kv_start, kv_end, DEVICE, window)


def randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def make_qkv(B, H, Hkv, Nq, Nk, D, dtype):
    return randn(B, H, Nq, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype), \
        randn(B, Hkv, Nk, D, dtype=dtype)


def compare(seed, inputs, attention, attention64, do=None, clean_kv=None, label=""):
    """Run attention(q, k, v) forward + backward and attention64 (the float64 reference) on the
    same inputs; assert shapes, dtypes, finiteness and the tolerance. q, k, v may be non-leaf
    views: gradients are taken w.r.t. them via autograd.grad. clean_kv: (k, v) for the
    reference where the kernel's k, v hold poison in unused rows."""
    q, k, v = inputs
    dtype = q.dtype
    tol = TOLERANCE[dtype]
    q, k, v = (t.requires_grad_() if t.is_leaf else t for t in (q, k, v))
    out = attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    if do is None:
        do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, *(clean_kv or (k, v))))
    ref = attention64(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())

    errors = {}
    for name, got, want, like in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads),
                                      (q, q, k, v)):
        assert got.shape == like.shape and got.dtype == dtype, name
        assert torch.isfinite(got).all(), f"{name} has NaN/inf (seed={seed})"
        errors[name] = rel_err(got, want)
    print(f"{dtype} {label} relative errors: "
          + ", ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative error above {tol:g} for {dtype}: {bad} (seed={seed})"
    return out, grads


def seqlens(lengths):
    """cu_seqlens for these sequence lengths: (n + 1,) cumulative offsets from 0."""
    return torch.tensor([0, *lengths], device=DEVICE).cumsum(0)


def make_qkv_varlen(total_q, total_k, H, Hkv, D, dtype):
    return randn(total_q, H, D, dtype=dtype), randn(total_k, Hkv, D, dtype=dtype), \
        randn(total_k, Hkv, D, dtype=dtype)


def run_and_compare(q, k, v, seed, causal=True, sm_scale=None, kv_start=None, kv_end=None,
                    window=None, do=None, options=None, clean_kv=None, attention=flash_attention):
    """flash_attention (or a compiled version of it) against the reference."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    return compare(seed, (q, k, v),
                   lambda q, k, v: attention(q, k, v, causal=causal, sm_scale=sm_scale,
                                             kv_start=kv_start, kv_end=kv_end, window=window,
                                             options=options),
                   lambda q, k, v: reference(q, k, v, causal, scale, kv_start, kv_end, window),
                   do, clean_kv, f"window={window} {options or ''}")


CASES = [
    # B, H, Hkv, Nq, Nk, D, causal, dtype
    pytest.param(1, 2, 2, 1, 1, 16, True, torch.float32, id="N1-causal"),
    pytest.param(1, 2, 2, 1, 1, 16, False, torch.bfloat16, id="N1-bf16"),
    pytest.param(2, 2, 2, 17, 17, 32, True, torch.float32, id="N17-causal"),
    pytest.param(1, 2, 2, 17, 17, 32, False, torch.bfloat16, id="N17-bf16"),
    pytest.param(1, 2, 1, 97, 97, 64, True, torch.float32, id="N97-causal-mqa"),
    pytest.param(1, 4, 2, 97, 97, 16, False, torch.bfloat16, id="N97-bf16-gqa"),
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


@pytest.mark.parametrize("Nq, causal, Hkv, dtype, window, options", [
    pytest.param(1, True, 2, torch.float32, None, None, id="decode-causal-gqa"),
    pytest.param(1, False, 1, torch.bfloat16, None, None, id="decode-mqa-bf16"),
    pytest.param(3, True, 2, torch.bfloat16, None, None, id="Nq3-causal-gqa-bf16"),
    pytest.param(3, False, 4, torch.float32, None, None, id="Nq3-mha"),
    pytest.param(3, True, 2, torch.float32, 20, "heavy_first", id="Nq3-window-heavy_first"),
])
def test_kv_end_static_cache(seed, Nq, causal, Hkv, dtype, window, options):
    """A decode step over a whole fixed-length cache (Nk = L) with a per-row filled length:
    row 0 full, row 1 cut inside a key block, row 2 on a block boundary (32), row 3 shorter than
    Nq = 3 (its first query rows see nothing when causal), combined with left padding and, for
    Mistral, a sliding window. The cache beyond kv_end and before kv_start holds NaN/inf: none
    of it may reach any result."""
    B, H, L, D = 4, 4, 70, 32
    kv_start = torch.tensor([5, 0, 16, 0], device=DEVICE)
    kv_end = torch.tensor([L, 45, 32, 2], device=DEVICE)
    q = randn(B, H, Nq, D, dtype=dtype)
    (k, v), clean_kv, unused = poison_unused_kv(randn(B, Hkv, L, D, dtype=dtype),
                                                randn(B, Hkv, L, D, dtype=dtype), kv_start, kv_end)
    empty_rows = ~visibility(B, Nq, L, causal, kv_start, kv_end, window).any(-1)  # (B, Nq)
    assert empty_rows.any() == (causal and Nq == 3)
    do = torch.randn(B, H, Nq, D, device=DEVICE)
    do[empty_rows[:, None, :].expand(B, H, Nq)] *= 1e4  # a leak from these rows would dominate
    do = do.to(dtype)

    if options and DEVICE == "cuda":
        options += "," + GPU_TILE
    out, (dq, dk, dv) = run_and_compare(q, k, v, seed, causal=causal, kv_start=kv_start,
                                        kv_end=kv_end, window=window, do=do, clean_kv=clean_kv,
                                        options=options)
    rows = empty_rows[:, None, :].expand(B, H, Nq)
    assert (out[rows] == 0).all() and (dq[rows] == 0).all(), f"seed={seed}"
    assert (dk[unused] == 0).all() and (dv[unused] == 0).all(), f"seed={seed}"


def test_options(seed):
    """heavy_first (the one kernel option) computes the same attention: a causal prefill with
    left padding (GROUP = 3) and a bf16 decode step (Nq = 2) over a static cache with kv_end."""
    options = "heavy_first" + ("," + GPU_TILE if DEVICE == "cuda" else "")
    B, H, Hkv, D = 2, 6, 2, 32
    q, k, v = make_qkv(B, H, Hkv, 37, 37, D, torch.float32)
    run_and_compare(q, k, v, seed, causal=True, kv_start=torch.tensor([0, 9], device=DEVICE),
                    options=options)
    q, k, v = make_qkv(B, H, Hkv, 2, 50, D, torch.bfloat16)
    run_and_compare(q, k, v, seed, causal=True, kv_end=torch.tensor([50, 20], device=DEVICE),
                    options=options)


def test_options_parse(monkeypatch):
    options = fa.Options.parse("heavy_first+dkdv=32x128x4x2, tile=64x64x4x3")
    assert options.heavy_first and options.flags() == ("heavy_first",)
    # A kernel's own pin wins over tile=, whatever the order.
    assert options.tile("dkdv") == Tile(32, 128, 4, 2) and options.tile("fwd") == Tile(64, 64, 4, 3)
    assert fa.Options.parse(str(options)) == options
    assert fa.Options.parse("") == fa.Options() and str(fa.Options()) == "default"
    for text, message in (("fast", "unknown flash_attention option 'fast'"),
                          ("pack_gqa", "unknown flash_attention option 'pack_gqa'"),
                          ("tile=64x64", "is not BLOCK_MxBLOCK_NxWARPSxSTAGES"),
                          ("fwd=48x64x4x3", "blocks must be 16..256")):
        with pytest.raises(ValueError, match=message):
            fa.Options.parse(text)
    monkeypatch.setenv("FLASH_ATTENTION_OPTIONS", "bogus")
    with pytest.raises(ValueError, match="FLASH_ATTENTION_OPTIONS: unknown flash_attention"):
        flash_attention(*(t.to(DEVICE) for t in _inputs()))


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
def test_other_block_shapes(seed, block_m, block_n):
    """The block-range arithmetic (diagonal, kv_start, kv_end, ragged edges) with other tiles."""
    options = f"tile={block_m}x{block_n}x4x1"
    B, H, Hkv, D = 2, 2, 1, 16
    kv_start = torch.tensor([16, 20], device=DEVICE)  # on a block boundary, and inside a block
    # Nk - Nq = 14: some query block's first row sees keys exactly up to a key-block boundary;
    # Nk - Nq = 1: some query block's last row sees exactly one key of the next key block.
    for Nq, Nk in ((37, 51), (40, 41)):
        q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, torch.float32)
        run_and_compare(q, k, v, seed, causal=True, kv_start=kv_start, options=options)
    # kv_end on a block boundary (32) and inside a block (45) of a 51-key cache.
    q, k, v = make_qkv(B, H, Hkv, 20, 51, D, torch.float32)
    run_and_compare(q, k, v, seed, causal=True, kv_start=kv_start,
                    kv_end=torch.tensor([45, 32], device=DEVICE), options=options)


@triton.jit
def _block_ranges(PARAMS, WINDOWS, OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):
    """For the problem PARAMS[i] = (q_lo, q_hi, kv_lo, kv_hi, diag, window, Nq, start_n), the
    key blocks of query rows q_lo..q_hi and the query blocks of key block start_n. WINDOWS: the
    windows again, or None for none, which reaches the helpers as the kernels' None argument does
    (compiled, a None made inside a kernel cannot sit in a tuple; seen on triton 3.6, sm_90)."""
    p = PARAMS + tl.program_id(0) * 8
    window = WINDOWS
    if WINDOWS is not None:
        window = tl.load(WINDOWS + tl.program_id(0))
    seen = (tl.load(p + 2), tl.load(p + 3), tl.load(p + 4), window)
    key_blocks = fa._key_blocks(tl.load(p), tl.load(p + 1), seen, BLOCK_N, CAUSAL)
    query_blocks = fa._query_blocks(tl.load(p + 7), seen, tl.load(p + 6), BLOCK_M, BLOCK_N, CAUSAL)
    for s in tl.static_range(4):
        tl.store(OUT + tl.program_id(0) * 8 + s, key_blocks[s])
        tl.store(OUT + tl.program_id(0) * 8 + 4 + s, query_blocks[s])


@pytest.mark.parametrize("causal, windowed", [(True, True), (True, False), (False, False)])
def test_block_ranges_are_exact(seed, causal, windowed):
    """The block ranges of random problems (kv_start, kv_end, Nq < Nk and Nq > Nk, empty key
    ranges, windows) against brute force: [first, last) runs from the first to the last block
    that anyone sees (nothing else is read), and every block in [clean_lo, clean_hi) is seen
    whole by every row, so the unmasked stage may skip the mask."""
    BM, BN = 16, 32
    problems = []
    for _ in range(48):
        Nk, Nq = (int(x) for x in torch.randint(1, 120, (2,)))
        kv_lo, kv_hi = sorted(int(x) for x in torch.randint(0, Nk + 1, (2,)))
        window = int(torch.randint(1, Nk + 3, ()))
        q_lo = BM * int(torch.randint(0, triton.cdiv(Nq, BM), ()))
        start_n = BN * int(torch.randint(0, triton.cdiv(Nk, BN), ()))
        problems.append((q_lo, min(q_lo + BM, Nq) - 1, kv_lo, kv_hi, kv_hi - Nq, window, Nq,
                         start_n))
    out = torch.zeros(len(problems), 8, dtype=torch.int32, device=DEVICE)
    params = torch.tensor(problems, dtype=torch.int32, device=DEVICE)
    _block_ranges[(len(problems),)](params, params[:, 5].contiguous() if windowed else None, out,
                                    BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal)

    def check(name, blocks, bounds, rows, size):
        """blocks: the (rows, keys) visibility of each block of `size` rows, of `rows` in all."""
        first, clean_lo, clean_hi, last = bounds
        seen = [n for n, block in enumerate(blocks) if block.any()]
        assert (first, last) == ((seen[0], seen[-1] + 1) if seen else (first, first)), name
        # Even an empty range starts inside the rows: a pipelined loop computes the addresses of
        # its first iterations before it tests its bound.
        assert first * size <= rows, name
        assert first <= clean_lo <= clean_hi <= last, name
        assert all(block.all() for block in blocks[clean_lo:clean_hi]), name

    for problem, bounds in zip(problems, out.tolist()):
        q_lo, q_hi, kv_lo, kv_hi, diag, window, Nq, start_n = problem
        Nk = triton.cdiv(max(kv_hi, 1), BN) * BN
        visible = torch.zeros(triton.cdiv(Nq, BM) * BM, Nk, dtype=torch.bool)  # padding: False
        visible[:Nq] = reference_visibility(1, Nq, Nk, causal, torch.tensor([kv_lo]),
                                            torch.tensor([kv_hi]), "cpu",
                                            window if windowed else None)[0]
        name = f"{problem} (seed={seed})"
        check(f"key blocks of {name}", visible[q_lo:q_hi + 1].split(BN, dim=1), bounds[:4], Nk, BN)
        check(f"query blocks of {name}", visible[:, start_n:start_n + BN].split(BM), bounds[4:], Nq, BM)


@pytest.mark.parametrize("B, H, Hkv, Nq, Nk, window, dtype, kv_range, options", [
    pytest.param(2, 4, 2, 40, 40, 2, torch.float32, False, None, id="w2-gqa"),
    pytest.param(2, 2, 1, 37, 51, 13, torch.float32, True, "tile=32x16x4x1",
                 id="w13-kv_start-kv_end-Nq<Nk-tile32x16"),
    pytest.param(1, 4, 1, 33, 70, 40, torch.bfloat16, False, None, id="w40-mqa-bf16"),
])
def test_window(seed, B, H, Hkv, Nq, Nk, window, dtype, kv_range, options):
    """Sliding-window attention: query i sees the `window` keys ending at its own position
    i + kv_end - Nq: a window of 2, one that starts inside a block, cut by kv_start (on and
    off a block boundary) and kv_end, and one that spans blocks."""
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, 16, dtype)
    kv_start = torch.tensor([0, 20], device=DEVICE)[:B] if kv_range else None
    kv_end = torch.tensor([51, 45], device=DEVICE)[:B] if kv_range else None
    visible = visibility(B, Nq, Nk, True, kv_start, kv_end, window)
    assert (visible.sum(-1) <= window).all() and (visible.sum(-1) == min(window, Nk)).any()
    if options and DEVICE == "cuda":
        options += "," + GPU_TILE
    run_and_compare(q, k, v, seed, kv_start=kv_start, kv_end=kv_end, window=window,
                    options=options)


def test_window_of_one_sees_itself(seed):
    """window=1: each query sees only the key at its own position, so its output is that
    key's value exactly (p = 1, l = 1), in every query head of the group."""
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 21, 40, 16
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, torch.float32)
    out = flash_attention(q, k, v, window=1)
    assert torch.equal(out, v.repeat_interleave(H // Hkv, dim=1)[:, :, Nk - Nq:]), f"seed={seed}"


def test_window_reads_no_block_left_of_every_window(seed):
    """8 queries over 100 keys with a window of 20: the keys seen start at 100 - 8 - 20 + 1 = 73,
    so the two 32-key blocks before 64 are seen by nobody. They hold NaN/inf: none of it may
    reach any result (they are not read), and their dK/dV are exact zeros."""
    B, H, Hkv, Nq, Nk, D, window = 1, 2, 1, 8, 100, 16, 20
    options = "tile=16x32x4x1"  # 32-key blocks in all three kernels
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, torch.float32)
    unused = (torch.arange(Nk, device=DEVICE) < 64)[None, None, :].expand(B, Hkv, Nk)
    assert not visibility(B, Nq, Nk, True, window=window)[..., :73].any()
    clean_kv = k.masked_fill(unused[..., None], 0), v.masked_fill(unused[..., None], 0)
    k = k.masked_fill(unused[..., None], float("nan"))
    v = v.masked_fill(unused[..., None], float("inf"))
    _, (dq, dk, dv) = run_and_compare(q, k, v, seed, window=window, options=options,
                                      clean_kv=clean_kv)
    assert (dk[unused] == 0).all() and (dv[unused] == 0).all(), f"seed={seed}"


def test_window_is_transformers_mistral_mask():
    """The reference's window is transformers' sliding-window causal mask (Mistral): key j is
    visible to query i iff j <= i and i - j < sliding_window."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    N = 24
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    for window in (1, 5, 24):
        theirs = masking_utils.sliding_window_causal_mask_function(window)(0, 0, i, j)
        assert torch.equal(visibility(1, N, N, True, window=window)[0].cpu(), theirs)


VARLEN_CASES = [
    # query lengths, key lengths (None: the same), H, Hkv, D, causal, window, dtype
    pytest.param([1, 37, 16, 5], None, 4, 2, 32, True, None, torch.float32, id="causal-gqa"),
    pytest.param([3, 20, 1], [17, 1, 40], 2, 1, 16, False, None, torch.bfloat16,
                 id="noncausal-mqa-bf16"),
    pytest.param([30, 1, 0, 9], [45, 33, 6, 4], 4, 2, 16, True, 7, torch.float32,
                 id="causal-window-Nq>Nk-empty"),
]


@pytest.mark.parametrize("q_lens, k_lens, H, Hkv, D, causal, window, dtype", VARLEN_CASES)
def test_varlen_matches_reference(seed, q_lens, k_lens, H, Hkv, D, causal, window, dtype):
    """Packed sequences attend to themselves only: lengths of 1 (and 0) and not multiples of the
    tiles, a query per key or not, more queries than keys (causal: the first rows see nothing),
    GQA. q, k, v are strided views (q every other head of a wider tensor, k and v halves of
    one). Rows past the last sequence hold NaN/inf and get output and gradients exactly 0."""
    k_lens = k_lens or q_lens
    cu_q, cu_k = seqlens(q_lens), seqlens(k_lens)
    used_q, used_k = sum(q_lens), sum(k_lens)
    q = randn(used_q + 2, 2 * H, D, dtype=dtype)[:, ::2]
    kv = randn(used_k + 3, 2, Hkv, D, dtype=dtype)
    q[used_q:], kv[used_k:, 0], kv[used_k:, 1] = float("nan"), float("nan"), float("inf")
    k, v = kv[:, 0], kv[:, 1]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    scale = D ** -0.5
    out, (dq, dk, dv) = compare(
        seed, (q, k, v),
        lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, max(q_lens),
                                               max(k_lens) + 5, causal=causal, window=window),
        lambda q, k, v: reference_varlen(q, k, v, cu_q, cu_k, causal, scale, window),
        label=f"varlen window={window}")
    assert (out[used_q:] == 0).all() and (dq[used_q:] == 0).all(), f"seed={seed}"
    assert (dk[used_k:] == 0).all() and (dv[used_k:] == 0).all(), f"seed={seed}"


def test_varlen_matches_dense_per_sequence(seed):
    """Each packed sequence gives what the dense kernel gives for it alone: the same blocks in
    the same order, so bit for bit in the interpreter (and on a GPU within rounding)."""
    q_lens, k_lens, H, Hkv, D, window = [1, 21, 16], [20, 29, 48], 4, 2, 16, 9
    cu_q, cu_k = seqlens(q_lens), seqlens(k_lens)
    q, k, v = (t.requires_grad_() for t in make_qkv_varlen(sum(q_lens), sum(k_lens), H, Hkv, D,
                                                           torch.float32))
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), window=window)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    as_dense = lambda t: t.detach().transpose(0, 1)[None].requires_grad_()  # noqa: E731
    same = torch.equal if fa.INTERPRETED else \
        lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    for b in range(len(q_lens)):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        parts = as_dense(q[rows_q]), as_dense(k[rows_k]), as_dense(v[rows_k])
        alone = flash_attention(*parts, window=window)
        alone_grads = torch.autograd.grad(alone, parts, do[rows_q].transpose(0, 1)[None])
        assert same(out[rows_q], alone[0].transpose(0, 1)), f"out of sequence {b} (seed={seed})"
        for name, got, want, rows in zip(("dq", "dk", "dv"), grads, alone_grads,
                                         (rows_q, rows_k, rows_k)):
            assert same(got[rows], want[0].transpose(0, 1)), f"{name} of sequence {b} (seed={seed})"


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_torch_compile_fullgraph(seed, layout):
    """torch.compile(fullgraph=True) sees the kernels as custom operators: one graph, no break.
    Forward and backward (dense with kv_start and kv_end; varlen with a window) match the
    reference, and eager bit for bit (the same kernels run on the same tiles)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    if layout == "dense":
        B, H, Hkv, Nq, Nk, D = 2, 4, 2, 3, 40, 16
        kwargs = dict(kv_start=torch.tensor([0, 5], device=DEVICE),
                      kv_end=torch.tensor([Nk, 23], device=DEVICE))
        q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, torch.float32)
        attention = flash_attention
        attention64 = lambda q, k, v: reference(q, k, v, True, D ** -0.5, **kwargs)  # noqa: E731
    else:
        kwargs = dict(cu_seqlens_q=seqlens([5, 1, 12]), cu_seqlens_k=seqlens([5, 9, 12]),
                      max_seqlen_q=12, max_seqlen_k=12, window=4)
        q, k, v = make_qkv_varlen(18, 26, 4, 2, 16, torch.float32)
        attention = flash_attention_varlen
        attention64 = lambda q, k, v: reference_varlen(  # noqa: E731
            q, k, v, kwargs["cu_seqlens_q"], kwargs["cu_seqlens_k"], True, 0.25, window=4)
    compiled = torch.compile(attention, fullgraph=True, backend=backend)
    do = torch.randn_like(q)
    out, grads = compare(seed, (q, k, v), lambda q, k, v: compiled(q, k, v, **kwargs),
                         attention64, do, label=f"compiled {layout}")
    assert backend.frame_count == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert "triton_kernels.flash_attention_fwd" in str(backend.graphs[0].graph)

    eager = attention(q, k, v, **kwargs)
    eager_grads = torch.autograd.grad(eager, (q, k, v), do)
    assert torch.equal(out, eager) and all(map(torch.equal, grads, eager_grads))


def test_custom_ops_opcheck(seed):
    """torch.library.opcheck: schema (no mutation, no aliasing), fake tensors (shapes, strides,
    dtypes), autograd registration and AOT dispatch of both operators, in both layouts."""
    q, k, v = make_qkv(1, 2, 1, 3, 20, 16, torch.bfloat16)
    kv_start = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    kv_end = torch.tensor([15], dtype=torch.int32, device=DEVICE)
    dense = (True, 0.25, None, kv_start, kv_end, None, None, 3, 20)
    cu_q, cu_k = seqlens([1, 4]).int(), seqlens([6, 4]).int()
    varlen = (True, 0.25, 3, None, None, cu_q, cu_k, 4, 6)
    options = GPU_TILE if DEVICE == "cuda" else "default"  # options as text
    for (q, k, v), args in (((q, k, v), dense), (make_qkv_varlen(5, 10, 2, 1, 16, torch.float32),
                                                 varlen)):
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        torch.library.opcheck(fa._fwd_op, (q, k, v, *args, None))
        o, lse = (t.detach() for t in fa._fwd_op(q, k, v, *args, None))
        do = torch.randn_like(o)
        torch.library.opcheck(fa._bwd_op, (do, *(t.detach() for t in (q, k, v)), o, lse, *args,
                                           options))


def test_no_measuring_during_cuda_graph_capture(tmp_path, monkeypatch):
    """During capture only a tile chosen earlier will do (measuring synchronizes the device):
    the tuner then measures nothing, and an unknown problem is one clear error."""
    from triton_kernels import tuning

    monkeypatch.setenv("FLASH_ATTENTION_TUNE_CACHE", str(tmp_path))
    launched = []
    monkeypatch.setattr(tuning, "do_bench", lambda fn, **_: fn() or 1.0)
    tuner = tuning.Tuner("fwd", [Tile(64, 64, 4, 3)])
    assert tuner.pick(("key",), launched.append, measure=False) is None and launched == []
    assert tuner.pick(("key",), launched.append) == Tile(64, 64, 4, 3) and launched
    assert tuner.pick(("key",), None, measure=False) == Tile(64, 64, 4, 3)
    # A fresh process finds the published choice in the cache folder, without measuring.
    assert tuning.Tuner("fwd", []).pick(("key",), None, measure=False) == Tile(64, 64, 4, 3)

    monkeypatch.setattr(fa, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="run the call once outside the capture first"):
        fa._launch("fwd", None, None, 1, (), {}, fa.Options(), ("unmeasured",), torch.float16)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_capture(seed, tmp_path, monkeypatch):
    """As the compiled decode step does: a warm-up call (which measures the tiles), then a CUDA
    graph capture that reuses them; a replay on new inputs matches eager."""
    monkeypatch.setenv("FLASH_ATTENTION_OPTIONS", "")  # no pinned tile: go through the tuner
    monkeypatch.setenv("FLASH_ATTENTION_TUNE_CACHE", str(tmp_path))
    for tuner in fa._TUNERS.values():  # one candidate each: measuring stays quick
        monkeypatch.setattr(tuner, "candidates", [Tile(32, 32, 4, 2)])
        monkeypatch.setattr(tuner, "chosen", {})
    B, H, Hkv, L, D = 2, 4, 2, 64, 32
    q, k, v = make_qkv(B, H, Hkv, 1, L, D, torch.bfloat16)
    kv_start = torch.tensor([0, 3], device=DEVICE)
    kv_end = torch.tensor([40, 17], device=DEVICE)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        flash_attention(q, k, v, kv_start=kv_start, kv_end=kv_end)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_attention(q, k, v, kv_start=kv_start, kv_end=kv_end)
    q.copy_(torch.randn_like(q))
    kv_end.copy_(torch.tensor([64, 30]))
    graph.replay()
    assert torch.equal(out, flash_attention(q, k, v, kv_start=kv_start, kv_end=kv_end))
    ref = reference(q, k, v, True, D ** -0.5, kv_start, kv_end)
    assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16], f"seed={seed}"


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


@pytest.mark.parametrize("name", ["kv_start", "kv_end"])
@pytest.mark.parametrize("value, message", [
    (torch.tensor([0.0]), "must be an integer tensor of shape \\(1,\\)"),
    (torch.tensor([0, 1]), "must be an integer tensor of shape \\(1,\\)"),
    (torch.tensor([True]), "must be an integer tensor of shape \\(1,\\)"),
    ([3], "must be an integer tensor of shape \\(1,\\)"),
    (torch.tensor([3], device="meta"), "is on meta, q on cpu"),
])
def test_bad_kv_range(name, value, message):
    with pytest.raises(ValueError, match=f"flash_attention: {name} {message}"):
        flash_attention(*_inputs(), **{name: value})


@pytest.mark.parametrize("window, causal, message", [
    (0, True, "window must be a positive integer or None, got 0"),
    (2.5, True, "window must be a positive integer or None, got 2.5"),
    (True, True, "window must be a positive integer or None, got True"),
    (4, False, "window needs causal=True"),
])
def test_bad_window(window, causal, message):
    with pytest.raises(ValueError, match=message):
        flash_attention(*_inputs(), causal=causal, window=window)


def _varlen_inputs(total_q=6, total_k=6, q_heads=2, kv_heads=2, D=16):
    q, k, v = (torch.randn(shape) for shape in ((total_q, q_heads, D), (total_k, kv_heads, D),
                                                (total_k, kv_heads, D)))
    return q, k, v, torch.tensor([0, 2, 6]), torch.tensor([0, 2, 6]), 4, 4


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.randn(1, 6, 2, 16)), "q must be a 3-D tensor \\(total, heads, D\\)"),
    (dict(k=torch.randn(6, 2, 32), v=torch.randn(6, 2, 32)), "must agree on head dim"),
    (dict(q=torch.randn(6, 3, 16)), "must be a multiple of the number of kv heads"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 2.0, 6.0])), "cu_seqlens_q must be an integer tensor"),
    (dict(cu_seqlens_q=torch.tensor([6])), "cu_seqlens_q must be a 1-D tensor of n \\+ 1 >= 2"),
    (dict(cu_seqlens_k=torch.tensor([0, 6])), "cu_seqlens_k must be an integer tensor of shape"),
    (dict(max_seqlen_q=0), "max_seqlen_q must be a positive integer, got 0"),
    (dict(max_seqlen_k=torch.tensor(4)), "max_seqlen_k must be a positive integer"),
    (dict(causal=False, window=3), "window needs causal=True"),
])
def test_bad_varlen_inputs(change, message):
    names = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
    kwargs = dict(zip(names, _varlen_inputs()), **change)
    with pytest.raises(ValueError, match=message):
        flash_attention_varlen(**kwargs)


@pytest.mark.parametrize("sm_scale", [0.0, -1.0, float("nan"), float("inf"), "0.1"])
def test_bad_sm_scale(sm_scale):
    with pytest.raises(ValueError, match="sm_scale must be a positive number"):
        flash_attention(*_inputs(), sm_scale=sm_scale)


def test_tuner_shares_one_choice(tmp_path, monkeypatch):
    """A measured tile is published once; another process with other (noisy) timings adopts it
    instead of measuring; a tile that does not compile is skipped; the first writer wins."""
    from triton.runtime.errors import OutOfResources

    from triton_kernels import tuning

    monkeypatch.setenv("FLASH_ATTENTION_TUNE_CACHE", str(tmp_path))
    small, wide, huge = Tile(64, 64, 4, 3), Tile(128, 64, 8, 3), Tile(128, 128, 8, 4)

    def process(times_ms):
        """A tuner as a fresh process has it, and a fake clock that reports times_ms[tile]."""
        launched = []

        def launch(tile):
            if tile == huge:
                raise OutOfResources(300_000, 232_448, "shared memory")
            launched.append(tile)

        monkeypatch.setattr(tuning, "do_bench", lambda fn, **_: fn() or times_ms[launched[-1]])
        return tuning.Tuner("fwd", [small, wide, huge]), launch, launched

    key = ("torch.bfloat16", 128, True, 1, 4096, 4096)
    first, launch, launched = process({small: 2.0, wide: 1.0})
    assert first.pick(key, launch) == wide and set(launched) == {small, wide}
    (published,) = tmp_path.glob("fwd-*.json")
    record = json.loads(published.read_text())
    assert record["tile"] == "128x64x8x3" and set(record["timings_ms"]) == {"64x64x4x3",
                                                                            "128x64x8x3"}
    second, launch, launched = process({small: 1.0, wide: 2.0})
    assert second.pick(key, launch) == wide and launched == []  # read, not measured

    # Two processes that measured at once: the second to publish reads the first one's choice.
    path = tmp_path / "race.json"
    tuning._publish(path, dict(tile="64x64x4x3"))
    tuning._publish(path, dict(tile="128x64x8x3"))
    assert tuning._read_choice(path) == small
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([published.name, "race.json"])

    monkeypatch.setenv("FLASH_ATTENTION_TUNE_CACHE", "off")
    third, launch, launched = process({small: 1.0, wide: 2.0})
    assert third.pick(key, launch) == small and len(list(tmp_path.iterdir())) == 2


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
