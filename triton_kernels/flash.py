"""FlashAttention forward and backward in Triton, with GQA/MQA, bottom-right causal masking and
left padding (``kv_start``).

Shapes: q is (B, H, Nq, D); k and v are (B, Hkv, Nk, D) with Hkv dividing H. Query head h reads
kv head h // (H // Hkv) directly, so K/V are never repeated in memory. Inputs may be strided views
(a slice of a KV cache, a transposed q): every kernel takes explicit strides.

Forward (``_attn_fwd``): one program per (query block, batch * head) streams key/value blocks
through an online softmax (running max, running sum, rescaled fp32 accumulator) and saves only the
output and the per-row log-sum-exp. Backward recomputes P from Q, K and that log-sum-exp:
``_attn_bwd_preprocess`` computes delta = rowsum(dO * O), ``_attn_bwd_dkdv`` owns one key block
of one kv head and loops over every query head of its group (so dK/dV need no atomics), and
``_attn_bwd_dq`` owns one query block of one head. Every output element is written by exactly one
program, which is also why autotune trials can rerun the kernels without resetting anything.

Masking: key j is visible to query i iff kv_start[b] <= j < Nk and, when causal,
j <= i + (Nk - Nq) (bottom-right aligned, so prefill and decode share the kernel). The loops over
blocks are split into ranges that need no mask (fully visible, fully in bounds) and ranges that do
(ragged edges, the diagonal, the kv_start boundary); blocks that are fully invisible are skipped.
Rows that see no key at all output exactly 0 and get log-sum-exp = +inf, so the backward
recomputes P = exp(S - lse) = 0 for them and they contribute nothing to any gradient.

Interpreter (TRITON_INTERPRET=1, CPU): triton 3.9's interpreter computes bf16 tl.dot and bf16
arithmetic wrongly (triton issue 11584) and truncates fp32 -> bf16 casts. Under the interpreter
the kernels therefore run with UPCAST=True, which converts every loaded tile to fp32 before any
arithmetic, and bf16 results are stored as fp32 and rounded by torch. On the GPU UPCAST is False
and fp16/bf16 tiles go to the tensor cores as they are (P and dS are cast to the input dtype for
their dots, as in every FlashAttention); fp32 inputs use input_precision="ieee" instead of TF32.
"""
import math
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # the kernels use exp2, so scores are pre-multiplied by log2(e)


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, offs, n_rows, stride_row, stride_d, HEAD_DIM: tl.constexpr,
               TRANSPOSED: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `offs` of a strided (n_rows, HEAD_DIM) matrix as a [len(offs), HEAD_DIM] tile, or its
    [HEAD_DIM, len(offs)] transpose. With MASKED, rows >= n_rows read as 0."""
    offs_d = tl.arange(0, HEAD_DIM)
    if TRANSPOSED:
        ptrs = base + offs[None, :] * stride_row + offs_d[:, None] * stride_d
        in_bounds = offs[None, :] < n_rows
    else:
        ptrs = base + offs[:, None] * stride_row + offs_d[None, :] * stride_d
        in_bounds = offs[:, None] < n_rows
    if MASKED:
        tile = tl.load(ptrs, mask=in_bounds, other=0.0)
    else:
        tile = tl.load(ptrs)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_tile(base, offs, n_rows, stride_row, stride_d, tile, HEAD_DIM: tl.constexpr):
    """Store a [len(offs), HEAD_DIM] tile into rows `offs` (< n_rows) of a strided matrix."""
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = base + offs[:, None] * stride_row + offs_d[None, :] * stride_d
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=offs[:, None] < n_rows)


@triton.jit
def _visible(offs_m, offs_n, Nq, Nk, kv_lo, CAUSAL: tl.constexpr):
    """Which (query, key) pairs may attend; offs_m and offs_n broadcast against each other."""
    mask = (offs_m < Nq) & (offs_n < Nk) & (offs_n >= kv_lo)
    if CAUSAL:
        mask = mask & (offs_n <= offs_m + (Nk - Nq))
    return mask


@triton.jit
def _scores(q, kT, offs_m, offs_n, Nq, Nk, kv_lo, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """Scaled scores q kT (base-2 units) of query rows offs_m and key rows offs_n; -inf where the
    query may not see the key (only checked with MASKED)."""
    qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        qk = tl.where(_visible(offs_m[:, None], offs_n[None, :], Nq, Nk, kv_lo, CAUSAL), qk, -float("inf"))
    return qk


@triton.jit
def _kv_blocks(start_m, kv_lo, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr):
    """Key blocks seen by query rows [start_m, start_m + BLOCK_M), as block indices
    first <= clean_lo <= clean_hi <= last: [first, clean_lo) and [clean_hi, last) need the mask,
    [clean_lo, clean_hi) is fully visible to every row. Blocks outside [first, last) are skipped."""
    if CAUSAL:
        diag = Nk - Nq
        hi = tl.minimum(start_m + BLOCK_M + diag, Nk)  # the block's last row sees keys < hi
        all_see = tl.minimum(start_m + diag + 1, Nk)  # its first row sees keys < all_see
    else:
        hi = Nk
        all_see = Nk
    first = kv_lo // BLOCK_N
    last = tl.maximum(tl.cdiv(hi, BLOCK_N), first)
    clean_lo = tl.minimum(tl.maximum(tl.cdiv(kv_lo, BLOCK_N), first), last)
    clean_hi = tl.minimum(tl.maximum(all_see // BLOCK_N, clean_lo), last)
    return first, clean_lo, clean_hi, last


@triton.jit
def _q_blocks(start_n, kv_lo, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr):
    """Query blocks that see key rows [start_n, start_n + BLOCK_N), split like _kv_blocks."""
    last = tl.cdiv(Nq, BLOCK_M)
    clean_hi = Nq // BLOCK_M
    if CAUSAL:
        diag = Nk - Nq
        first = tl.maximum(start_n - diag, 0) // BLOCK_M  # row i sees key j iff i >= j - diag
        clean_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M)
    else:
        first = 0
        clean_lo = 0
    # A key block cut by kv_start or by Nk needs the mask for every query block; one entirely
    # left of kv_start is seen by nobody.
    clean_hi = tl.where((start_n < kv_lo) | (start_n + BLOCK_N > Nk), clean_lo, clean_hi)
    last = tl.where(start_n + BLOCK_N <= kv_lo, first, last)
    clean_lo = tl.minimum(clean_lo, last)
    clean_hi = tl.minimum(tl.maximum(clean_hi, clean_lo), last)
    return first, clean_lo, clean_hi, last


# ----------------------------------------------------------------------------------------------
# Interpreter or GPU; autotune configs
# ----------------------------------------------------------------------------------------------

# Decided once per process, when this module is imported: triton.jit returns an
# InterpretedFunction iff TRITON_INTERPRET=1 was set then.
INTERPRETED = isinstance(_load_tile, InterpretedFunction)

# Autotune fails in the interpreter with more than one config, and speed means nothing there:
# use one small config (BLOCK_M != BLOCK_N on purpose, to exercise the block-range arithmetic).
_INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]


def _configs(candidates):
    """Hopper candidates as (BLOCK_M, BLOCK_N, num_warps, num_stages). Each list keeps the
    configs that ptxas compiles for sm_90 at D=128 (bf16) without spilling registers (at most
    a few bytes) and within 227 KB of shared memory; the autotuner picks among them."""
    if INTERPRETED:
        return _INTERPRETER_CONFIGS
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in candidates]


_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
                         (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 8, 3)])
# dK/dV programs own BLOCK_N keys and stream BLOCK_M queries; 128-query tiles spill there.
_DKDV_CONFIGS = _configs([(64, 64, 8, 2), (64, 64, 8, 3), (64, 64, 8, 4), (64, 64, 4, 3),
                          (64, 128, 8, 2), (64, 128, 8, 3)])
_DQ_CONFIGS = _configs([(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3),
                        (64, 128, 8, 2), (128, 128, 8, 2)])
# Tune per head dim, causality and power-of-two length bucket (not per exact length, so decoding
# with a growing cache does not retune every step). Autotune also keys on the tensor dtypes.
_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "Q_BUCKET", "K_BUCKET"]
_PREPROCESS_BLOCK_M = 64


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    offs_m, kv_lo, Nq, Nk, qk_scale, block_lo, block_hi,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [block_lo, block_hi); scores are in base-2 units."""
    for block in range(block_lo, block_hi):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        kT = _load_tile(k_base, offs_n, Nk, stride_kn, stride_kd, HEAD_DIM, True, MASKED, UPCAST)
        v = _load_tile(v_base, offs_n, Nk, stride_vn, stride_vd, HEAD_DIM, False, MASKED, UPCAST)
        qk = _scores(q, kT, offs_m, offs_n, Nq, Nk, kv_lo, qk_scale, CAUSAL, MASKED, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key yet has m = -inf: subtract 0 instead, so that
        # exp2(-inf - m) is 0 rather than NaN.
        m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KV_START, qk_scale,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              H, GROUP, Nq, Nk, Q_BUCKET, K_BUCKET,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B * H). Writes O (B, H, Nq, D) and LSE (B, H, Nq), the base-2
    log-sum-exp of the scaled scores (+inf for rows that see no key)."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.load(KV_START + b)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(q_base, offs_m, Nq, stride_qm, stride_qd, HEAD_DIM, False, True, UPCAST)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    first, clean_lo, clean_hi, last = _kv_blocks(start_m, kv_lo, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd,
                                    stride_vn, stride_vd, offs_m, kv_lo, Nq, Nk, qk_scale,
                                    first, clean_lo, HEAD_DIM, BLOCK_N, CAUSAL,
                                    True, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd,
                                    stride_vn, stride_vd, offs_m, kv_lo, Nq, Nk, qk_scale,
                                    clean_lo, clean_hi, HEAD_DIM, BLOCK_N, CAUSAL,
                                    False, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd,
                                    stride_vn, stride_vd, offs_m, kv_lo, Nq, Nk, qk_scale,
                                    clean_hi, last, HEAD_DIM, BLOCK_N, CAUSAL,
                                    True, UPCAST, DOT_PRECISION)

    # l_i >= 1 for any row that saw a key (its maximum contributes exp2(0)); l_i == 0 otherwise.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + pid_bh * Nq + offs_m, lse, mask=offs_m < Nq)
    _store_tile(O + b * stride_ob + h * stride_oh, offs_m, Nq, stride_om, stride_od, o, HEAD_DIM)


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
    o = _load_tile(O + b * stride_ob + h * stride_oh, offs_m, Nq, stride_om, stride_od,
                   HEAD_DIM, False, True, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, Nq, stride_dom, stride_dod,
                    HEAD_DIM, False, True, True)
    tl.store(DELTA + pid_bh * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_group, do_group, lse_group, delta_group, GROUP,
                         stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
                         offs_n, kv_lo, Nq, Nk, qk_scale, block_lo, block_hi,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                         MASKED: tl.constexpr, UPCAST: tl.constexpr,
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
        q_base = q_group + g * stride_qh
        do_base = do_group + g * stride_doh
        lse_base = lse_group + g * Nq
        delta_base = delta_group + g * Nq
        qT = _load_tile(q_base, offs_m, Nq, stride_qm, stride_qd, HEAD_DIM, True, MASKED, UPCAST)
        do = _load_tile(do_base, offs_m, Nq, stride_dom, stride_dod, HEAD_DIM, False, MASKED,
                        UPCAST)
        lse = tl.load(lse_base + offs_m, mask=offs_m < Nq, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < Nq, other=0.0)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = _visible(offs_m[None, :], offs_n[:, None], Nq, Nk, kv_lo, CAUSAL)
            qkT = tl.where(visible, qkT, -float("inf"))
        pT = tl.math.exp2(qkT - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KV_START, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   H, GROUP, Nq, Nk, Q_BUCKET, K_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Nk, BLOCK_N), B * Hkv). Each program owns one key block of one kv head and sums
    over the GROUP query heads that share it, so DK/DV (B, Hkv, Nk, D; contiguous, same strides)
    are written once, without atomics."""
    start_n = tl.program_id(0) * BLOCK_N
    pid_bhk = tl.program_id(1)
    Hkv = H // GROUP
    b = (pid_bhk // Hkv).to(tl.int64)
    hk = (pid_bhk % Hkv).to(tl.int64)
    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.load(KV_START + b)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + b * stride_kb + hk * stride_kh, offs_n, Nk, stride_kn, stride_kd,
                   HEAD_DIM, False, True, UPCAST)
    v = _load_tile(V + b * stride_vb + hk * stride_vh, offs_n, Nk, stride_vn, stride_vd,
                   HEAD_DIM, False, True, UPCAST)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    first, clean_lo, clean_hi, last = _q_blocks(start_n, kv_lo, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    h0 = hk * GROUP  # first query head of the group
    q_group = Q + b * stride_qb + h0 * stride_qh
    do_group = DO + b * stride_dob + h0 * stride_doh
    lse_group = LSE + (b * H + h0) * Nq
    delta_group = DELTA + (b * H + h0) * Nq
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_group, do_group, lse_group, delta_group, GROUP,
                                  stride_qh, stride_qm, stride_qd, stride_doh, stride_dom,
                                  stride_dod, offs_n, kv_lo, Nq, Nk, qk_scale, first, clean_lo,
                                  HEAD_DIM, BLOCK_M, CAUSAL, True, UPCAST, DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_group, do_group, lse_group, delta_group, GROUP,
                                  stride_qh, stride_qm, stride_qd, stride_doh, stride_dom,
                                  stride_dod, offs_n, kv_lo, Nq, Nk, qk_scale, clean_lo, clean_hi,
                                  HEAD_DIM, BLOCK_M, CAUSAL, False, UPCAST, DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_group, do_group, lse_group, delta_group, GROUP,
                                  stride_qh, stride_qm, stride_qd, stride_doh, stride_dom,
                                  stride_dod, offs_n, kv_lo, Nq, Nk, qk_scale, clean_hi, last,
                                  HEAD_DIM, BLOCK_M, CAUSAL, True, UPCAST, DOT_PRECISION)

    dkv_offset = b * stride_dkb + hk * stride_dkh
    _store_tile(DK + dkv_offset, offs_n, Nk, stride_dkn, stride_dkd, dk * sm_scale, HEAD_DIM)
    _store_tile(DV + dkv_offset, offs_n, Nk, stride_dkn, stride_dkd, dv, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base,
                       stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_m, kv_lo, Nq, Nk, qk_scale, block_lo, block_hi,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ (unscaled) of one query block over key blocks [block_lo, block_hi)."""
    for block in range(block_lo, block_hi):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        kT = _load_tile(k_base, offs_n, Nk, stride_kn, stride_kd, HEAD_DIM, True, MASKED, UPCAST)
        vT = _load_tile(v_base, offs_n, Nk, stride_vn, stride_vd, HEAD_DIM, True, MASKED, UPCAST)
        qk = _scores(q, kT, offs_m, offs_n, Nq, Nk, kv_lo, qk_scale, CAUSAL, MASKED, DOT_PRECISION)
        p = tl.math.exp2(qk - lse[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_START, qk_scale, sm_scale,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 H, GROUP, Nq, Nk, Q_BUCKET, K_BUCKET,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B * H). Each program owns one query block of one head and writes
    its rows of DQ (B, H, Nq, D) once: no races, no atomics."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.load(KV_START + b)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, Nq, stride_qm, stride_qd,
                   HEAD_DIM, False, True, UPCAST)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, Nq, stride_dom, stride_dod,
                    HEAD_DIM, False, True, UPCAST)
    lse = tl.load(LSE + pid_bh * Nq + offs_m, mask=offs_m < Nq, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    first, clean_lo, clean_hi, last = _kv_blocks(start_m, kv_lo, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd,
                            stride_vn, stride_vd, offs_m, kv_lo, Nq, Nk, qk_scale, first,
                            clean_lo, HEAD_DIM, BLOCK_N, CAUSAL, True, UPCAST, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd,
                            stride_vn, stride_vd, offs_m, kv_lo, Nq, Nk, qk_scale, clean_lo,
                            clean_hi, HEAD_DIM, BLOCK_N, CAUSAL, False, UPCAST, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd,
                            stride_vn, stride_vd, offs_m, kv_lo, Nq, Nk, qk_scale, clean_hi,
                            last, HEAD_DIM, BLOCK_N, CAUSAL, True, UPCAST, DOT_PRECISION)
    _store_tile(DQ + b * stride_dqb + h * stride_dqh, offs_m, Nq, stride_dqm, stride_dqd,
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


def _tune_args(Nq, Nk):
    return dict(Q_BUCKET=triton.next_power_of_2(Nq), K_BUCKET=triton.next_power_of_2(Nk))


def _forward(q, k, v, causal, sm_scale, kv_start):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    flags, store_dtype = _kernel_flags(q.dtype)
    o = torch.empty((B, H, Nq, D), dtype=store_dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    _attn_fwd[grid](q, k, v, o, lse, kv_start, sm_scale * LOG2E,
                    *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                    H, H // Hkv, Nq, Nk, **_tune_args(Nq, Nk),
                    HEAD_DIM=D, CAUSAL=causal, HAS_KV_START=kv_start is not None, **flags)
    return o.to(q.dtype), lse


def _backward(do, q, k, v, o, lse, causal, sm_scale, kv_start):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    flags, store_dtype = _kernel_flags(q.dtype)
    common = dict(HEAD_DIM=D, CAUSAL=causal, HAS_KV_START=kv_start is not None, **flags)

    delta = torch.empty_like(lse)
    _attn_bwd_preprocess[(triton.cdiv(Nq, _PREPROCESS_BLOCK_M), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Nq,
        HEAD_DIM=D, BLOCK_M=_PREPROCESS_BLOCK_M)

    dq = torch.empty((B, H, Nq, D), dtype=store_dtype, device=q.device)
    dk = torch.empty((B, Hkv, Nk, D), dtype=store_dtype, device=q.device)
    dv = torch.empty_like(dk)
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, kv_start, sm_scale * LOG2E, sm_scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        H, H // Hkv, Nq, Nk, **_tune_args(Nq, Nk), **common)
    _attn_bwd_dq[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, kv_start, sm_scale * LOG2E, sm_scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, H // Hkv, Nq, Nk, **_tune_args(Nq, Nk), **common)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, kv_start):
        o, lse = _forward(q, k, v, causal, sm_scale, kv_start)
        ctx.save_for_backward(q, k, v, o, lse, kv_start)
        ctx.causal = causal
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_start = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, kv_start)
        return dq, dk, dv, None, None, None


def _check_inputs(q, k, v, causal, kv_start):
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
    if kv_start is not None:
        if not isinstance(kv_start, torch.Tensor) or kv_start.shape != (B,) \
                or kv_start.dtype.is_floating_point or kv_start.dtype.is_complex \
                or kv_start.dtype == torch.bool:
            raise ValueError(f"flash_attention: kv_start must be an integer tensor of shape "
                             f"({B},), got {getattr(kv_start, 'dtype', type(kv_start).__name__)} "
                             f"{tuple(getattr(kv_start, 'shape', ()))}")
        if kv_start.device != q.device:
            raise ValueError(f"flash_attention: kv_start is on {kv_start.device}, q on {q.device}")


def _check_backend(device):
    global _warned_interpreter
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("flash_attention got CPU tensors but triton was imported without "
                           "the interpreter: set TRITON_INTERPRET=1 in the environment before "
                           "triton is first imported (or use CUDA tensors).")
    if INTERPRETED and not _warned_interpreter:
        _warned_interpreter = True
        warnings.warn("flash_attention is running in the Triton interpreter (TRITON_INTERPRET=1): "
                      "this is for checking correctness, not for speed.", stacklevel=3)


def flash_attention(q, k, v, causal=True, sm_scale=None, kv_start=None):
    """Scaled dot-product attention softmax(q k^T * sm_scale) v, differentiable in q, k, v.

    Args:
        q: (B, H, Nq, D) queries; fp16, bf16 or fp32; D in {16, 32, 64, 128}.
        k, v: (B, Hkv, Nk, D) keys and values, same dtype and device; H must be a multiple of
            Hkv (GQA; Hkv = 1 is MQA). May be strided views such as a slice of a KV cache.
        causal: bottom-right aligned causal mask: query i sees keys j <= i + (Nk - Nq).
            Requires Nq <= Nk.
        sm_scale: score scale, default 1 / sqrt(D).
        kv_start: optional integer tensor (B,): keys j < kv_start[b] are masked for batch row b
            (left padding). Queries that see no key at all get an output of exactly 0.

    Returns:
        (B, H, Nq, D) tensor in q's dtype.
    """
    _check_inputs(q, k, v, causal, kv_start)
    _check_backend(q.device)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if kv_start is not None:
        kv_start = kv_start.clamp(0, k.shape[2]).to(torch.int32)
    return _FlashAttention.apply(q, k, v, bool(causal), float(sm_scale), kv_start)
