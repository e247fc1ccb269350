"""The model: the Transformer and its parts (attention, RoPE, the fused loss) and its tokenizer."""
