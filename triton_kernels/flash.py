"""FlashAttention forward and backward in Triton, with GQA/MQA, bottom-right causal masking, left
padding (``kv_start``) and a per-row key count (``kv_end``, for a static KV cache).

Shapes: q is (B, H, Nq, D); k and v are (B, Hkv, Nk, D) with Hkv dividing H. Query head h reads
kv head h // (H // Hkv) directly, so K/V are never repeated in memory. Inputs may be strided views
(a slice of a KV cache, a transposed q): every kernel takes explicit strides.

Forward (``_attn_fwd``): one program per (query block, batch * head) streams key/value blocks
through an online softmax (running max, running sum, rescaled fp32 accumulator) and saves only the
output and the per-row log-sum-exp. Backward recomputes P from Q, K and that log-sum-exp:
``_attn_bwd_preprocess`` computes delta = rowsum(dO * O), ``_attn_bwd_dkdv`` owns one key block
of one kv head and loops over every query head of its group (so dK/dV need no atomics), and
``_attn_bwd_dq`` owns one query block of one head. Every output element is written by exactly one
program, which is also why tile tuning can rerun the kernels without resetting anything.

Masking: key j is visible to query i of batch row b iff kv_start[b] <= j < kv_end[b] and, when
causal, j <= i + (kv_end[b] - Nq): bottom-right aligned to the last *existing* key, so prefill,
decode and a decode step over a fixed-length cache (Nk = max_len, kv_end = filled length) share
the kernel. Defaults: kv_start = 0, kv_end = Nk. The loops over key (or query) blocks are split
into ranges that need no mask and ranges that do (ragged edges, the diagonal, the kv_start and
kv_end boundaries); blocks that nobody sees are skipped, so a decode step over a long cache reads
only the filled part. K/V rows outside [kv_start, kv_end) are never used, not even multiplied by
zero: an uninitialized cache tail (NaN, inf) cannot leak into any result. Rows that see no key
(left padding, or causal query rows i < Nq - kv_end[b]) output exactly 0 and get log-sum-exp =
+inf, so the backward recomputes P = exp(S - lse) = 0 for them and they add nothing to any
gradient; dK/dV of keys nobody sees are exact zeros.

Options (``Options``; all off by default until a GPU shows they pay): ``fused_scale`` folds the
score scale into the exponent's one fused multiply-add, ``heavy_first`` launches the most loaded
tiles of a causal mask first, ``pack_gqa`` packs the query heads of a GQA group into one forward
tile (decode: K/V read once per group instead of once per query head), ``tma`` streams K/V
blocks in the forward and dQ kernels through TMA tensor descriptors (where their layout allows:
unit stride along D, 16-byte alignment; else plain loads), and pinned tiles (block shapes, warps,
stages) per kernel. Tiles are otherwise measured once per problem key and shared
through a cache file (tuning.py). The environment variable FLASH_ATTENTION_OPTIONS sets the
default, e.g. "tile=64x64x4x3" or "fused_scale,heavy_first,dkdv=64x128x8x2".

torch.compile and CUDA graphs: the forward and backward are the custom operators
triton_kernels::flash_attention_fwd and triton_kernels::flash_attention_bwd, opaque to dynamo, so
a compiled model has no graph break at attention and fullgraph=True works. A tile is measured at
the first call of each problem key, and measuring synchronizes the device, which a CUDA graph
capture forbids: capture after a warm-up call of the same shapes (as the compiled decode step and
torch.compile's mode="reduce-overhead" do), or pin tiles in the options. A capture that would
have to measure raises a RuntimeError that says so.

Interpreter (TRITON_INTERPRET=1, CPU): triton 3.9's interpreter computes bf16 tl.dot and bf16
arithmetic wrongly (triton issue 11584) and truncates fp32 -> bf16 casts. Under the interpreter
the kernels therefore run with UPCAST=True, which converts every loaded tile to fp32 before any
arithmetic, and bf16 results are stored as fp32 and rounded by torch. On the GPU UPCAST is False
and fp16/bf16 tiles go to the tensor cores as they are (P and dS are cast to the input dtype for
their dots, as in every FlashAttention); fp32 inputs use input_precision="ieee" instead of TF32.
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
from triton.runtime.interpreter import InterpretedFunction

from .tuning import Tile, Tuner

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # the kernels use exp2, so scores are pre-multiplied by log2(e)


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, rows, row_ok, stride_d, HEAD_DIM: tl.constexpr, TRANSPOSED: tl.constexpr,
               MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """The rows that start at element offsets `rows` of a strided (?, HEAD_DIM) matrix, as a
    [len(rows), HEAD_DIM] tile or its [HEAD_DIM, len(rows)] transpose. With MASKED, rows whose
    row_ok is false read as 0 and are not touched in memory."""
    offs_d = tl.arange(0, HEAD_DIM)
    if TRANSPOSED:
        ptrs = base + rows[None, :] + offs_d[:, None] * stride_d
        ok = row_ok[None, :]
    else:
        ptrs = base + rows[:, None] + offs_d[None, :] * stride_d
        ok = row_ok[:, None]
    if MASKED:
        tile = tl.load(ptrs, mask=ok, other=0.0)
    else:
        tile = tl.load(ptrs)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _kv_source(base, kv_hi, stride_row, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               TMA: tl.constexpr):
    """What a kernel streams K or V blocks from: the strided matrix at `base` itself or, with
    TMA, a tensor descriptor over its rows [0, kv_hi), whose copy engine zero-fills rows beyond
    (the caller checked unit stride along D and 16-byte alignment)."""
    if TMA:  # at least one row: a row that sees no key loads nothing, but needs a valid shape
        src = tl.make_tensor_descriptor(base, shape=[tl.maximum(kv_hi, 1), HEAD_DIM],
                                        strides=[stride_row, 1], block_shape=[BLOCK_N, HEAD_DIM])
    else:
        src = base
    return src


@triton.jit
def _load_kv(src, start, kv_lo, kv_hi, stride_row, stride_d, HEAD_DIM: tl.constexpr,
             BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr, MASKED: tl.constexpr,
             UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Key or value rows [start, start + BLOCK_N) from a _kv_source, as _load_tile: with MASKED,
    rows outside [kv_lo, kv_hi) read as 0."""
    offs = start + tl.arange(0, BLOCK_N)
    row_ok = (offs >= kv_lo) & (offs < kv_hi)
    if TMA:
        tile = src.load([start, 0])
        if MASKED:  # rows >= kv_hi are zero already; those left of kv_start are not
            tile = tl.where(row_ok[:, None], tile, tl.zeros_like(tile))
        if UPCAST:
            tile = tile.to(tl.float32)
        if TRANSPOSED:
            tile = tl.trans(tile)
    else:
        tile = _load_tile(src, offs * stride_row, row_ok, stride_d, HEAD_DIM, TRANSPOSED, MASKED,
                          UPCAST)
    return tile


@triton.jit
def _store_tile(base, rows, row_ok, stride_d, tile, HEAD_DIM: tl.constexpr):
    """Store a [len(rows), HEAD_DIM] tile at the rows (element offsets) where row_ok holds."""
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = base + rows[:, None] + offs_d[None, :] * stride_d
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _visible(offs_m, offs_n, Nq, kv_lo, kv_hi, CAUSAL: tl.constexpr):
    """Which (query, key) pairs may attend; offs_m and offs_n broadcast against each other."""
    mask = (offs_m < Nq) & (offs_n >= kv_lo) & (offs_n < kv_hi)
    if CAUSAL:
        mask = mask & (offs_n <= offs_m + (kv_hi - Nq))
    return mask


@triton.jit
def _scores(q, kT, offs_m, offs_n, Nq, kv_lo, kv_hi, qk_scale, CAUSAL: tl.constexpr,
            MASKED: tl.constexpr, FUSED_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores q kT of query rows offs_m and key rows offs_n, scaled to base-2 units unless
    FUSED_SCALE (then the caller folds qk_scale into its exponent); -inf where the query may not
    see the key (only checked with MASKED)."""
    qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
    if not FUSED_SCALE:
        qk = qk * qk_scale
    if MASKED:
        qk = tl.where(_visible(offs_m[:, None], offs_n[None, :], Nq, kv_lo, kv_hi, CAUSAL), qk,
                      -float("inf"))
    return qk


@triton.jit
def _exp2_shifted(s, qk_scale, shift, FUSED_SCALE: tl.constexpr):
    """exp2(scaled score - shift): one fused multiply-add per element with FUSED_SCALE (s is
    then the unscaled score), else a subtraction (s is already scaled)."""
    if FUSED_SCALE:
        return tl.math.exp2(tl.fma(s, qk_scale, -shift))
    return tl.math.exp2(s - shift)


@triton.jit
def _kv_blocks(q_lo, q_hi, kv_lo, kv_hi, Nq, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key blocks seen by query rows q_lo..q_hi (inclusive), as block indices
    first <= clean_lo <= clean_hi <= last: [first, clean_lo) and [clean_hi, last) need the mask,
    [clean_lo, clean_hi) is fully visible to every row. Blocks outside [first, last) are skipped."""
    if CAUSAL:
        diag = kv_hi - Nq  # may be negative: query rows i < -diag see no key
        hi = tl.minimum(q_hi + 1 + diag, kv_hi)  # the last row sees keys < hi
        all_see = tl.minimum(q_lo + 1 + diag, kv_hi)  # the first row sees keys < all_see
    else:
        hi = kv_hi
        all_see = kv_hi
    first = kv_lo // BLOCK_N
    last = tl.maximum(tl.cdiv(tl.maximum(hi, 0), BLOCK_N), first)
    clean_lo = tl.minimum(tl.maximum(tl.cdiv(kv_lo, BLOCK_N), first), last)
    clean_hi = tl.minimum(tl.maximum(tl.maximum(all_see, 0) // BLOCK_N, clean_lo), last)
    return first, clean_lo, clean_hi, last


@triton.jit
def _q_blocks(start_n, kv_lo, kv_hi, Nq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr):
    """Query blocks that see key rows [start_n, start_n + BLOCK_N), split like _kv_blocks."""
    last = tl.cdiv(Nq, BLOCK_M)
    clean_hi = Nq // BLOCK_M
    if CAUSAL:
        diag = kv_hi - Nq
        first = tl.maximum(start_n - diag, 0) // BLOCK_M  # row i sees key j iff i >= j - diag
        clean_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M)
    else:
        first = 0
        clean_lo = 0
    # A key block cut by kv_start or kv_end needs the mask for every query block; one entirely
    # left of kv_start or right of kv_end is seen by nobody.
    clean_hi = tl.where((start_n < kv_lo) | (start_n + BLOCK_N > kv_hi), clean_lo, clean_hi)
    last = tl.where((start_n + BLOCK_N <= kv_lo) | (start_n >= kv_hi), first, last)
    clean_lo = tl.minimum(clean_lo, last)
    clean_hi = tl.minimum(tl.maximum(clean_hi, clean_lo), last)
    return first, clean_lo, clean_hi, last


@triton.jit
def _kv_range(KV_START, KV_END, b, Nk, HAS_KV_START: tl.constexpr, HAS_KV_END: tl.constexpr):
    """Batch row b sees keys [kv_lo, kv_hi)."""
    kv_lo = 0
    kv_hi = Nk
    if HAS_KV_START:
        kv_lo = tl.load(KV_START + b)
    if HAS_KV_END:
        kv_hi = tl.load(KV_END + b)
    return kv_lo, kv_hi


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


# ----------------------------------------------------------------------------------------------
# Interpreter or GPU; tile candidates
# ----------------------------------------------------------------------------------------------

# Decided once per process, when this module is imported: triton.jit returns an
# InterpretedFunction iff TRITON_INTERPRET=1 was set then.
INTERPRETED = isinstance(_load_tile, InterpretedFunction)


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
    fused_scale: bool = False
    heavy_first: bool = False
    pack_gqa: bool = False
    tma: bool = False
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
        """'fused_scale,heavy_first,pack_gqa,tile=64x64x4x3,dkdv=64x128x8x2' (',', '+' or spaces
        between items; 'tile=' pins all three kernels, 'fwd=', 'dkdv=', 'dq=' one)."""
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
def _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_kd, stride_vn, stride_vd,
                    offs_m, kv_lo, kv_hi, Nq, qk_scale, block_lo, block_hi,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    MASKED: tl.constexpr, FUSED_SCALE: tl.constexpr, UPCAST: tl.constexpr,
                    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [block_lo, block_hi); m_i is in scaled base-2 units."""
    for block in range(block_lo, block_hi):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        kT = _load_kv(k_src, block * BLOCK_N, kv_lo, kv_hi, stride_kn, stride_kd, HEAD_DIM,
                      BLOCK_N, True, MASKED, UPCAST, TMA)
        v = _load_kv(v_src, block * BLOCK_N, kv_lo, kv_hi, stride_vn, stride_vd, HEAD_DIM,
                     BLOCK_N, False, MASKED, UPCAST, TMA)
        qk = _scores(q, kT, offs_m, offs_n, Nq, kv_lo, kv_hi, qk_scale, CAUSAL, MASKED,
                     FUSED_SCALE, DOT_PRECISION)
        if FUSED_SCALE:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0: max commutes
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key yet has m = -inf: subtract 0 instead, so that
        # exp2(-inf - m) is 0 rather than NaN.
        m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = _exp2_shifted(qk, qk_scale, m_sub[:, None], FUSED_SCALE)
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KV_START, KV_END, qk_scale,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              H, GROUP, Nq, Nk,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
              HAS_KV_END: tl.constexpr, PACK_GQA: tl.constexpr, HEAVY_FIRST: tl.constexpr,
              FUSED_SCALE: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B * H), or (cdiv(GROUP * Nq, BLOCK_M), B * Hkv) with PACK_GQA,
    swapped with HEAVY_FIRST. Writes O (B, H, Nq, D) and LSE (B, H, Nq), the base-2 log-sum-exp
    of the scaled scores (+inf for rows that see no key)."""
    tile, pid_bh = _program_ids(HEAVY_FIRST, CAUSAL)
    start_m = tile * BLOCK_M
    if PACK_GQA:
        # Tile row r is query r % Nq of the group's query head r // Nq: one program serves the
        # whole group, so each K/V block is read once for GROUP heads.
        Hkv = H // GROUP
        b = (pid_bh // Hkv).to(tl.int64)
        hk = (pid_bh % Hkv).to(tl.int64)
        rows = start_m + tl.arange(0, BLOCK_M)
        heads = hk * GROUP + rows // Nq
        offs_m = tl.where(rows < GROUP * Nq, rows % Nq, Nq)  # Nq marks a padding row
        q_lo = tl.min(offs_m, 0)
        q_hi = tl.max(tl.where(offs_m < Nq, offs_m, 0), 0)
    else:
        b = (pid_bh // H).to(tl.int64)
        heads = (pid_bh % H).to(tl.int64)
        hk = heads // GROUP
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_lo = start_m
        q_hi = start_m + BLOCK_M - 1
    kv_lo, kv_hi = _kv_range(KV_START, KV_END, b, Nk, HAS_KV_START, HAS_KV_END)
    k_src = _kv_source(K + b * stride_kb + hk * stride_kh, kv_hi, stride_kn, HEAD_DIM, BLOCK_N,
                       TMA)
    v_src = _kv_source(V + b * stride_vb + hk * stride_vh, kv_hi, stride_vn, HEAD_DIM, BLOCK_N,
                       TMA)

    row_ok = offs_m < Nq
    q = _load_tile(Q + b * stride_qb, heads * stride_qh + offs_m * stride_qm, row_ok, stride_qd,
                   HEAD_DIM, False, True, UPCAST)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    first, clean_lo, clean_hi, last = _kv_blocks(q_lo, q_hi, kv_lo, kv_hi, Nq, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_kd,
                                    stride_vn, stride_vd, offs_m, kv_lo, kv_hi, Nq, qk_scale,
                                    first, clean_lo, HEAD_DIM, BLOCK_N, CAUSAL,
                                    True, FUSED_SCALE, UPCAST, TMA, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_kd,
                                    stride_vn, stride_vd, offs_m, kv_lo, kv_hi, Nq, qk_scale,
                                    clean_lo, clean_hi, HEAD_DIM, BLOCK_N, CAUSAL,
                                    False, FUSED_SCALE, UPCAST, TMA, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_kd,
                                    stride_vn, stride_vd, offs_m, kv_lo, kv_hi, Nq, qk_scale,
                                    clean_hi, last, HEAD_DIM, BLOCK_N, CAUSAL,
                                    True, FUSED_SCALE, UPCAST, TMA, DOT_PRECISION)

    # l_i >= 1 for any row that saw a key (its maximum contributes exp2(0)); l_i == 0 otherwise.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + (b * H + heads) * Nq + offs_m, lse, mask=row_ok)
    _store_tile(O + b * stride_ob, heads * stride_oh + offs_m * stride_om, row_ok, stride_od, o,
                HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA,
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         H, Nq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B * H). DELTA (B, H, Nq) = rowsum(dO * O) in fp32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row_ok = offs_m < Nq
    o = _load_tile(O + b * stride_ob + h * stride_oh, offs_m * stride_om, row_ok, stride_od,
                   HEAD_DIM, False, True, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m * stride_dom, row_ok, stride_dod,
                    HEAD_DIM, False, True, True)
    tl.store(DELTA + pid_bh * Nq + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_group, do_group, lse_group, delta_group, GROUP,
                         stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
                         offs_n, kv_lo, kv_hi, Nq, qk_scale, block_lo, block_hi,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                         MASKED: tl.constexpr, FUSED_SCALE: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Accumulate dK (unscaled) and dV of one key block over query blocks [block_lo, block_hi)
    of each of the GROUP query heads that share its kv head (*_group point at the first one).
    Works on transposed tiles ([BLOCK_N, BLOCK_M]) so that dK/dV come out row-major.
    One flat loop over (head, block) pairs: a loop over heads around the loop over blocks
    defeats software pipelining and made ptxas spill registers (sm_90, D=128)."""
    n_blocks = block_hi - block_lo
    for it in range(0, GROUP * n_blocks):
        g = it // n_blocks
        offs_m = (block_lo + it % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Nq
        qT = _load_tile(q_group + g * stride_qh, offs_m * stride_qm, row_ok, stride_qd, HEAD_DIM,
                        True, MASKED, UPCAST)
        do = _load_tile(do_group + g * stride_doh, offs_m * stride_dom, row_ok, stride_dod,
                        HEAD_DIM, False, MASKED, UPCAST)
        lse = tl.load(lse_group + g * Nq + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_group + g * Nq + offs_m, mask=row_ok, other=0.0)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)
        if not FUSED_SCALE:
            qkT = qkT * qk_scale
        if MASKED:
            visible = _visible(offs_m[None, :], offs_n[:, None], Nq, kv_lo, kv_hi, CAUSAL)
            qkT = tl.where(visible, qkT, -float("inf"))
        pT = _exp2_shifted(qkT, qk_scale, lse[None, :], FUSED_SCALE)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KV_START, KV_END, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   H, GROUP, Nq, Nk,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
                   HAS_KV_END: tl.constexpr, HEAVY_FIRST: tl.constexpr,
                   FUSED_SCALE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Nk, BLOCK_N), B * Hkv), swapped with HEAVY_FIRST. Each program owns one key
    block of one kv head and sums over the GROUP query heads that share it, so DK/DV (B, Hkv, Nk,
    D; contiguous, same strides) are written once, without atomics; rows nobody sees get 0."""
    tile, pid_bhk = _program_ids(HEAVY_FIRST, False)  # causal: the first key blocks are heaviest
    start_n = tile * BLOCK_N
    Hkv = H // GROUP
    b = (pid_bhk // Hkv).to(tl.int64)
    hk = (pid_bhk % Hkv).to(tl.int64)
    kv_lo, kv_hi = _kv_range(KV_START, KV_END, b, Nk, HAS_KV_START, HAS_KV_END)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = (offs_n >= kv_lo) & (offs_n < kv_hi)
    k = _load_tile(K + b * stride_kb + hk * stride_kh, offs_n * stride_kn, key_ok, stride_kd,
                   HEAD_DIM, False, True, UPCAST)
    v = _load_tile(V + b * stride_vb + hk * stride_vh, offs_n * stride_vn, key_ok, stride_vd,
                   HEAD_DIM, False, True, UPCAST)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    first, clean_lo, clean_hi, last = _q_blocks(start_n, kv_lo, kv_hi, Nq, BLOCK_M, BLOCK_N,
                                                CAUSAL)
    h0 = hk * GROUP  # first query head of the group
    q_group = Q + b * stride_qb + h0 * stride_qh
    do_group = DO + b * stride_dob + h0 * stride_doh
    lse_group = LSE + (b * H + h0) * Nq
    delta_group = DELTA + (b * H + h0) * Nq
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_group, do_group, lse_group, delta_group, GROUP,
                                  stride_qh, stride_qm, stride_qd, stride_doh, stride_dom,
                                  stride_dod, offs_n, kv_lo, kv_hi, Nq, qk_scale, first, clean_lo,
                                  HEAD_DIM, BLOCK_M, CAUSAL, True, FUSED_SCALE, UPCAST,
                                  DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_group, do_group, lse_group, delta_group, GROUP,
                                  stride_qh, stride_qm, stride_qd, stride_doh, stride_dom,
                                  stride_dod, offs_n, kv_lo, kv_hi, Nq, qk_scale, clean_lo,
                                  clean_hi, HEAD_DIM, BLOCK_M, CAUSAL, False, FUSED_SCALE, UPCAST,
                                  DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_group, do_group, lse_group, delta_group, GROUP,
                                  stride_qh, stride_qm, stride_qd, stride_doh, stride_dom,
                                  stride_dod, offs_n, kv_lo, kv_hi, Nq, qk_scale, clean_hi, last,
                                  HEAD_DIM, BLOCK_M, CAUSAL, True, FUSED_SCALE, UPCAST,
                                  DOT_PRECISION)

    dkv_offset = b * stride_dkb + hk * stride_dkh
    in_bounds = offs_n < Nk  # every row up to Nk: DK/DV come from torch.empty
    _store_tile(DK + dkv_offset, offs_n * stride_dkn, in_bounds, stride_dkd, dk * sm_scale,
                HEAD_DIM)
    _store_tile(DV + dkv_offset, offs_n * stride_dkn, in_bounds, stride_dkd, dv, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_src, v_src,
                       stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_m, kv_lo, kv_hi, Nq, qk_scale, block_lo, block_hi,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       MASKED: tl.constexpr, FUSED_SCALE: tl.constexpr, UPCAST: tl.constexpr,
                       TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ (unscaled) of one query block over key blocks [block_lo, block_hi)."""
    for block in range(block_lo, block_hi):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        kT = _load_kv(k_src, block * BLOCK_N, kv_lo, kv_hi, stride_kn, stride_kd, HEAD_DIM,
                      BLOCK_N, True, MASKED, UPCAST, TMA)
        vT = _load_kv(v_src, block * BLOCK_N, kv_lo, kv_hi, stride_vn, stride_vd, HEAD_DIM,
                      BLOCK_N, True, MASKED, UPCAST, TMA)
        qk = _scores(q, kT, offs_m, offs_n, Nq, kv_lo, kv_hi, qk_scale, CAUSAL, MASKED,
                     FUSED_SCALE, DOT_PRECISION)
        p = _exp2_shifted(qk, qk_scale, lse[:, None], FUSED_SCALE)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_START, KV_END, qk_scale, sm_scale,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 H, GROUP, Nq, Nk,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
                 HAS_KV_END: tl.constexpr, HEAVY_FIRST: tl.constexpr,
                 FUSED_SCALE: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B * H), swapped with HEAVY_FIRST. Each program owns one query
    block of one head and writes its rows of DQ (B, H, Nq, D) once: no races, no atomics."""
    tile, pid_bh = _program_ids(HEAVY_FIRST, CAUSAL)
    start_m = tile * BLOCK_M
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    kv_lo, kv_hi = _kv_range(KV_START, KV_END, b, Nk, HAS_KV_START, HAS_KV_END)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Nq
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m * stride_qm, row_ok, stride_qd,
                   HEAD_DIM, False, True, UPCAST)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m * stride_dom, row_ok, stride_dod,
                    HEAD_DIM, False, True, UPCAST)
    lse = tl.load(LSE + pid_bh * Nq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Nq + offs_m, mask=row_ok, other=0.0)
    k_src = _kv_source(K + b * stride_kb + hk * stride_kh, kv_hi, stride_kn, HEAD_DIM, BLOCK_N,
                       TMA)
    v_src = _kv_source(V + b * stride_vb + hk * stride_vh, kv_hi, stride_vn, HEAD_DIM, BLOCK_N,
                       TMA)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    first, clean_lo, clean_hi, last = _kv_blocks(start_m, start_m + BLOCK_M - 1, kv_lo, kv_hi,
                                                 Nq, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_kd,
                            stride_vn, stride_vd, offs_m, kv_lo, kv_hi, Nq, qk_scale, first,
                            clean_lo, HEAD_DIM, BLOCK_N, CAUSAL, True, FUSED_SCALE, UPCAST,
                            TMA, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_kd,
                            stride_vn, stride_vd, offs_m, kv_lo, kv_hi, Nq, qk_scale, clean_lo,
                            clean_hi, HEAD_DIM, BLOCK_N, CAUSAL, False, FUSED_SCALE, UPCAST,
                            TMA, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_kd,
                            stride_vn, stride_vd, offs_m, kv_lo, kv_hi, Nq, qk_scale, clean_hi,
                            last, HEAD_DIM, BLOCK_N, CAUSAL, True, FUSED_SCALE, UPCAST,
                            TMA, DOT_PRECISION)
    _store_tile(DQ + b * stride_dqb + h * stride_dqh, offs_m * stride_dqm, row_ok, stride_dqd,
                dq * sm_scale, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Python side
# ----------------------------------------------------------------------------------------------

_warned_interpreter = False


def _kernel_flags(dtype):
    """Constexpr precision flags and the dtype the kernels store results in."""
    upcast = INTERPRETED
    # fp32 tiles: exact fp32 dots, not TF32. For fp16/bf16 tiles "tf32" (the default) is ignored.
    dot_precision = "ieee" if (upcast or dtype == torch.float32) else "tf32"
    # The interpreter truncates fp32 -> bf16 stores; keep fp32 and let torch round instead.
    store_dtype = torch.float32 if (upcast and dtype == torch.bfloat16) else dtype
    return dict(UPCAST=upcast, DOT_PRECISION=dot_precision), store_dtype


def _launch(name, kernel, n_tiles, heads, args, constexprs, options, tune_key, dtype):
    """Run `kernel` with the pinned, cached or measured tile of kernel `name`. n_tiles(tile) is
    the number of tiles along the sequence; heads the number of (batch, head) programs per tile."""
    def run(tile):
        grid = (n_tiles(tile), heads)
        if options.heavy_first:
            grid = grid[::-1]
        kernel[grid](*args, **constexprs, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                     num_warps=tile.num_warps, num_stages=tile.num_stages)

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


def _tma_usable(*tensors):
    """TMA descriptors need unit stride along D and 16-byte aligned rows, heads and batches."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


def _use_tma(options, k, v):
    """Whether the K/V streams of this call go through TMA descriptors. Descriptors made inside
    a kernel need scratch memory from Triton's allocator, a per-thread setting (autograd runs the
    backward on another thread): point it at torch's allocator before each such launch."""
    if not (options.tma and _tma_usable(k, v)):
        return False
    if not INTERPRETED:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                     device=k.device))
    return True


def _tune_key(q, k, causal, options):
    """What a tile choice depends on: not the exact lengths (power-of-two buckets), so that a
    growing cache does not measure again at every step."""
    _, H, Nq, D = q.shape
    return (str(q.dtype), D, causal, H // k.shape[1], triton.next_power_of_2(Nq),
            triton.next_power_of_2(k.shape[2]), *options.flags())


def _forward(q, k, v, causal, sm_scale, kv_start, kv_end, options):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    flags, store_dtype = _kernel_flags(q.dtype)
    o = torch.empty((B, H, Nq, D), dtype=store_dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    pack = options.pack_gqa and group > 1
    _launch("fwd", _attn_fwd,
            lambda t: triton.cdiv(group * Nq if pack else Nq, t.block_m), B * (Hkv if pack else H),
            (q, k, v, o, lse, kv_start, kv_end, sm_scale * LOG2E,
             *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, group, Nq, Nk),
            dict(HEAD_DIM=D, CAUSAL=causal, HAS_KV_START=kv_start is not None,
                 HAS_KV_END=kv_end is not None, PACK_GQA=pack, HEAVY_FIRST=options.heavy_first,
                 FUSED_SCALE=options.fused_scale, TMA=_use_tma(options, k, v), **flags),
            options, _tune_key(q, k, causal, options), q.dtype)
    return o.to(q.dtype), lse


def _backward(do, q, k, v, o, lse, causal, sm_scale, kv_start, kv_end, options):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    flags, store_dtype = _kernel_flags(q.dtype)
    constexprs = dict(HEAD_DIM=D, CAUSAL=causal, HAS_KV_START=kv_start is not None,
                      HAS_KV_END=kv_end is not None, HEAVY_FIRST=options.heavy_first,
                      FUSED_SCALE=options.fused_scale, **flags)
    tune_key = _tune_key(q, k, causal, options)

    delta = torch.empty_like(lse)
    _attn_bwd_preprocess[(triton.cdiv(Nq, _PREPROCESS_BLOCK_M), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Nq,
        HEAD_DIM=D, BLOCK_M=_PREPROCESS_BLOCK_M)

    dq = torch.empty((B, H, Nq, D), dtype=store_dtype, device=q.device)
    dk = torch.empty((B, Hkv, Nk, D), dtype=store_dtype, device=q.device)
    dv = torch.empty_like(dk)
    _launch("dkdv", _attn_bwd_dkdv, lambda t: triton.cdiv(Nk, t.block_n), B * Hkv,
            (q, k, v, do, lse, delta, dk, dv, kv_start, kv_end, sm_scale * LOG2E, sm_scale,
             *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
             H, H // Hkv, Nq, Nk),
            constexprs, options, tune_key, q.dtype)
    _launch("dq", _attn_bwd_dq, lambda t: triton.cdiv(Nq, t.block_m), B * H,
            (q, k, v, do, lse, delta, dq, kv_start, kv_end, sm_scale * LOG2E, sm_scale,
             *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
             H, H // Hkv, Nq, Nk),
            dict(constexprs, TMA=_use_tma(options, k, v)), options, tune_key, q.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# torch.compile cannot trace the launch code above (the tuner times kernels and reads files), nor
# the parsing of options, so the forward and backward are custom operators: opaque to dynamo (no
# graph break), with fake implementations that give their outputs' shapes and strides, and
# autograd that calls one from the other. Custom operators take tensors and plain scalars only:
# options travel as text (None: FLASH_ATTENTION_OPTIONS), parsed where the kernels run.


@functools.lru_cache(maxsize=64)
def _parse_options(text):
    return Options.parse(text)


def _resolve_options(text):
    return default_options() if text is None else _parse_options(text)


@torch.library.custom_op("triton_kernels::flash_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
            kv_start: Optional[torch.Tensor], kv_end: Optional[torch.Tensor],
            options: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(output, base-2 log-sum-exp (B, H, Nq) fp32). The arguments are flash_attention's, checked,
    with kv_start and kv_end clamped to int32."""
    options = _resolve_options(options)
    _warn_if_interpreted()
    return _forward(q, k, v, causal, sm_scale, kv_start, kv_end, options)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, causal, sm_scale, kv_start, kv_end, options):
    B, H, Nq, D = q.shape
    return q.new_empty((B, H, Nq, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("triton_kernels::flash_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            o: torch.Tensor, lse: torch.Tensor, causal: bool, sm_scale: float,
            kv_start: Optional[torch.Tensor], kv_end: Optional[torch.Tensor],
            options: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the upstream gradient do and the forward's inputs and outputs."""
    return _backward(do, q, k, v, o, lse, causal, sm_scale, kv_start, kv_end,
                     _resolve_options(options))


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, o, lse, causal, sm_scale, kv_start, kv_end, options):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale, kv_start, kv_end, options = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kv_start, kv_end)
    ctx.causal, ctx.sm_scale, ctx.options = causal, sm_scale, options


def _fwd_backward(ctx, do, _dlse):  # lse is an internal output: its gradient is ignored
    q, k, v, o, lse, kv_start, kv_end = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, kv_start, kv_end,
                         ctx.options)
    return dq, dk, dv, None, None, None, None, None


# Rather than an autograd.Function around the operators, which costs less Python time per eager
# training call but which dynamo cannot trace when one tensor is passed twice (x, x, x).
_fwd_op.register_autograd(_fwd_backward, setup_context=_setup_context)


def _check_index(name, t, q):
    """kv_start / kv_end: an integer tensor (B,) on q's device."""
    B = q.shape[0]
    if not isinstance(t, torch.Tensor) or t.shape != (B,) or t.dtype.is_floating_point \
            or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"flash_attention: {name} must be an integer tensor of shape ({B},), "
                         f"got {getattr(t, 'dtype', type(t).__name__)} "
                         f"{tuple(getattr(t, 'shape', ()))}")
    if t.device != q.device:
        raise ValueError(f"flash_attention: {name} is on {t.device}, q on {q.device}")


def _check_inputs(q, k, v, causal, sm_scale, kv_start, kv_end):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be a 4-D tensor (B, heads, N, D), "
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
    B, H, Nq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must "
                         f"agree on batch size and head dim")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim {D} is not supported; supported head dims "
                         f"are {', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"flash_attention: the number of query heads ({H}) must be a multiple "
                         f"of the number of kv heads ({Hkv})")
    if Nq == 0 or Nk == 0:
        raise ValueError(f"flash_attention: empty sequence (Nq={Nq}, Nk={Nk})")
    if causal and Nq > Nk:
        raise ValueError(f"flash_attention: causal attention needs Nq <= Nk (the mask is "
                         f"bottom-right aligned), got Nq={Nq} > Nk={Nk}")
    if sm_scale is not None and not (isinstance(sm_scale, numbers.Real) and
                                     0 < sm_scale < math.inf):
        raise ValueError(f"flash_attention: sm_scale must be a positive number, got {sm_scale!r}")
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t is not None:
            _check_index(name, t, q)


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


def flash_attention(q, k, v, causal=True, sm_scale=None, kv_start=None, kv_end=None, *,
                    options=None):
    """Scaled dot-product attention softmax(q k^T * sm_scale) v, differentiable in q, k, v.

    Args:
        q: (B, H, Nq, D) queries; fp16, bf16 or fp32; D in {16, 32, 64, 128}.
        k, v: (B, Hkv, Nk, D) keys and values, same dtype and device; H must be a multiple of
            Hkv (GQA; Hkv = 1 is MQA). May be strided views such as a slice of a KV cache.
        causal: bottom-right aligned causal mask: query i sees keys j <= i + (kv_end - Nq).
            Requires Nq <= Nk (not Nq <= kv_end: query rows i < Nq - kv_end[b] see no key).
        sm_scale: score scale, a positive number; default 1 / sqrt(D).
        kv_start: optional integer tensor (B,): keys j < kv_start[b] are masked for batch row b
            (left padding).
        kv_end: optional integer tensor (B,): only keys j < kv_end[b] exist for batch row b, as
            if Nk were kv_end[b] (a fixed-length KV cache filled up to kv_end[b]); default Nk.
            Keys at or beyond it are never read, and get dK = dV = 0.
            Both are clamped to [0, Nk]. Queries that see no key at all output exactly 0.
        options: kernel variants and pinned tiles, an ``Options`` or its string form (see the
            module docstring); default from FLASH_ATTENTION_OPTIONS, else none.

    Returns:
        (B, H, Nq, D) tensor in q's dtype.
    """
    _check_inputs(q, k, v, causal, sm_scale, kv_start, kv_end)
    _check_backend(q.device)
    if options is not None and not isinstance(options, str):
        options = str(options)  # an Options: the custom operators take its text
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    Nk = k.shape[2]
    if kv_start is not None:
        kv_start = kv_start.clamp(0, Nk).to(torch.int32)
    if kv_end is not None:
        kv_end = kv_end.clamp(0, Nk).to(torch.int32)
    return _fwd_op(q, k, v, bool(causal), float(sm_scale), kv_start, kv_end, options)[0]
