"""Rotary position embeddings (RoPE), rotate_half convention (as in Hugging Face Llama).

Channel i of the first half is paired with channel i of the second half:
    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

Computed half by half, so rotate_half is never materialized, and differentiated by hand: the
rotation is orthogonal, so its backward is the rotation by the opposite angle. That is a few
passes over q and k in each direction instead of the dozen that autograd records for the
formula above.

Long-context checkpoints scale the frequencies (`scaling`, ModelConfig.rope_scaling), computed
as transformers computes them, in its vocabulary (a rope_parameters dict):
    linear   every frequency divided by `factor`
    llama3   low frequencies divided by `factor`, high ones kept, a smooth blend between
             (Llama 3.1-3.3: factor, low/high_freq_factor, original_max_position_embeddings)
    yarn     YaRN's blend of interpolated and original frequencies, cos and sin scaled by
             its attention factor (Qwen2.5 long context)
`dynamic` (frequencies that change with the sequence length) and `longrope` are refused.
"""
import math

import torch

from llm.errors import UserError

# rope_type -> its parameters and their defaults (REQUIRED: none), as transformers names them.
REQUIRED = None
SCALING = {
    "linear": {"factor": REQUIRED},
    "llama3": {"factor": REQUIRED, "low_freq_factor": REQUIRED, "high_freq_factor": REQUIRED,
               "original_max_position_embeddings": REQUIRED},
    "yarn": {"factor": REQUIRED, "original_max_position_embeddings": REQUIRED, "beta_fast": 32.0, "beta_slow": 1.0,
             "attention_factor": REQUIRED, "truncate": True},
}
REFUSED = {
    "dynamic": "its frequencies change with the sequence length, so a KV cache would hold keys rotated "
               "by other frequencies",
    "longrope": "not implemented",
}


def check_scaling(scaling: dict | None) -> dict | None:
    """A rope scaling dict in its one canonical form (every parameter of its type, defaults filled
    in, YaRN's attention factor resolved), or a UserError naming the field."""
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise UserError(f"rope_scaling must be a dict, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in REFUSED:
        raise UserError(f"rope_scaling rope_type {kind!r} is not supported ({REFUSED[kind]})")
    if kind not in SCALING:
        raise UserError(f"rope_scaling rope_type {kind!r} is not one of {', '.join(SCALING)}")
    given = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
    if kind == "yarn":
        mscale, mscale_all_dim = given.pop("mscale", None), given.pop("mscale_all_dim", None)
        if given.get("attention_factor") is None:  # transformers' default, from factor and mscale
            given["attention_factor"] = yarn_attention_factor(given.get("factor"), mscale, mscale_all_dim)
    unknown = sorted(set(given) - set(SCALING[kind]))
    if unknown:
        raise UserError(f"rope_scaling {kind}: unsupported parameter(s) {', '.join(unknown)}")
    out = {"rope_type": kind}
    for name, default in SCALING[kind].items():
        out[name] = checked_parameter(kind, name, given.get(name, default))
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise UserError(f"rope_scaling llama3: high_freq_factor must exceed low_freq_factor, got {out}")
    return out


def checked_parameter(kind: str, name: str, value):
    if name == "truncate":
        if not isinstance(value, bool):
            raise UserError(f"rope_scaling {kind}: truncate must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise UserError(f"rope_scaling {kind}: {name} must be a positive number, got {value!r}")
    if name == "original_max_position_embeddings" and float(value).is_integer():
        return int(value)  # a context length
    return float(value)


def yarn_attention_factor(factor, mscale=None, mscale_all_dim=None) -> float:
    """YaRN's scale on cos and sin, as transformers infers it when the config gives none."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise UserError(f"rope_scaling yarn: factor must be a positive number, got {factor!r}")

    def get_mscale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    return get_mscale(mscale) / get_mscale(mscale_all_dim) if mscale and mscale_all_dim else get_mscale()


def llama3_factors(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """What Llama 3 divides each frequency by (GGUF stores these as rope_freqs): 1 for wavelengths
    shorter than original/high_freq_factor, `factor` for those longer than original/low_freq_factor,
    a smooth blend between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blend = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < original / high, 1.0, torch.where(wavelen > original / low, factor, blend))


def yarn_frequencies(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Original frequencies for the dimensions that turn fast within the original context,
    interpolated (divided by factor) for the slow ones, a linear ramp between (YaRN)."""
    original = scaling["original_max_position_embeddings"]

    def dim_of(rotations):  # the dimension that turns `rotations` times over the original context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling["beta_fast"]), dim_of(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low or 0.001)).clamp(0, 1)
    return inv_freq / scaling["factor"] * ramp + inv_freq * (1 - ramp)


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """The angle per position of each channel pair (float64), and the scale on cos and sin."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = scaling["rope_type"] if scaling else None
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return inv_freq / llama3_factors(inv_freq, scaling), 1.0
    if kind == "yarn":
        return yarn_frequencies(inv_freq, head_dim, theta, scaling), scaling["attention_factor"]
    return inv_freq, 1.0


def rope_cache(max_len: int, head_dim: int, theta: float,
               scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, head_dim), computed once in float64, stored in fp32."""
    inv_freq, scale = inverse_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


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
