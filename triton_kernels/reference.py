"""The float64 attention that flash_attention and flash_attention_varlen are checked against,
written from the definition: naive, materialized, K/V repeated per group, one sequence at a time.
Used by tests/test_flash_attention.py and by bench/gpu/check_kernel.py on the GPU."""
import torch


def visibility(B, Nq, Nk, causal, kv_start=None, kv_end=None, device=None, window=None):
    """(B, Nq, Nk) bool: query i of batch row b sits at key position p = i + kv_end[b] - Nq and
    sees key j iff kv_start[b] <= j < kv_end[b] and, if causal, j <= p and p - j < window
    (kv_start and kv_end clamped to [0, Nk]; window None: no limit)."""
    i = torch.arange(Nq, device=device)[None, :, None]
    j = torch.arange(Nk, device=device)[None, None, :]
    start = torch.zeros(B, device=device) if kv_start is None else kv_start.clamp(0, Nk)
    end = torch.full((B,), Nk, device=device) if kv_end is None else kv_end.clamp(0, Nk)
    start, end = start[:, None, None], end[:, None, None]
    visible = (j >= start) & (j < end)
    if causal:
        position = i + end - Nq
        visible = visible & (j <= position)
        if window is not None:
            visible = visible & (position - j < window)
    return visible


def attention_reference(q, k, v, causal, sm_scale, kv_start=None, kv_end=None, window=None):
    """softmax(q k^T * sm_scale + mask) v in float64 for (B, H, N, D) tensors; rows that see no
    key give 0 (not NaN)."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[2] == 0:
        return torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    visible = visibility(q.shape[0], q.shape[2], k.shape[2], causal, kv_start, kv_end,
                         q.device, window)[:, None]
    scores = (q @ k.transpose(-1, -2) * sm_scale).masked_fill(~visible, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    e = torch.exp(scores - torch.where(torch.isinf(row_max), 0.0, row_max))
    total = e.sum(-1, keepdim=True)
    return (e / torch.where(total == 0, 1.0, total)) @ v


def attention_reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sm_scale,
                               window=None):
    """flash_attention_varlen's definition in float64: q (total_q, H, D), k and v (total_k, Hkv,
    D); each sequence b attends to itself alone, as attention_reference of its rows; rows past
    the last sequence give 0."""
    as_dense = lambda t: t.transpose(0, 1)[None]  # noqa: E731  (n, heads, D) -> (1, heads, n, D)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = []
    for b in range(len(cu_q) - 1):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        out = attention_reference(as_dense(q[rows_q]), as_dense(k[rows_k]), as_dense(v[rows_k]),
                                  causal, sm_scale, window=window)
        pieces.append(out[0].transpose(0, 1))
    pieces.append(torch.zeros_like(q[cu_q[-1]:], dtype=torch.float64))
    return torch.cat(pieces)


def rel_err(out, ref):
    """||out - ref|| / max(||ref||, 1): the floor checks an exactly-zero reference (dq when every
    query sees a single key) in absolute terms instead of dividing by zero."""
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1.0)).item()


def poison_unused_kv(k, v, kv_start, kv_end):
    """k, v with NaN / inf in the rows outside [kv_start, kv_end) of each batch row (as an
    uninitialized KV cache might hold), the same with zeros there (for the reference), and the
    (B, Hkv, Nk) mask of those rows."""
    B, Hkv, Nk, _ = k.shape
    j = torch.arange(Nk, device=k.device)
    unused = ((j < kv_start[:, None]) | (j >= kv_end[:, None]))[:, None, :].expand(B, Hkv, Nk)
    clean = k.masked_fill(unused[..., None], 0), v.masked_fill(unused[..., None], 0)
    poisoned = k.masked_fill(unused[..., None], float("nan")), \
        v.masked_fill(unused[..., None], float("inf"))
    return poisoned, clean, unused
