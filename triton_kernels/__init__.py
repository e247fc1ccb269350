"""Triton kernels for the toolkit."""
from .flash import flash_attention, flash_attention_varlen

__all__ = ["flash_attention", "flash_attention_varlen"]
