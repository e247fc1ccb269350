"""LoRA (Hu et al., 2021): frozen linear layers plus trainable low-rank updates.

    y = x·Wᵀ + b + (alpha / rank) · dropout(x)·Aᵀ·Bᵀ      A: (rank, in), B: (out, rank), B starts at 0

`add_lora` makes the chosen linear layers of every block LoRALinear, in place, and freezes every
other parameter: only the adapters train, and only they reach the optimizer. A LoRALinear is
an nn.Linear whose weight and bias keep their names (`layers.0.attention.wqkv.weight`), so
`merged` folds the adapters into the weights under the plain model's names: a fine-tuned run's
model.safetensors is a plain model (llm.load, export and GGUF need no LoRA code), while its
training state keeps base weights and adapters apart for an exact resume, and adapter.safetensors
holds the adapters alone.

Our attention projects q, k and v with one fused matrix (wqkv): its adapter is one A shared by
the three and one B whose rows split like wqkv's, a rank-r update of the fused matrix (peft's
adapters on q_proj, k_proj and v_proj would be three rank-r updates).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from llm.config import TrainConfig

ADAPTER_FILE = "adapter.safetensors"


class LoRALinear(nn.Linear):
    """`base`'s weight and bias (frozen, the same tensors) plus the adapters lora_a and lora_b."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **like))  # the model starts as the base
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own initialization
        self.scale = alpha / rank
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(self.drop(x), self.lora_a),
                                                                           self.lora_b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_a.size(0)}, scale={self.scale:g}"


def targets_of(cfg: TrainConfig) -> list[str]:
    return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]


def add_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Adapters of cfg.lora_rank on cfg.lora_targets in every block; every other parameter frozen."""
    model.requires_grad_(False)
    targets = set(targets_of(cfg))
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout))
    return model


def is_adapter(name: str) -> bool:
    return name.endswith((".lora_a", ".lora_b"))


def merged(state_dict: dict, scale: float) -> dict:
    """The plain model's weights: each adapted weight W + scale·B·A (computed in float32 at least), the
    adapters dropped. A state dict without adapters comes back as it is."""
    out = {}
    for name, tensor in state_dict.items():
        if is_adapter(name):
            continue
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{module}.lora_a" in state_dict:
            wide = torch.promote_types(tensor.dtype, torch.float32)
            a, b = state_dict[f"{module}.lora_a"].to(wide), state_dict[f"{module}.lora_b"].to(wide)
            tensor = (tensor.to(wide) + scale * (b @ a)).to(tensor.dtype)
        out[name] = tensor
    return out


def save_adapters(state_dict: dict, cfg: TrainConfig, path):
    """The adapters alone, with their rank, alpha and targets as metadata."""
    adapters = {name: tensor for name, tensor in state_dict.items() if is_adapter(name)}
    save_file(adapters, path, metadata={"rank": str(cfg.lora_rank), "alpha": str(cfg.lora_alpha),
                                        "targets": cfg.lora_targets})


def lora_scale(cfg: TrainConfig) -> float:
    return cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0
