"""Rotary position embeddings (RoPE), rotate_half convention (as in Hugging Face Llama).

Channel i of the first half is paired with channel i of the second half:
    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

Computed half by half, so rotate_half is never materialized, and differentiated by hand: the
rotation is orthogonal, so its backward is the rotation by the opposite angle. That is a few
passes over q and k in each direction instead of the dozen that autograd records for the
formula above.
"""
import torch


def rope_cache(max_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, head_dim), computed once in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, as [x1·c − x2·s, x2·c + x1·s] (c, s: the first half of
    cos and sin, which repeat across the halves)."""
    half = x.size(-1) // 2
    x1, x2, s = x[..., :half], x[..., half:], sin[..., :half]
    y = x * cos
    y[..., :half].addcmul_(x2, s, value=-1)
    y[..., half:].addcmul_(x1, s)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, -sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D) or (B, 1, T, D), already indexed by position."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if not (x.requires_grad and torch.is_grad_enabled()):  # decoding: no autograd node to build
        return rotate(x, cos, sin)
    return _Rope.apply(x, cos, sin)
