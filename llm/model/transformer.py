"""A decoder-only causal Transformer: GPT-2 and LLaMA are two settings of one model.

Attention, FeedForward, Block -> Transformer, configured by llm.config.ModelConfig.
Options switch one code path (norm type and position, FFN type, position
embedding, attention backend); there are no per-variant copies.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.model.attention import Packing, attention, causal_mask, check_runtime, document_starts, naive_attention
from llm.config import ModelConfig
from llm.model.loss import linear_cross_entropy
from llm.model.rope import apply_rope, rope_cache


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """The fixed position encoding of "Attention Is All You Need": sin on even, cos on odd channels."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.float()


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted from the first token of each token's document."""
    index = torch.arange(documents.size(1), device=documents.device).expand_as(documents)
    starts = document_starts(documents)
    return index - torch.where(starts, index, 0).cummax(dim=1).values


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, backend: str, dropout: float):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.wqkv = nn.Linear(config.d_model, qkv_dim, bias=config.bias or config.qkv_bias)
        # Qwen3: each head of q and k normalized on its own (one weight shared by the heads), before RoPE
        self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.wo = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=config.bias)
        self.backend = backend
        self.dropout = dropout
        self.window = config.sliding_window

    def forward(self, x, rope=None, cache=None, kv_start=None, attn_maps=None, slots=None, packing=None):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # the whole static cache; attention masks the slots after each query's
            k, v = cache.update(self.layer_idx, k, v, slots)
        dropout_p = self.dropout if self.training else 0.0
        if attn_maps is None:
            y = attention(q, k, v, self.backend, dropout_p, kv_start, slots, self.window, packing)
        else:  # visualization: the textbook computation, keeping the probabilities
            documents = None if packing is None else packing.documents
            mask = causal_mask(T, k.size(2), kv_start, x.device, slots, self.window, documents)
            y, probs = naive_attention(q, k, v, mask, dropout_p)
            attn_maps.append(probs)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), or GELU: w2(gelu(w1 x)).

    For decoding, llm.infer.quantize.for_decoding replaces w1 and w3 by w13, both stacked: one
    matrix-vector product reads them in one stream instead of two."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.ffn_hidden, bias=config.bias)
        self.w2 = nn.Linear(config.ffn_hidden, config.d_model, bias=config.bias)
        self.w3 = nn.Linear(config.d_model, config.ffn_hidden, bias=config.bias) if config.ffn == "swiglu" else None
        self.w13 = None

    def forward(self, x):
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x), approximate="tanh"))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm: x + f(norm(x)). Post-norm (GPT-1, as the classic papers draw it): norm(x + f(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int, attention: str, dropout: float):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attention_norm = make_norm(config)
        self.attention = Attention(config, layer_idx, attention, dropout)
        self.ffn_norm = make_norm(config)
        self.feed_forward = FeedForward(config)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rope=None, cache=None, kv_start=None, attn_maps=None, slots=None, packing=None):
        if self.pre_norm:
            y = self.attention(self.attention_norm(x), rope, cache, kv_start, attn_maps, slots, packing)
            x = x + self.drop(y)
            return x + self.drop(self.feed_forward(self.ffn_norm(x)))
        x = self.attention_norm(x + self.drop(self.attention(x, rope, cache, kv_start, attn_maps, slots, packing)))
        return self.ffn_norm(x + self.drop(self.feed_forward(x)))


class Transformer(nn.Module):
    """The architecture comes from `config` (what the weights mean); `attention` (the backend:
    auto | naive | sdpa | triton) and `dropout` are how this instance runs, not part of it."""

    def __init__(self, config: ModelConfig, attention: str = "auto", dropout: float = 0.0):
        super().__init__()
        check_runtime(config, attention, dropout)
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embeddings = nn.Embedding(config.block_size, config.d_model) if config.pos_embedding == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(Block(config, i, attention, dropout) for i in range(config.n_layer))
        self.norm = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.output = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_buffers()
        self.init_weights()

    def init_buffers(self):
        """The fixed position tables: buffers, not parameters, rebuilt from the config and never saved;
        placed with the weights (a model built on the meta device and then given real memory gets
        its tables on that device)."""
        c = self.config
        device = self.tok_embeddings.weight.device
        if c.pos_embedding == "rope":
            cos, sin = rope_cache(c.block_size, c.head_dim, c.rope_theta, c.rope_scaling)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)
        if c.pos_embedding == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_table(c.block_size, c.d_model).to(device), persistent=False)

    def init_weights(self):
        """GPT-2 initialization: N(0, 0.02), residual output projections scaled by 1/√(2·n_layer)."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for block in self.layers:
            for residual_out in (block.attention.wo, block.feed_forward.w2):
                nn.init.normal_(residual_out.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def set_attention(self, backend: str):
        """Switch the attention backend of every layer (the weights do not change)."""
        check_runtime(self.config, backend, self.layers[0].attention.dropout if len(self.layers) else 0.0)
        for block in self.layers:
            block.attention.backend = backend

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, *, positions=None, kv_start=None, cache=None, last_only=False,
                label_smoothing=0.0, reduction="mean", attn_maps=None, documents=None):
        """idx (B, T) token ids -> logits (B, T, vocab), or the cross-entropy if targets are given.

        targets: (B, T) next tokens; -1 is ignored. reduction: "mean" over the targets, or "sum".
        positions: (T,) or (B, T) position of each token (default: after the cache's contents,
            counted from each row's first token after its kv_start padding).
        kv_start: (B,) number of left-padding slots per row, masked out of attention.
        cache: a KVCache, written in place at each row's `pos` (a tensor, so that a one-token step has
            the same shapes every time); attention reads the whole cache, masked to what is written.
        last_only: compute logits for the last position only (generation).
        attn_maps: a list to which each layer appends its attention probabilities (B, H, T, Tk).
        documents: (B, T) document index of each token, for windows packing several documents
            (non-decreasing along a row): attention stays inside each document and positions
            restart at each one's first token, so each is computed exactly as if it were alone.
        """
        B, T = idx.shape
        if T > self.config.block_size:  # (a cache is never longer than block_size: see KVCache)
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
        slots = None if cache is None else cache.pos[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        if positions is None:
            positions = torch.arange(T, device=idx.device) if slots is None else slots
            if kv_start is not None:
                positions = (positions - kv_start[:, None]).clamp(min=0)
            if documents is not None:
                positions = document_positions(documents)
        x = self.tok_embeddings(idx)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(positions)
        if self.config.pos_embedding == "sinusoidal":
            x = x + self.sinusoidal[positions].to(x.dtype)
        rope = None
        if self.config.pos_embedding == "rope":
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            rope = (cos, sin) if positions.dim() == 1 else (cos[:, None], sin[:, None])
        x = self.drop(x)
        packing = None if documents is None else Packing(documents)  # one per forward, shared by the layers
        for block in self.layers:
            x = block(x, rope, cache, kv_start, attn_maps, slots, packing)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is not None:  # the loss, without ever holding all the logits (llm/model/loss.py)
            weight = self.tok_embeddings.weight if self.output is None else self.output.weight
            return linear_cross_entropy(x.flatten(0, 1), weight, targets.flatten(), label_smoothing, reduction)
        if last_only:
            x = x[:, -1:]
        # self.output(x), not F.linear on its weight: a head in a decoding format (llm.infer.quantize) is a module too.
        return F.linear(x, self.tok_embeddings.weight) if self.output is None else self.output(x)
