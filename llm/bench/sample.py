"""Benchmarks that print figures (timings are measured here, never asserted in tests).

    python -m llm.bench train [--config default] [--steps 30] [--key=value ...]
        tokens/s of train.py's loop against a plain nanoGPT-style loop at the same shapes
    python -m llm.bench sample [--config default] [--ckpt DIR]
        tokens/s at batch 1 and 8, prompts of 32 and 512 tokens, with and without the KV cache;
        decode latency at 50 versus 1000 tokens of context; ours against transformers' generate
"""
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llm.config import parse_args, resolve
from llm.errors import ArgumentParser, UserError, exit_on_user_error
from llm.generate import Sampling, generate
from llm.model import Transformer


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- training -------------------------------------------------------------------------------

def bench_train(argv):
    from llm.trainer import configure, train

    extra = ArgumentParser(add_help=False)
    extra.add_argument("--steps", type=int, default=30)
    known, rest = extra.parse_known_args(argv)
    name, overrides = parse_args(rest, "python -m llm.bench train: training tokens/s")
    if known.steps < 4:
        raise UserError("--steps must be at least 4")
    with tempfile.TemporaryDirectory() as out:
        window = known.steps // 2
        settings = {**overrides, "out_dir": out, "max_steps": known.steps, "log_interval": window,
                    "eval_interval": 10**9, "eval_iters": 1, "ckpt_interval": 10**9}
        run = configure(name or "default", settings)
        print(f"train.py loop: {run.train.max_steps} steps of {run.train.batch_size} x {run.model.block_size} tokens "
              f"x {run.train.grad_accum} accumulation on {machine()}", flush=True)
        train(run)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        ours = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][-1]  # second window: warm
    plain = plain_loop(run, known.steps)
    print(f"\ntrain.py loop:            {ours:10,.0f} tokens/s")
    print(f"plain nanoGPT-style loop: {plain:10,.0f} tokens/s")
    print(f"ratio: {ours / plain:.2f}x")


def plain_loop(run, steps: int) -> float:
    """The reference: model(x, y), backward, clip, AdamW step, as in nanoGPT's train.py."""
    cfg, mc = run.train, run.model
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else cfg.device.replace("auto", "cpu"))
    torch.manual_seed(cfg.seed)
    model = Transformer(mc).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    data = np.random.randint(0, mc.vocab_size, size=1_000_000).astype(np.uint16)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def get_batch():
        ix = torch.randint(len(data) - mc.block_size, (cfg.batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + mc.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + mc.block_size].astype(np.int64)) for i in ix])
        return x.to(device), y.to(device)

    def step():
        for _ in range(cfg.grad_accum):
            x, y = get_batch()
            with autocast:
                loss = model(x, y) / cfg.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(steps // 2):  # warm up as long as the other loop's first window
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps - steps // 2):
        step()
    sync(device)
    return (steps - steps // 2) * cfg.batch_size * mc.block_size * cfg.grad_accum / (time.perf_counter() - start)


# --- sampling -------------------------------------------------------------------------------

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
        run = resolve(args.config, {"block_size": 1024 + args.new_tokens + 64, "attention": "auto"})
        torch.manual_seed(0)
        model = Transformer(run.model).to(device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(dtype)
    c = model.config
    print(f"model: {model.num_params() / 1e6:.1f}M parameters ({c.n_layer} layers, d_model {c.d_model}, "
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
        compare_with_transformers(model, args.new_tokens)


def compare_with_transformers(model, new_tokens: int):
    """Greedy generation, batch 1, the same weights: ours against transformers' generate."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("\ntransformers is not installed: skipping the comparison")
        return
    from llm.hf import export_llama
    from llm.tokenizer import Tokenizer

    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, hf_dir = Path(tmp) / "run", Path(tmp) / "hf"
        run_dir.mkdir()
        from safetensors.torch import save_file

        save_file({k: v.float().cpu().contiguous() for k, v in model.state_dict().items()}, run_dir / "model.safetensors")
        (run_dir / "config.json").write_text(json.dumps(model.config.__dict__))
        Tokenizer.train(["placeholder text"], 260).save(run_dir / "tokenizer.json")
        try:
            export_llama(run_dir, hf_dir)
        except UserError as e:
            print(f"\nnot comparable with transformers' Llama: {e}")
            return
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=next(model.parameters()).dtype).to(device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), device=device)

    def hf_generate():
        return hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    ours_tokens = torch.stack(list(generate(model, prompt.tolist(), new_tokens, Sampling(temperature=0))), dim=1)
    same = torch.equal(ours_tokens, hf_generate()[:, 32:])
    contenders = {"ours": lambda: list(generate(model, prompt.tolist(), new_tokens, Sampling(temperature=0))),
                  "transformers": hf_generate}
    runs = {name: [] for name in contenders}
    for i in range(8):  # alternate, so that drifts in machine speed hit both alike; the first round warms up
        for name, fn in contenders.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i:
                runs[name].append(time.perf_counter() - start)
    times = {name: new_tokens / statistics.median(r) for name, r in runs.items()}
    print(f"\nbatch 1, prompt 32, {new_tokens} new tokens, greedy (identical tokens: {same}):")
    print(f"  ours:         {times['ours']:8,.1f} tokens/s")
    print(f"  transformers: {times['transformers']:8,.1f} tokens/s  (ours is {times['ours'] / times['transformers']:.2f}x)")


def main(argv):
    with exit_on_user_error():
        if not argv or argv[0] not in ("train", "sample"):
            raise UserError("usage: python -m llm.bench {train,sample} [options]  (--help after the command for more)")
        {"train": bench_train, "sample": bench_sample}[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
