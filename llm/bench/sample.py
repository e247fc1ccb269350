"""python -m llm.bench sample: generation tokens/s, decode latency, ours against transformers."""
import copy
import statistics
import time

import torch

from llm.bench import machine, sync
from llm.bench.decode import compare_with_transformers
from llm.config import resolve
from llm.errors import ArgumentParser
from llm.generate import Sampling, generate
from llm.model import Transformer
from llm.quantize import for_decoding


def timed_generation(model, batch: int, prompt_len: int, new_tokens: int, use_cache: bool, repeats: int = 5) -> float:
    """Median tokens/s (generated tokens, all rows) for greedy generation."""
    device = next(model.parameters()).device
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len)).tolist()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for token in generate(model, prompts, new_tokens, Sampling(temperature=0), use_cache=use_cache):
            pass
        sync(device)
        times.append(time.perf_counter() - start)
    return batch * new_tokens / statistics.median(times)


def decode_latency(model, context: int, steps: int = 32, repeats: int = 5) -> float:
    """Median seconds per decode step with `context` tokens already in the cache (batch 1)."""
    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (1, context)).tolist()
    per_step = []
    for _ in range(repeats):
        tokens = generate(model, prompt, steps + 1, Sampling(temperature=0))
        next(tokens)  # prefill and the first token
        sync(device)
        start = time.perf_counter()
        for _ in tokens:
            pass
        sync(device)
        per_step.append((time.perf_counter() - start) / steps)
    return statistics.median(per_step)


def bench_sample(argv):
    p = ArgumentParser(prog="python -m llm.bench sample", description="generation tokens/s")
    p.add_argument("--config", default="default", help="model shape, random weights (ignored with --ckpt)")
    p.add_argument("--ckpt", help="a run directory to load instead")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--no_hf", action="store_true", help="skip the comparison with transformers")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.ckpt:
        from llm.checkpoint import load

        model, _ = load(args.ckpt, device=device)
    else:
        run = resolve(args.config, {"block_size": 1024 + args.new_tokens + 64})
        torch.manual_seed(0)
        model = Transformer(run.model).to(device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(dtype)
    base, model = model, for_decoding(copy.deepcopy(model))  # as sample.py runs it
    c = model.config
    print(f"model: {base.num_params() / 1e6:.1f}M parameters ({c.n_layer} layers, d_model {c.d_model}, "
          f"{c.n_head}/{c.n_kv_head} heads), {dtype}, {machine()}\n")
    print(f"{'batch':>5} {'prompt':>6} {'cache':>5} {'tokens/s':>10}")
    table = {}
    for batch in (1, 8):
        for prompt_len in (32, 512):
            for use_cache in (True, False):
                tps = timed_generation(model, batch, prompt_len, args.new_tokens, use_cache, repeats=5 if use_cache else 1)
                table[batch, prompt_len, use_cache] = tps
                print(f"{batch:>5} {prompt_len:>6} {'yes' if use_cache else 'no':>5} {tps:>10,.1f}", flush=True)
    for batch in (1, 8):
        print(f"cache speed-up at batch {batch}, prompt 512: {table[batch, 512, True] / table[batch, 512, False]:.1f}x")
    near, far = decode_latency(model, 50), decode_latency(model, 1000)
    print(f"\ndecode latency, batch 1: {near * 1e3:.2f} ms/token at 50 tokens of context, "
          f"{far * 1e3:.2f} ms/token at 1000 ({far / near:.2f}x)")
    if not args.no_hf:
        hf = compare_with_transformers(base, model, args.new_tokens, repeats=7)
        if hf:
            print(f"\nbatch 1, prompt 32, {args.new_tokens} new tokens, greedy "
                  f"(identical tokens: {hf['identical_tokens']}):")
            print(f"  ours:         {hf['ours_tokens_per_s']:8,.1f} tokens/s")
            print(f"  transformers: {hf['transformers_tokens_per_s']:8,.1f} tokens/s  (ours is {hf['ratio']:.2f}x)")
