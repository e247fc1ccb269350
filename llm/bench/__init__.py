"""Benchmarks that print figures (timings are measured here, never asserted in tests).

    python -m llm.bench train [--config default] [--steps 30] [--key=value ...]
        tokens/s of train.py's loop against a plain nanoGPT-style loop at the same shapes
    python -m llm.bench sample [--config default] [--ckpt DIR]
        tokens/s at batch 1 and 8, prompts of 32 and 512 tokens, with and without the KV cache;
        decode latency at 50 versus 1000 tokens of context; ours against transformers' generate
"""
import platform

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
