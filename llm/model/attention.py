"""Causal attention backends: `naive` (textbook), `sdpa` (PyTorch) and `triton` (ours).

Every backend computes the same thing. q is (B, H, Tq, D); k and v are
(B, Hkv, Tk, D) with Hkv dividing H (grouped-query attention). Tq <= Tk: without
`q_slots` the queries are the last Tq of the Tk positions, so the causal mask
is bottom-right aligned (query i sees keys j <= i + Tk - Tq). With a static KV
cache, k and v are the whole preallocated cache and `q_slots` (B, Tq) says where
each row's queries sit in it: query i of row b sees keys j <= q_slots[b, i], so
slots not yet written are masked and the shapes never change. `kv_start` (B,)
optionally masks the first kv_start[b] keys of row b: the left padding of a batch
of prompts with different lengths. `window` (sliding-window attention, Mistral)
also masks keys `window` or more slots before the query: it sees `window` keys,
itself included. `packing` (a Packing of `documents` (B, T)), for windows that pack several
documents (fine-tuning on conversations): the document index of each position; a query sees
only keys of its own document, so each is computed as if it were alone (its positions restart
too: the model's).
"""
import functools
import importlib.util

import torch
import torch.nn.functional as F

from llm.errors import UserError

BACKENDS = ("auto", "naive", "sdpa", "triton")
# What our kernel computes: triton_kernels.flash.SUPPORTED_HEAD_DIMS and SUPPORTED_DTYPES, repeated
# here so that choosing a backend does not import triton (a test keeps the two equal).
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_limit(head_dim: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                 dropout_p: float = 0.0) -> str | None:
    """Why our Triton kernel cannot run this attention, or None if it can."""
    if head_dim not in TRITON_HEAD_DIMS:
        return f"head dims {', '.join(map(str, TRITON_HEAD_DIMS))} only (this model's is {head_dim})"
    if dropout_p > 0:
        return "no attention dropout"
    if dtype is not None and dtype not in TRITON_DTYPES:
        return f"float16, bfloat16 and float32 only (got {dtype})"
    if device is not None and device.type != "cuda":
        return f"CUDA devices only (got {device.type})"
    if not triton_available():
        return "triton is not installed"
    return None


def resolve_backend(backend: str, head_dim: int, dtype: torch.dtype, device: torch.device, dropout_p: float = 0.0) -> str:
    """`auto` is our Triton kernel where it supports the head dim, dtype and device (and there is
    no attention dropout), else SDPA."""
    if backend != "auto":
        return backend
    return "triton" if triton_limit(head_dim, dtype, device, dropout_p) is None else "sdpa"


def check_runtime(config, backend: str, dropout: float):
    """A backend choice that can never work for this model is a UserError when the model is built."""
    if backend not in BACKENDS:
        raise UserError(f"attention={backend!r} is not one of {', '.join(BACKENDS)}")
    if not 0 <= dropout < 1:
        raise UserError(f"dropout must be in [0, 1), got {dropout}")
    if backend == "triton":
        limit = triton_limit(config.head_dim, dropout_p=dropout)
        if limit is not None:
            raise UserError(f"attention=triton: our kernel supports {limit}; use attention=sdpa or auto")


def causal_mask(q_len: int, kv_len: int, kv_start: torch.Tensor | None, device,
                q_slots: torch.Tensor | None = None, window: int | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask, True where attention is allowed: (Tq, Tk), or (B, 1, Tq, Tk) with kv_start,
    documents (B, T) or per-row q_slots (B, Tq): the key slot of each query (default: the last Tq slots)."""
    if q_slots is None:
        q_slots = torch.arange(kv_len - q_len, kv_len, device=device)
    q_slot = q_slots[..., :, None]
    if q_slot.dim() == 3:  # per row: (B, 1, Tq, 1)
        q_slot = q_slot[:, None]
    k_slot = torch.arange(kv_len, device=device)
    mask = k_slot <= q_slot
    if window is not None:
        mask = mask & (k_slot > q_slot - window)
    if kv_start is not None:
        start = kv_start.view(-1, 1, 1, 1)
        # Padding queries see only padding keys, so their (unused) outputs stay finite.
        mask = mask & ((k_slot >= start) | (q_slot < start))
    if documents is not None:  # queries and keys are the same positions (no cache)
        mask = mask & (documents[:, None, :, None] == documents[:, None, None, :])
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


def triton_attention(q, k, v, kv_start, q_slots, window):
    from triton_kernels import flash_attention  # imported late: importing triton fixes its mode

    # A static cache: each row's keys up to its last query's slot exist; the causal diagonal ends there.
    kv_end = None if q_slots is None else (q_slots[..., -1] + 1).expand(q.size(0))
    return flash_attention(q, k, v, causal=True, kv_start=kv_start, kv_end=kv_end, window=window)


def document_starts(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) True where a document begins: each row's first position, and each change of index."""
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return starts


def document_bounds(documents: torch.Tensor) -> torch.Tensor:
    """cu_seqlens of packed windows, the rows laid end to end: where each run of one document index
    starts, then the total length (int32). Its size depends on the data: finding it waits for a GPU."""
    starts = document_starts(documents).flatten().nonzero()[:, 0]
    return F.pad(starts, (0, 1), value=documents.numel()).to(torch.int32)


class Packing:
    """Windows that pack several documents: each position's document index (B, T), and the
    documents' bounds for the kernel's variable-length entry, found at the first layer that asks
    and then kept, so a forward waits for the GPU once rather than once per layer."""

    def __init__(self, documents: torch.Tensor):
        self.documents = documents
        self._bounds = None

    def bounds(self) -> torch.Tensor:
        if self._bounds is None:
            self._bounds = document_bounds(self.documents)
        return self._bounds


def packed_triton_attention(q, k, v, packing: Packing, window):
    """Windows packing several documents through the kernel's variable-length entry: the rows laid
    end to end, each run of one document index a sequence that attends only to itself."""
    from triton_kernels import flash_attention_varlen

    B, H, T, D = q.shape
    cu_seqlens = packing.bounds()
    rows = lambda x: x.transpose(1, 2).reshape(B * T, x.size(1), D)  # noqa: E731
    out = flash_attention_varlen(rows(q), rows(k), rows(v), cu_seqlens, cu_seqlens, T, T, causal=True, window=window)
    return out.view(B, T, H, D).transpose(1, 2)


def sdpa_attention(q, k, v, dropout_p, kv_start, q_slots, window, documents=None):
    q_len, kv_len = q.size(2), k.size(2)
    # Without padding, a static cache, packed documents or a window that cuts, full-length and
    # single-query calls need no explicit mask, which keeps SDPA on its fused kernels.
    plain = (kv_start is None and q_slots is None and documents is None and q_len in (1, kv_len)
             and (window is None or window >= kv_len))
    mask = None if plain else causal_mask(q_len, kv_len, kv_start, q.device, q_slots, window, documents)
    B, H, _, D = q.shape
    groups = H // k.size(1)
    if q_len == 1 and not dropout_p and q.device.type == "cpu" and torch.compiler.is_compiling():
        return one_query_attention(q.view(B, H // groups, groups, D), k, v, mask).view(B, H, 1, D)
    if q_len == 1 and groups > 1:
        # One query per head (decoding): the heads sharing a KV head become that head's queries,
        # plain multi-head attention (SDPA's GQA path is slow on CPU in bf16).
        out = F.scaled_dot_product_attention(q.view(B, H // groups, groups, D), k, v, attn_mask=mask,
                                             dropout_p=dropout_p)
        return out.view(B, H, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=plain and q_len > 1, enable_gqa=groups > 1)


def one_query_attention(q, k, v, mask):
    """Decoding's attention, one query per head: q (B, Hkv, G, D), the G query heads that share each
    KV head, over k, v (B, Hkv, Tk, D), written as sums over D and over Tk. Compiled by inductor on
    CPU, these become loops fused with the layer's other work, where SDPA is an extern call per layer
    that costs several times the arithmetic at decode's sizes."""
    scores = (q[..., None, :] * k[:, :, None]).sum(-1) * q.size(-1) ** -0.5  # (B, Hkv, G, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    return (probs[..., None] * v[:, :, None]).sum(-2)


def attention(q, k, v, backend="sdpa", dropout_p=0.0, kv_start=None, q_slots=None, window=None,
              packing: Packing | None = None) -> torch.Tensor:
    """Causal attention of q over k, v with the chosen backend; returns (B, H, Tq, D)."""
    backend = resolve_backend(backend, q.size(-1), q.dtype, q.device, dropout_p)
    if backend == "triton":
        if dropout_p:
            raise ValueError("the triton attention backend has no attention dropout")
        if packing is not None:
            return packed_triton_attention(q, k, v, packing, window)
        return triton_attention(q, k, v, kv_start, q_slots, window)
    documents = None if packing is None else packing.documents
    if backend == "naive":
        mask = causal_mask(q.size(2), k.size(2), kv_start, q.device, q_slots, window, documents)
        return naive_attention(q, k, v, mask, dropout_p)[0]
    if backend == "sdpa":
        return sdpa_attention(q, k, v, dropout_p, kv_start, q_slots, window, documents)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
