"""Inference: generation with a static KV cache, decoding formats (packed, int8), attention maps."""
