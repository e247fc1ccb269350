"""FlashAttention forward and backward in Triton: GQA/MQA, bottom-right causal masking, sliding
windows, left padding (``kv_start``), a per-row key count (``kv_end``, for a static KV cache) and
variable-length packed sequences (``flash_attention_varlen``). docs/kernel.md has the long form.

Layouts. Dense: q (B, H, Nq, D), k and v (B, Hkv, Nk, D). Varlen: q (total_q, H, D), k and v
(total_k, Hkv, D), sequence b being rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and rows
[cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v. Hkv divides H, and query head h reads kv head
h // (H // Hkv) in place: K/V are never repeated. Inputs may be strided views; the kernels take
(batch, head, row, column) strides, with batch stride 0 for varlen, where a program finds its
sequence's rows through cu_seqlens instead (``_sequence``: the only thing VARLEN changes).

Kernels. ``_attn_fwd``: one program per (query block, batch * head) streams key/value blocks
through an online softmax (running max, running sum, rescaled fp32 accumulator) and saves only
the output and the per-row log-sum-exp. The backward recomputes P from Q, K and that log-sum-exp:
``_attn_bwd_preprocess`` computes delta = rowsum(dO * O), ``_attn_bwd_dkdv`` owns one key block
of one kv head and loops over every query head of its group (dK/dV need no atomics), and
``_attn_bwd_dq`` owns one query block of one head. Every output element is written by exactly
one program, which is also why tile tuning can rerun the kernels without resetting anything.

Masking. Within a sequence, query i sits at key position p_i = i + kv_end - Nq (bottom-right
alignment to the last existing key) and sees key j iff kv_start <= j < kv_end and, when causal,
p_i - window < j <= p_i (window = None: no lower bound). Defaults: kv_start = 0, kv_end = Nk;
varlen sequences have neither (all their keys exist). Each program splits its loop over key (or
query) blocks into stages: masked, unmasked, masked (``_blocks``): the ragged edges, the causal
diagonal, the window's left edge and the kv_start/kv_end boundaries are masked, the blocks in
between fully visible, and blocks nobody sees are skipped: never read. K/V rows outside
[kv_start, kv_end) (or outside the sequence) are never used, not even multiplied by zero: an
uninitialized cache tail (NaN, inf) cannot leak into any result. Rows that see no key output
exactly 0 with log-sum-exp = +inf, so the backward recomputes P = exp(S - lse) = 0 for them and
they add nothing to any gradient; dK/dV of keys nobody sees are exact zeros.

Options (``Options``): ``heavy_first`` launches the most loaded tiles of a causal mask first; it
has never been measured on a GPU and is off by default. Pinned tiles (block shapes, warps, stages)
per kernel; otherwise a tile is measured once per problem key and shared through a cache file
(tuning.py). FLASH_ATTENTION_OPTIONS sets the default, e.g. "tile=64x64x4x3" or
"heavy_first,dkdv=64x128x8x2".

torch.compile and CUDA graphs: the forward and backward are the custom operators
triton_kernels::flash_attention_fwd and triton_kernels::flash_attention_bwd (both layouts),
opaque to dynamo, so a compiled model has no graph break at attention and fullgraph=True works.
A tile is measured at the first call of each problem key, and measuring synchronizes the device,
which a CUDA graph capture forbids: capture after a warm-up call of the same shapes (as the
compiled decode step and torch.compile's mode="reduce-overhead" do), or pin tiles in the
options. A capture that would have to measure raises a RuntimeError that says so.

Interpreter (TRITON_INTERPRET=1, CPU): triton 3.9's interpreter computes bf16 tl.dot and bf16
arithmetic wrongly (triton issue 11584) and truncates fp32 -> bf16 casts. Under the interpreter
every loaded tile is therefore converted to fp32 before any arithmetic (UPCAST), and bf16 results
are stored as fp32 and rounded by torch. On the GPU fp16/bf16 tiles go to the tensor cores as
they are (P and dS are cast to the input dtype for their dots, as in every FlashAttention);
fp32 tiles use input_precision="ieee" instead of TF32.
"""
import dataclasses
import functools
import math
import numbers
import os
import re
import warnings
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .tuning import Tile, Tuner

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Decided once per process, when this module is imported, as triton.jit decides whether the
# kernels below compile or run in the interpreter.
INTERPRETED = bool(triton.knobs.runtime.interpret)
UPCAST = tl.constexpr(INTERPRETED)  # convert loaded tiles to fp32 (see the module docstring)
LOG2E = tl.constexpr(1.4426950408889634)  # the kernels use exp2: scores are scaled by log2(e)


# ----------------------------------------------------------------------------------------------
# Helpers shared by the kernels. A view is (pointer, head stride, row stride, column stride):
# one head's (rows, HEAD_DIM) matrix of one batch row (or sequence), from its first row on.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _view(T, strides, b, h, first_row):
    """The view of head h of batch row b, from row first_row on; strides are T's (batch, head,
    row, column) strides."""
    return (T + b * strides[0] + h * strides[1] + first_row * strides[2],
            strides[1], strides[2], strides[3])


@triton.jit
def _next_head(view, g):
    """The same rows of the head g heads further on."""
    return (view[0] + g * view[1], view[1], view[2], view[3])


@triton.jit
def _load_rows(view, rows, row_ok, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """Rows `rows` of a view as a [len(rows), HEAD_DIM] tile (fp32 under the interpreter). With
    MASKED, rows where row_ok is false read as 0 and are not touched in memory."""
    ptrs = view[0] + rows[:, None] * view[2] + tl.arange(0, HEAD_DIM)[None, :] * view[3]
    if MASKED:
        tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        tile = tl.load(ptrs)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_rows(view, rows, row_ok, tile, HEAD_DIM: tl.constexpr):
    """Store a [len(rows), HEAD_DIM] tile at the rows of a view where row_ok holds."""
    ptrs = view[0] + rows[:, None] * view[2] + tl.arange(0, HEAD_DIM)[None, :] * view[3]
    tl.store(ptrs, tile.to(view[0].dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dot(a, b, acc=None):
    """a @ b (+ acc), accumulated in fp32: exact for fp32 tiles (not TF32), tensor cores for
    fp16/bf16 ones."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _program_ids(HEAVY_FIRST: tl.constexpr, LAST_TILE_HEAVIEST: tl.constexpr):
    """(tile index along the sequence, batch * head index) of this program. The GPU starts
    programs in grid order, x fastest. With HEAVY_FIRST the grid is (heads, tiles), so that the
    tiles with the most work (under a causal mask) start first, in every head at once, and the
    cheap ones fill the gaps at the end instead of a few long ones running alone."""
    if HEAVY_FIRST:
        tile = tl.program_id(1)
        if LAST_TILE_HEAVIEST:
            tile = tl.num_programs(1) - 1 - tile
        return tile, tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _sequence(b, Nq, Nk, CU_SEQLENS_Q, CU_SEQLENS_K, KV_START, KV_END, VARLEN: tl.constexpr):
    """Where the queries and keys of batch row (or sequence) b are: (q_first, Nq, k_first, Nk,
    kv_lo, kv_hi). Its queries are rows [q_first, q_first + Nq) of Q, its keys rows
    [k_first, k_first + Nk) of K and V, and its queries may see keys [kv_lo, kv_hi), counted
    from k_first."""
    q_first = 0
    k_first = 0
    if VARLEN:  # packed sequences: the rows come from the cumulative lengths
        q_begin = tl.load(CU_SEQLENS_Q + b)
        Nq = tl.load(CU_SEQLENS_Q + b + 1) - q_begin
        k_begin = tl.load(CU_SEQLENS_K + b)
        Nk = tl.load(CU_SEQLENS_K + b + 1) - k_begin
        q_first = q_begin.to(tl.int64)
        k_first = k_begin.to(tl.int64)
    kv_lo = 0
    kv_hi = Nk
    if KV_START is not None:
        kv_lo = tl.load(KV_START + b)
    if KV_END is not None:
        kv_hi = tl.load(KV_END + b)
    return q_first, Nq, k_first, Nk, kv_lo, kv_hi


@triton.jit
def _visible(i, j, seen, CAUSAL: tl.constexpr):
    """Whether query row i may see key row j (broadcast against each other). seen = (kv_lo,
    kv_hi, diag, window): query i sits at key position i + diag and, when causal, sees the keys
    up to there, at most `window` of them (None: all)."""
    kv_lo, kv_hi, diag, window = seen
    ok = (j >= kv_lo) & (j < kv_hi)
    if CAUSAL:
        ok = ok & (j <= i + diag)
        if window is not None:
            ok = ok & (j > i + diag - window)
    return ok


@triton.jit
def _blocks(any_lo, any_hi, all_lo, all_hi, BLOCK: tl.constexpr):
    """Bounds first <= clean_lo <= clean_hi <= last of the blocks [n * BLOCK, (n + 1) * BLOCK)
    to visit when some row sees [any_lo, any_hi) and every row sees [all_lo, all_hi): blocks
    [first, last) meet the first range, and of those [clean_lo, clean_hi) lie inside the
    second, so the loop over them needs no mask (the stages: masked, unmasked, masked). Lower
    bounds are >= 0; an upper bound at or below its lower bound means an empty range. Callers
    keep any_lo within the rows (software pipelining computes the addresses of a loop's first
    iterations before it tests the bound, even for an empty range)."""
    first = any_lo // BLOCK
    last = tl.where(any_hi > any_lo, tl.cdiv(any_hi, BLOCK), first)
    clean_lo = tl.minimum(tl.maximum(tl.cdiv(all_lo, BLOCK), first), last)
    clean_hi = tl.minimum(tl.maximum(tl.maximum(all_hi, 0) // BLOCK, clean_lo), last)
    return first, clean_lo, clean_hi, last


@triton.jit
def _key_blocks(q_lo, q_hi, seen, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key blocks seen by query rows q_lo..q_hi (inclusive), as _blocks."""
    kv_lo, kv_hi, diag, window = seen
    if not CAUSAL:
        return _blocks(kv_lo, kv_hi, kv_lo, kv_hi, BLOCK_N)
    # Query i sees keys (i + diag - window, i + diag]: both ends grow with i.
    any_lo = kv_lo
    all_lo = kv_lo
    if window is not None:
        any_lo = tl.maximum(q_lo + diag - window + 1, kv_lo)
        all_lo = tl.maximum(q_hi + diag - window + 1, kv_lo)
    return _blocks(any_lo, tl.minimum(q_hi + diag + 1, kv_hi), all_lo,
                   tl.minimum(q_lo + diag + 1, kv_hi), BLOCK_N)


@triton.jit
def _query_blocks(start_n, seen, Nq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):
    """Query blocks that see key rows [start_n, start_n + BLOCK_N), as _blocks."""
    kv_lo, kv_hi, diag, window = seen
    n_lo = tl.maximum(start_n, kv_lo)  # the block's visible keys: n_lo..n_hi
    n_hi = tl.minimum(start_n + BLOCK_N, kv_hi) - 1
    any_lo, any_hi, all_lo, all_hi = 0, Nq, 0, Nq
    if CAUSAL:  # key j is seen by queries [j - diag, j - diag + window)
        any_lo = tl.maximum(n_lo - diag, 0)
        all_lo = tl.maximum(n_hi - diag, 0)
        if window is not None:
            any_hi = tl.minimum(n_hi - diag + window, Nq)
            all_hi = tl.minimum(n_lo - diag + window, Nq)
    # No visible key: nobody sees the block, and the empty range starts at query block 0 (a key
    # block past a short row's kv_end would otherwise start it far past Nq). A hidden key in the
    # block: every query block needs the mask.
    any_lo = tl.where(n_lo <= n_hi, any_lo, 0)
    any_hi = tl.where(n_lo <= n_hi, any_hi, 0)
    all_hi = tl.where((n_lo == start_n) & (n_hi == start_n + BLOCK_N - 1), all_hi, 0)
    return _blocks(any_lo, any_hi, all_lo, all_hi, BLOCK_M)


# ----------------------------------------------------------------------------------------------
# Tile candidates and options
# ----------------------------------------------------------------------------------------------


def _fix_interpreter_range_bounds():
    """Triton 3.6's interpreter turns a scalar into a range() bound with int() on a 1-element
    array, which numpy >= 2.5 refuses ("only 0-dimensional arrays ..."); triton 3.9 squeezes the
    array first. Do the same here, so the kernels interpret under either version."""
    from triton.runtime import interpreter
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes_index", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes_index = True
    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _fix_interpreter_range_bounds()

KERNELS = ("fwd", "dkdv", "dq")
# Hopper candidates for fp16/bf16, (BLOCK_M, BLOCK_N, num_warps, num_stages), measured once per
# problem key. bench/gpu/compile_configs.py compiles each for sm_90 and lists registers, spills
# and shared memory: with triton 3.6 (the GPU machine's), every one here compiles at D=64 and
# D=128 without spilling a register and within 227 KB of shared memory.
CANDIDATES = {
    "fwd": [Tile(128, 64, 8, 3), Tile(128, 64, 8, 4), Tile(128, 128, 8, 2), Tile(64, 64, 4, 3),
            Tile(64, 64, 4, 4), Tile(64, 128, 8, 3)],
    # dK/dV programs own BLOCK_N keys and stream BLOCK_M queries; 128-query tiles spill there.
    "dkdv": [Tile(64, 64, 8, 2), Tile(64, 64, 8, 3), Tile(64, 64, 8, 4), Tile(64, 128, 8, 2),
             Tile(64, 128, 8, 3)],
    "dq": [Tile(128, 64, 8, 2), Tile(128, 64, 8, 3), Tile(64, 64, 8, 3), Tile(64, 64, 4, 3)],
}
# fp32 inputs take exact ("ieee") dots, which run on the CUDA cores and hold whole tiles in
# registers: large tiles spill kilobytes and take minutes to compile; small ones compile in
# seconds (and still spill at D=128). fp32 is the exact path, not the fast one.
CANDIDATES_FP32 = {name: [Tile(16, 32, 4, 2), Tile(32, 32, 4, 2)] for name in KERNELS}
# Not measured by default (each candidate costs tuning time in every new shape), but selectable
# (Options, e.g. "dkdv=32x128x8x3") and compiled by compile_configs.py --extra, so the GPU suite
# can time them side by side: other dK/dV block shapes (fewer queries per step).
EXTRA_TILES = {"fwd": [], "dq": [], "dkdv": [Tile(32, 128, 8, 3), Tile(32, 64, 4, 3)]}
# The interpreter runs one small tile (speed means nothing there); BLOCK_M != BLOCK_N on purpose,
# to exercise the block-range arithmetic.
INTERPRETER_TILE = Tile(16, 32, 4, 1)
_TUNERS = {(name, fp32): Tuner(name, (CANDIDATES_FP32 if fp32 else CANDIDATES)[name])
           for name in KERNELS for fp32 in (False, True)}
_PREPROCESS_BLOCK_M = 64


@dataclasses.dataclass(frozen=True)
class Options:
    """Kernel variants (see the module docstring); every one computes the same result."""
    heavy_first: bool = False  # not measured on a GPU yet
    tiles: tuple = ()  # ((kernel name, Tile), ...): pinned tiles, not measured

    def tile(self, kernel):
        return dict(self.tiles).get(kernel)

    def flags(self):
        return tuple(name for name in FLAGS if getattr(self, name))

    def __str__(self):
        tiles = dict(self.tiles)
        if len(tiles) == len(KERNELS) and len(set(tiles.values())) == 1:
            pins = [f"tile={tiles[KERNELS[0]]}"]
        else:
            pins = [f"{k}={t}" for k, t in self.tiles]
        return ",".join([*self.flags(), *pins]) or "default"

    @classmethod
    def parse(cls, text):
        """'heavy_first,tile=64x64x4x3,dkdv=64x128x8x2' (',', '+' or spaces between items;
        'tile=' pins all three kernels, 'fwd=', 'dkdv=', 'dq=' one)."""
        flags, tiles, specific = {}, {}, {}
        for item in re.split(r"[,+\s]+", text.strip()):
            name, _, value = item.partition("=")
            if item in ("", "default"):
                continue
            if name in FLAGS and not value:
                flags[name] = True
            elif name == "tile" and value:
                tiles.update(dict.fromkeys(KERNELS, Tile.parse(value)))
            elif name in KERNELS and value:
                specific[name] = Tile.parse(value)  # wins over tile=, whatever the order
            else:
                raise ValueError(f"unknown flash_attention option {item!r}; known: "
                                 f"{', '.join(FLAGS)}, tile=, fwd=, dkdv=, dq= (tiles as "
                                 f"BLOCK_MxBLOCK_NxWARPSxSTAGES)")
        return cls(**flags, tiles=tuple(sorted({**tiles, **specific}.items())))


FLAGS = tuple(f.name for f in dataclasses.fields(Options) if f.type is bool)


@functools.lru_cache(maxsize=8)
def _options_from_env(text):
    try:
        return Options.parse(text)
    except ValueError as e:
        raise ValueError(f"FLASH_ATTENTION_OPTIONS: {e}") from None


def default_options():
    return _options_from_env(os.environ.get("FLASH_ATTENTION_OPTIONS", ""))


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_view, v_view, offs_m, seen, qk_scale, block_lo, block_hi,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    MASKED: tl.constexpr):
    """Online softmax over key blocks [block_lo, block_hi); m_i is in scaled base-2 units."""
    kv_lo, kv_hi = seen[0], seen[1]
    for block in range(block_lo, block_hi):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= kv_lo) & (offs_n < kv_hi)
        k = _load_rows(k_view, offs_n, key_ok, HEAD_DIM, MASKED)
        v = _load_rows(v_view, offs_n, key_ok, HEAD_DIM, MASKED)
        qk = _dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            qk = tl.where(_visible(offs_m[:, None], offs_n[None, :], seen, CAUSAL), qk,
                          -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key yet has m = -inf: subtract 0 instead, so that
        # exp2(-inf - m) is 0 rather than NaN.
        m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU_SEQLENS_Q, CU_SEQLENS_K, KV_START, KV_END,
              q_strides, k_strides, v_strides, o_strides, lse_strides,
              sm_scale, window, H, GROUP, Nq, Nk,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
              HEAVY_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B * H), swapped with HEAVY_FIRST (varlen: Nq the longest
    sequence's, B the number of sequences). Writes O and LSE, the base-2 log-sum-exp of the
    scaled scores (+inf for rows that see no key)."""
    tile, pid = _program_ids(HEAVY_FIRST, CAUSAL)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    q_first, Nq, k_first, Nk, kv_lo, kv_hi = _sequence(b, Nq, Nk, CU_SEQLENS_Q, CU_SEQLENS_K,
                                                       KV_START, KV_END, VARLEN)
    start_m = tile * BLOCK_M
    if start_m >= Nq:  # varlen: a shorter sequence than the longest
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Nq
    seen = (kv_lo, kv_hi, kv_hi - Nq, window)

    q = _load_rows(_view(Q, q_strides, b, h, q_first), offs_m, row_ok, HEAD_DIM, True)
    k_view = _view(K, k_strides, b, h // GROUP, k_first)
    v_view = _view(V, v_strides, b, h // GROUP, k_first)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    blocks = _key_blocks(start_m, tl.minimum(start_m + BLOCK_M, Nq) - 1, seen, BLOCK_N, CAUSAL)
    for stage in tl.static_range(3):  # masked, unmasked, masked
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_view, v_view, offs_m, seen,
                                        sm_scale * LOG2E, blocks[stage], blocks[stage + 1],
                                        HEAD_DIM, BLOCK_N, CAUSAL, MASKED=stage != 1)

    # l_i >= 1 for any row that saw a key (its maximum contributes exp2(0)); l_i == 0 otherwise.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + b * lse_strides[0] + h * lse_strides[1] + q_first + offs_m, lse, mask=row_ok)
    _store_rows(_view(O, o_strides, b, h, q_first), offs_m, row_ok, acc / l_safe[:, None],
                HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, o_strides, do_strides, delta_strides, H, N,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M), B * H). DELTA = rowsum(dO * O) in fp32, laid out as LSE."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)
    row_ok = offs_m < N
    o = _load_rows(_view(O, o_strides, b, h, 0), offs_m, row_ok, HEAD_DIM, True)
    do = _load_rows(_view(DO, do_strides, b, h, 0), offs_m, row_ok, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * delta_strides[0] + h * delta_strides[1] + offs_m, delta, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, offs_n, q_view, do_view, lse, delta, GROUP, Nq, seen,
                         qk_scale, block_lo, block_hi, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dK (unscaled) and dV of one key block over query blocks [block_lo, block_hi)
    of each of the GROUP query heads that share its kv head. The views, and lse and delta
    ((pointer, head stride) pairs), start at the group's first head. Works on transposed tiles
    ([BLOCK_N, BLOCK_M]) so that dK/dV come out row-major. One flat loop over (head, block)
    pairs: a loop over heads around the loop over blocks defeats software pipelining and made
    ptxas spill registers (sm_90, D=128)."""
    # The (head, block) pair advances by counters, blocks fastest, rather than as it // n_blocks
    # and it % n_blocks: software pipelining computes the first iterations' addresses before it
    # tests the loop bound, and with an empty stage (n_blocks = 0) that division is undefined and
    # its quotient an address far outside Q (the likely cause of an illegal memory access seen
    # on an H200).
    g = tl.full([], 0, tl.int32)
    block = block_lo
    for _ in range(0, GROUP * (block_hi - block_lo)):
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Nq
        q = _load_rows(_next_head(q_view, g), offs_m, row_ok, HEAD_DIM, MASKED)
        do = _load_rows(_next_head(do_view, g), offs_m, row_ok, HEAD_DIM, MASKED)
        lse_g = tl.load(lse[0] + g * lse[1] + offs_m, mask=row_ok, other=float("inf"))
        delta_g = tl.load(delta[0] + g * delta[1] + offs_m, mask=row_ok, other=0.0)
        qkT = _dot(k, tl.trans(q)) * qk_scale
        if MASKED:
            qkT = tl.where(_visible(offs_m[None, :], offs_n[:, None], seen, CAUSAL), qkT,
                           -float("inf"))
        pT = tl.math.exp2(qkT - lse_g[None, :])
        dv = _dot(pT.to(do.dtype), do, dv)
        dsT = pT * (_dot(v, tl.trans(do)) - delta_g[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk)
        block += 1
        g = tl.where(block == block_hi, g + 1, g)
        block = tl.where(block == block_hi, block_lo, block)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS_Q, CU_SEQLENS_K, KV_START, KV_END,
                   q_strides, k_strides, v_strides, do_strides, lse_strides, dk_strides,
                   sm_scale, window, H, GROUP, Nq, Nk,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                   HEAVY_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Nk, BLOCK_N), B * Hkv), swapped with HEAVY_FIRST. Each program owns one key
    block of one kv head and sums over the GROUP query heads that share it, so DK and DV (same
    strides) are written once, without atomics; rows nobody sees get 0."""
    tile, pid = _program_ids(HEAVY_FIRST, False)  # causal: the first key blocks are heaviest
    b = (pid // (H // GROUP)).to(tl.int64)
    hk = (pid % (H // GROUP)).to(tl.int64)
    q_first, Nq, k_first, Nk, kv_lo, kv_hi = _sequence(b, Nq, Nk, CU_SEQLENS_Q, CU_SEQLENS_K,
                                                       KV_START, KV_END, VARLEN)
    start_n = tile * BLOCK_N
    if start_n >= Nk:  # varlen: a shorter sequence than the longest
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    seen = (kv_lo, kv_hi, kv_hi - Nq, window)
    blocks = _query_blocks(start_n, seen, Nq, BLOCK_M, BLOCK_N, CAUSAL)

    # The keys to read: none if nobody sees the block.
    read_hi = tl.where(blocks[0] < blocks[3], kv_hi, kv_lo)
    key_ok = (offs_n >= kv_lo) & (offs_n < read_hi)
    k = _load_rows(_view(K, k_strides, b, hk, k_first), offs_n, key_ok, HEAD_DIM, True)
    v = _load_rows(_view(V, v_strides, b, hk, k_first), offs_n, key_ok, HEAD_DIM, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    h0 = hk * GROUP  # the group's first query head
    q_view = _view(Q, q_strides, b, h0, q_first)
    do_view = _view(DO, do_strides, b, h0, q_first)
    first_stat = b * lse_strides[0] + h0 * lse_strides[1] + q_first  # LSE and DELTA alike
    lse = (LSE + first_stat, lse_strides[1])
    delta = (DELTA + first_stat, lse_strides[1])
    for stage in tl.static_range(3):  # masked, unmasked, masked
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, offs_n, q_view, do_view, lse, delta, GROUP,
                                      Nq, seen, sm_scale * LOG2E, blocks[stage],
                                      blocks[stage + 1], HEAD_DIM, BLOCK_M, CAUSAL,
                                      MASKED=stage != 1)

    # Every key row of the sequence, seen or not (dense DK/DV come from torch.empty; varlen rows
    # outside every sequence keep the zeros they were allocated with).
    in_bounds = offs_n < Nk
    _store_rows(_view(DK, dk_strides, b, hk, k_first), offs_n, in_bounds, dk * sm_scale, HEAD_DIM)
    _store_rows(_view(DV, dk_strides, b, hk, k_first), offs_n, in_bounds, dv, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_view, v_view, offs_m, seen, qk_scale, block_lo,
                       block_hi, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dQ (unscaled) of one query block over key blocks [block_lo, block_hi)."""
    kv_lo, kv_hi = seen[0], seen[1]
    for block in range(block_lo, block_hi):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= kv_lo) & (offs_n < kv_hi)
        k = _load_rows(k_view, offs_n, key_ok, HEAD_DIM, MASKED)
        v = _load_rows(v_view, offs_n, key_ok, HEAD_DIM, MASKED)
        qk = _dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            qk = tl.where(_visible(offs_m[:, None], offs_n[None, :], seen, CAUSAL), qk,
                          -float("inf"))
        p = tl.math.exp2(qk - lse[:, None])
        ds = p * (_dot(do, tl.trans(v)) - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS_Q, CU_SEQLENS_K, KV_START, KV_END,
                 q_strides, k_strides, v_strides, do_strides, lse_strides, dq_strides,
                 sm_scale, window, H, GROUP, Nq, Nk,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                 HEAVY_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B * H), swapped with HEAVY_FIRST. Each program owns one query
    block of one head and writes its rows of DQ once: no races, no atomics."""
    tile, pid = _program_ids(HEAVY_FIRST, CAUSAL)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    q_first, Nq, k_first, Nk, kv_lo, kv_hi = _sequence(b, Nq, Nk, CU_SEQLENS_Q, CU_SEQLENS_K,
                                                       KV_START, KV_END, VARLEN)
    start_m = tile * BLOCK_M
    if start_m >= Nq:  # varlen: a shorter sequence than the longest
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Nq
    seen = (kv_lo, kv_hi, kv_hi - Nq, window)

    q = _load_rows(_view(Q, q_strides, b, h, q_first), offs_m, row_ok, HEAD_DIM, True)
    do = _load_rows(_view(DO, do_strides, b, h, q_first), offs_m, row_ok, HEAD_DIM, True)
    stats = b * lse_strides[0] + h * lse_strides[1] + q_first + offs_m  # LSE and DELTA alike
    lse = tl.load(LSE + stats, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
    k_view = _view(K, k_strides, b, h // GROUP, k_first)
    v_view = _view(V, v_strides, b, h // GROUP, k_first)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    blocks = _key_blocks(start_m, tl.minimum(start_m + BLOCK_M, Nq) - 1, seen, BLOCK_N, CAUSAL)
    for stage in tl.static_range(3):  # masked, unmasked, masked
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_view, v_view, offs_m, seen,
                                sm_scale * LOG2E, blocks[stage], blocks[stage + 1], HEAD_DIM,
                                BLOCK_N, CAUSAL, MASKED=stage != 1)
    _store_rows(_view(DQ, dq_strides, b, h, q_first), offs_m, row_ok, dq * sm_scale, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Python side
# ----------------------------------------------------------------------------------------------

_warned_interpreter = False


def _store_dtype(dtype):
    """The interpreter truncates fp32 -> bf16 stores; keep fp32 there and let torch round."""
    return torch.float32 if (INTERPRETED and dtype == torch.bfloat16) else dtype


def _launch(name, kernel, n_tiles, heads, args, constexprs, options, tune_key, dtype):
    """Run `kernel` with the pinned, cached or measured tile of kernel `name`. n_tiles(tile) is
    the number of tiles along the sequence; heads the number of (batch, head) programs per tile."""
    def run(tile):
        grid = (n_tiles(tile), heads)
        if options.heavy_first:
            grid = grid[::-1]
        kernel[grid](*args, **constexprs, HEAVY_FIRST=options.heavy_first,
                     BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps,
                     num_stages=tile.num_stages)

    tile = options.tile(name)
    if tile is None and INTERPRETED:
        tile = INTERPRETER_TILE
    elif tile is None:
        # Measuring synchronizes the device, which a CUDA graph capture forbids: there, only a
        # tile chosen earlier (in this process or the cache folder) will do.
        capturing = torch.cuda.is_current_stream_capturing()
        tile = _TUNERS[name, dtype == torch.float32].pick(tune_key, run, measure=not capturing)
        if tile is None:
            raise RuntimeError(
                f"flash_attention: no {name} tile is known yet for this problem, and tiles "
                f"cannot be measured during CUDA graph capture: run the call once outside the "
                f"capture first (a warm-up), or pin tiles with options, e.g. 'tile=64x64x4x3'")
    run(tile)


class _Problem:
    """One call's sizes and kernel arguments, for either layout: dense q (B, H, Nq, D) and k, v
    (B, Hkv, Nk, D), or varlen q (total_q, H, D) and k, v (total_k, Hkv, D) with B sequences
    found through cu_seqlens (then Nq and Nk are the longest lengths: the grid's size)."""

    def __init__(self, q, k, causal, sm_scale, window, kv_start, kv_end, cu_seqlens_q,
                 cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.B, self.H, self.Hkv = len(cu_seqlens_q) - 1, q.shape[1], k.shape[1]
            self.Nq, self.Nk, self.key_rows = max_seqlen_q, max_seqlen_k, k.shape[0]
        else:
            self.B, self.H, self.Nq = q.shape[:3]
            self.Hkv, self.Nk = k.shape[1:3]
            self.key_rows = self.Nk
        self.D, self.causal, self.sm_scale = q.shape[-1], causal, sm_scale
        # A window longer than every sequence would change nothing (but might overflow int32).
        self.window = None if window is None else min(window, self.key_rows)
        self.sequences = (cu_seqlens_q, cu_seqlens_k, kv_start, kv_end)
        self.constexprs = dict(HEAD_DIM=self.D, CAUSAL=causal, VARLEN=self.varlen)
        # What a tile choice depends on: not the exact lengths (power-of-two buckets), so that a
        # growing cache does not measure again at every step.
        self.tune_key = (str(q.dtype), self.D, causal, self.H // self.Hkv,
                         triton.next_power_of_2(self.Nq), triton.next_power_of_2(self.Nk),
                         self.varlen, window is not None)

    def strides(self, t):
        """(batch, head, row, column) strides of q, k, v, o or a gradient (varlen: batch 0)."""
        return (0, t.stride(1), t.stride(0), t.stride(2)) if self.varlen else t.stride()

    def lse_strides(self, lse):
        """(batch, head) strides of the log-sum-exp, (B, H, Nq) or varlen (H, total_q); its rows
        are contiguous."""
        return (0, lse.stride(0)) if self.varlen else lse.stride()[:2]

    def scalars(self):
        return (self.sm_scale, self.window, self.H, self.H // self.Hkv, self.Nq, self.Nk)


def _forward(q, k, v, p, options):
    """(o, lse) for a _Problem p."""
    o = (torch.zeros if p.varlen else torch.empty)(q.shape, dtype=_store_dtype(q.dtype),
                                                   device=q.device)
    lse_shape = (p.H, q.shape[0]) if p.varlen else (p.B, p.H, p.Nq)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    _launch("fwd", _attn_fwd, lambda t: triton.cdiv(p.Nq, t.block_m), p.B * p.H,
            (q, k, v, o, lse, *p.sequences, p.strides(q), p.strides(k), p.strides(v),
             p.strides(o), p.lse_strides(lse), *p.scalars()),
            p.constexprs, options, (*p.tune_key, *options.flags()), q.dtype)
    return o.to(q.dtype), lse


def _backward(do, q, k, v, o, lse, p, options):
    """(dq, dk, dv) for a _Problem p."""
    delta = torch.empty_like(lse)
    rows, batch = (q.shape[0], 1) if p.varlen else (p.Nq, p.B)  # varlen: one long sequence here
    _attn_bwd_preprocess[(triton.cdiv(rows, _PREPROCESS_BLOCK_M), batch * p.H)](
        o, do, delta, p.strides(o), p.strides(do), p.lse_strides(delta), p.H, rows,
        HEAD_DIM=p.D, BLOCK_M=_PREPROCESS_BLOCK_M)

    # Varlen: rows outside every sequence keep these zeros (no program owns them).
    new = functools.partial(torch.zeros if p.varlen else torch.empty,
                            dtype=_store_dtype(q.dtype), device=q.device)
    dq, dk, dv = new(q.shape), new(k.shape), new(k.shape)
    args = (*p.sequences, p.strides(q), p.strides(k), p.strides(v), p.strides(do),
            p.lse_strides(lse))
    tune_key = (*p.tune_key, *options.flags())
    _launch("dkdv", _attn_bwd_dkdv, lambda t: triton.cdiv(p.Nk, t.block_n), p.B * p.Hkv,
            (q, k, v, do, lse, delta, dk, dv, *args, p.strides(dk), *p.scalars()),
            p.constexprs, options, tune_key, q.dtype)
    _launch("dq", _attn_bwd_dq, lambda t: triton.cdiv(p.Nq, t.block_m), p.B * p.H,
            (q, k, v, do, lse, delta, dq, *args, p.strides(dq), *p.scalars()),
            p.constexprs, options, tune_key, q.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# torch.compile cannot trace the launch code above (the tuner times kernels and reads files), nor
# the parsing of options, so the forward and backward are custom operators: opaque to dynamo (no
# graph break), with fake implementations that give their outputs' shapes and strides, and
# autograd that calls one from the other. Custom operators take tensors and plain scalars only:
# options travel as text (None: FLASH_ATTENTION_OPTIONS), parsed where the kernels run. Both
# layouts share the operators: cu_seqlens_q is None for the dense one.


@functools.lru_cache(maxsize=64)
def _parse_options(text):
    return Options.parse(text)


def _resolve_options(text):
    return default_options() if text is None else _parse_options(text)


@torch.library.custom_op("triton_kernels::flash_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
            window: Optional[int], kv_start: Optional[torch.Tensor],
            kv_end: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
            options: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(output, base-2 log-sum-exp fp32: (B, H, Nq), varlen (H, total_q)). The arguments are
    flash_attention's or flash_attention_varlen's, checked, with the index tensors in int32."""
    options = _resolve_options(options)
    _warn_if_interpreted()
    p = _Problem(q, k, causal, sm_scale, window, kv_start, kv_end, cu_seqlens_q, cu_seqlens_k,
                 max_seqlen_q, max_seqlen_k)
    return _forward(q, k, v, p, options)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, causal, sm_scale, window, kv_start, kv_end, cu_seqlens_q, cu_seqlens_k,
              max_seqlen_q, max_seqlen_k, options):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else q.shape[:3]
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("triton_kernels::flash_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            o: torch.Tensor, lse: torch.Tensor, causal: bool, sm_scale: float,
            window: Optional[int], kv_start: Optional[torch.Tensor],
            kv_end: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
            options: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the upstream gradient do and the forward's inputs and outputs."""
    p = _Problem(q, k, causal, sm_scale, window, kv_start, kv_end, cu_seqlens_q, cu_seqlens_k,
                 max_seqlen_q, max_seqlen_k)
    return _backward(do, q, k, v, o, lse, p, _resolve_options(options))


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, *_):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, causal, sm_scale, window, kv_start, kv_end, cu_seqlens_q, cu_seqlens_k,
     max_seqlen_q, max_seqlen_k, options) = inputs
    ctx.save_for_backward(q, k, v, *output, kv_start, kv_end, cu_seqlens_q, cu_seqlens_k)
    ctx.scalars = (causal, sm_scale, window)
    ctx.max_seqlens_options = (max_seqlen_q, max_seqlen_k, options)


def _fwd_backward(ctx, do, _dlse):  # lse is an internal output: its gradient is ignored
    q, k, v, o, lse, *index_tensors = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, *ctx.scalars, *index_tensors,
                         *ctx.max_seqlens_options)
    return dq, dk, dv, *(None,) * 10


# Rather than an autograd.Function around the operators, which costs less Python time per eager
# training call but which dynamo cannot trace when one tensor is passed twice (x, x, x).
_fwd_op.register_autograd(_fwd_backward, setup_context=_setup_context)
# ----------------------------------------------------------------------------------------------
# Public functions: checks, then the forward operator
# ----------------------------------------------------------------------------------------------


def _check_tensors(q, k, v, dims, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"flash_attention: {name} must be a {dims}-D tensor {layout}, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must share one dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention: dtype {q.dtype} is not supported; use one of "
                         f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got "
                         f"{q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim {D} is not supported; supported head dims "
                         f"are {', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
    H, Hkv = q.shape[-3 if dims == 4 else 1], k.shape[-3 if dims == 4 else 1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"flash_attention: the number of query heads ({H}) must be a multiple "
                         f"of the number of kv heads ({Hkv})")


def _check_scalars(causal, sm_scale, window):
    if sm_scale is not None and not (isinstance(sm_scale, numbers.Real) and
                                     0 < sm_scale < math.inf):
        raise ValueError(f"flash_attention: sm_scale must be a positive number, got {sm_scale!r}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ValueError(f"flash_attention: window must be a positive integer or None, "
                             f"got {window!r}")
        if not causal:
            raise ValueError("flash_attention: window needs causal=True (a query sees the "
                             "`window` keys ending at its own position)")


def _check_index(name, t, length, device):
    """kv_start, kv_end, cu_seqlens: an integer tensor (length,) on q's device."""
    if not isinstance(t, torch.Tensor) or t.shape != (length,) or t.dtype.is_floating_point \
            or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"flash_attention: {name} must be an integer tensor of shape "
                         f"({length},), got {getattr(t, 'dtype', type(t).__name__)} "
                         f"{tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise ValueError(f"flash_attention: {name} is on {t.device}, q on {device}")


def _check_backend(device):
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("flash_attention got CPU tensors but triton was imported without "
                           "the interpreter: set TRITON_INTERPRET=1 in the environment before "
                           "triton is first imported (or use CUDA tensors).")


def _warn_if_interpreted():
    """Called where the kernels run (inside the custom operator), since torch.compile cannot
    trace warnings.warn without a graph break."""
    global _warned_interpreter
    if INTERPRETED and not _warned_interpreter:
        _warned_interpreter = True
        warnings.warn("flash_attention is running in the Triton interpreter (TRITON_INTERPRET=1): "
                      "this is for checking correctness, not for speed.")


def _option_text(options):
    return options if options is None or isinstance(options, str) else str(options)


def flash_attention(q, k, v, causal=True, sm_scale=None, kv_start=None, kv_end=None, window=None,
                    *, options=None):
    """Scaled dot-product attention softmax(q k^T * sm_scale) v, differentiable in q, k, v.

    Args:
        q: (B, H, Nq, D) queries; fp16, bf16 or fp32; D in {16, 32, 64, 128}.
        k, v: (B, Hkv, Nk, D) keys and values, same dtype and device; H must be a multiple of
            Hkv (GQA; Hkv = 1 is MQA). May be strided views such as a slice of a KV cache.
        causal: bottom-right aligned causal mask: query i sits at key position
            p_i = i + (kv_end - Nq) and sees keys j <= p_i. Requires Nq <= Nk (not
            Nq <= kv_end: query rows i < Nq - kv_end[b] see no key).
        sm_scale: score scale, a positive number; default 1 / sqrt(D).
        kv_start: optional integer tensor (B,): keys j < kv_start[b] are masked for batch row b
            (left padding).
        kv_end: optional integer tensor (B,): only keys j < kv_end[b] exist for batch row b, as
            if Nk were kv_end[b] (a fixed-length KV cache filled up to kv_end[b]); default Nk.
            Keys at or beyond it are never read, and get dK = dV = 0.
            Both are clamped to [0, Nk]. Queries that see no key at all output exactly 0.
        window: sliding-window attention (needs causal): query i also needs p_i - j < window,
            i.e. it sees the `window` keys ending at its own position (Mistral's
            sliding_window); key blocks left of every query's window are not read. None: no
            window.
        options: kernel variants and pinned tiles, an ``Options`` or its string form (see the
            module docstring); default from FLASH_ATTENTION_OPTIONS, else none.

    Returns:
        (B, H, Nq, D) tensor in q's dtype.
    """
    _check_tensors(q, k, v, 4, "(B, heads, N, D)")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must "
                         f"agree on batch size and head dim")
    if Nq == 0 or Nk == 0:
        raise ValueError(f"flash_attention: empty sequence (Nq={Nq}, Nk={Nk})")
    if causal and Nq > Nk:
        raise ValueError(f"flash_attention: causal attention needs Nq <= Nk (the mask is "
                         f"bottom-right aligned), got Nq={Nq} > Nk={Nk}")
    _check_scalars(causal, sm_scale, window)
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t is not None:
            _check_index(name, t, B, q.device)
    _check_backend(q.device)
    if kv_start is not None:
        kv_start = kv_start.clamp(0, Nk).to(torch.int32)
    if kv_end is not None:
        kv_end = kv_end.clamp(0, Nk).to(torch.int32)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    window = None if window is None else int(window)
    return _fwd_op(q, k, v, bool(causal), sm_scale, window, kv_start, kv_end, None, None, Nq, Nk,
                   _option_text(options))[0]


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=True, sm_scale=None, window=None, *, options=None):
    """Attention over variable-length sequences packed along one axis, each attending only to
    itself (packed fine-tuning data), differentiable in q, k, v.

    Args:
        q: (total_q, H, D) queries of all sequences, one after the other; dtypes and D as in
            flash_attention. May be a strided view.
        k, v: (total_k, Hkv, D) keys and values; H must be a multiple of Hkv (GQA).
        cu_seqlens_q, cu_seqlens_k: integer tensors (n + 1,) on q's device, cumulative
            lengths: sequence b is rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and rows
            [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v. Nondecreasing from 0, with the
            last entries at most total_q and total_k; empty sequences are allowed. Rows past
            the last sequence are never read, and get output and gradient 0. Not checked (that
            would synchronize with the device): wrong offsets read out of bounds.
        max_seqlen_q, max_seqlen_k: ints at least as large as every sequence's length (the
            grid's size; not checked: a longer sequence would be cut short).
        causal: within each sequence, bottom-right aligned as in flash_attention (query i of a
            sequence of Nq queries and Nk keys sees keys j <= i + Nk - Nq; if Nq > Nk, its
            first Nq - Nk queries see no key and output 0).
        sm_scale, window, options: as in flash_attention.

    Returns:
        (total_q, H, D) tensor in q's dtype.
    """
    _check_tensors(q, k, v, 3, "(total, heads, D)")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must "
                         f"agree on head dim")
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 \
            or len(cu_seqlens_q) < 2:
        raise ValueError(f"flash_attention: cu_seqlens_q must be a 1-D tensor of n + 1 >= 2 "
                         f"offsets, got {getattr(cu_seqlens_q, 'shape', cu_seqlens_q)!r}")
    _check_index("cu_seqlens_q", cu_seqlens_q, len(cu_seqlens_q), q.device)
    _check_index("cu_seqlens_k", cu_seqlens_k, len(cu_seqlens_q), q.device)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"flash_attention: {name} must be a positive integer, "
                             f"got {value!r}")
    _check_scalars(causal, sm_scale, window)
    _check_backend(q.device)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    window = None if window is None else int(window)
    return _fwd_op(q, k, v, bool(causal), sm_scale, window, None, None,
                   cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), int(max_seqlen_q),
                   int(max_seqlen_k), _option_text(options))[0]
