"""Benchmarks that print figures (timings are measured here, never asserted in tests).

    python -m llm.bench train     training tokens/s of train.py, side by side with nanoGPT's own train.py
    python -m llm.bench speedrun  wall-clock time and tokens to a validation loss, recipes side by side
    python -m llm.bench decode    decode tokens/s and memory bandwidth against the machine's, vs transformers
    python -m llm.bench sample    tokens/s with and without the KV cache, batch 1 and 8, prompts of 32 and 512
    python -m llm.bench finetune  memory and tokens/s of full fine-tuning against LoRA (and a local example)
    python -m llm.bench serve     the server under 1, 4 and 16 concurrent clients (requests/s, tokens/s,
                                  time to first token, per-token latency), next to sample.py alone
    python -m llm.bench attention our Triton kernel against naive attention and PyTorch SDPA (TFLOP/s, memory)

Each command's --help (after its name) lists its options.
"""
import torch

from llm.runtime import cpu_flags, cpu_name

CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # the ones that decide bf16's speed (llm/runtime.py)


def machine() -> str:
    """The device the figures come from: the GPU, or the CPU with its threads and bf16 flags."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    flags = cpu_flags()
    bf16 = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS)
    return f"{cpu_name()}, {torch.get_num_threads()} threads ({bf16}), torch {torch.__version__}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
