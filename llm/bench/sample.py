"""python -m llm.bench sample: generation tokens/s with the KV cache and without it (recomputing the
whole sequence every step), batch 1 and 8, prompts of 32 and 512 tokens. Decode speed against the
machine's memory bandwidth, latency and transformers: python -m llm.bench decode."""
import statistics
import time

import torch

from llm.bench import machine, sync
from llm.runtime import choose_device, inference_dtype
from llm.config import resolve
from llm.errors import ArgumentParser
from llm.infer.generate import Sampling, generate
from llm.model.transformer import Transformer
from llm.infer.quantize import for_decoding


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


def bench_sample(argv):
    p = ArgumentParser(prog="python -m llm.bench sample", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="default", help="model shape, random weights (ignored with --ckpt)")
    p.add_argument("--ckpt", help="a run directory to load instead")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = choose_device(args.device).value
    dtype = inference_dtype("auto", device).value
    if args.ckpt:
        from llm.formats.load import load

        model, _ = load(args.ckpt, device=device)
    else:
        run = resolve(args.config, {"block_size": 1024 + args.new_tokens + 64})
        torch.manual_seed(0)
        model = Transformer(run.model).to(device).eval()
    model.to(dtype)
    params = model.num_params()
    model = for_decoding(model)  # as sample.py runs it
    c = model.config
    print(f"model: {params / 1e6:.1f}M parameters ({c.n_layer} layers, d_model {c.d_model}, "
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
