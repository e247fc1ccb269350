"""Causal attention backends: `naive` (textbook), `sdpa` (PyTorch) and `triton` (ours).

Every backend computes the same thing. q is (B, H, Tq, D); k and v are
(B, Hkv, Tk, D) with Hkv dividing H (grouped-query attention). Tq <= Tk: with
a KV cache the queries are the last Tq of the Tk positions, so the causal mask
is bottom-right aligned (query i sees keys j <= i + Tk - Tq). `kv_start` (B,)
optionally masks the first kv_start[b] keys of row b: the left padding of a
batch of prompts with different lengths.
"""
import functools
import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "naive", "sdpa", "triton")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device, dropout_p: float = 0.0) -> str:
    """`auto` is our Triton kernel on CUDA when Triton is installed, else SDPA (which also
    serves attention dropout, which the kernel does not implement)."""
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" and triton_available() and dropout_p == 0 else "sdpa"


def causal_mask(q_len: int, kv_len: int, kv_start: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean mask, True where attention is allowed: (Tq, Tk), or (B, 1, Tq, Tk) with kv_start."""
    q_slot = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_slot = torch.arange(kv_len, device=device)[None, :]
    mask = k_slot <= q_slot
    if kv_start is not None:
        start = kv_start.view(-1, 1, 1, 1)
        # Padding queries see only padding keys, so their (unused) outputs stay finite.
        mask = mask & ((k_slot >= start) | (q_slot < start))
    return mask


def naive_attention(q, k, v, mask, dropout_p=0.0):
    """softmax(QKᵀ/√d + mask) V, materialized. Returns (output, probabilities)."""
    groups = q.size(1) // k.size(1)
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    return F.dropout(probs, dropout_p) @ v, probs


def attention(q, k, v, backend="sdpa", dropout_p=0.0, kv_start=None) -> torch.Tensor:
    """Causal attention of q over k, v with the chosen backend; returns (B, H, Tq, D)."""
    q_len, kv_len = q.size(2), k.size(2)
    backend = resolve_backend(backend, q.device, dropout_p)
    if backend == "triton":
        if dropout_p:
            raise ValueError("the triton attention backend has no attention dropout")
        from triton_kernels import flash_attention  # imported late: importing triton fixes its mode

        return flash_attention(q, k, v, causal=True, kv_start=kv_start)
    if backend == "naive":
        return naive_attention(q, k, v, causal_mask(q_len, kv_len, kv_start, q.device), dropout_p)[0]
    if backend == "sdpa":
        # Without padding, full-length and single-query calls need no explicit mask,
        # which keeps SDPA on its fused kernels.
        plain = kv_start is None and q_len in (1, kv_len)
        mask = None if plain else causal_mask(q_len, kv_len, kv_start, q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p,
            is_causal=plain and q_len > 1, enable_gqa=k.size(1) != q.size(1),
        )
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
