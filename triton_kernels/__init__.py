"""Triton kernels for the toolkit."""
from .flash import flash_attention

__all__ = ["flash_attention"]
