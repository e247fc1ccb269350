"""Benchmarks that print figures (timings are measured here, never asserted in tests).

    python -m llm.bench train     training tokens/s of train.py, side by side with nanoGPT's own train.py
    python -m llm.bench speedrun  wall-clock time and tokens to a validation loss, recipes side by side
    python -m llm.bench decode    decode tokens/s and memory bandwidth against the machine's, vs transformers
    python -m llm.bench sample    tokens/s with and without the KV cache, batch 1 and 8, prompts of 32 and 512

Each command's --help (after its name) lists its options.
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
