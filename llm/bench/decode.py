"""python -m llm.bench decode: how close decoding runs to the memory-bandwidth limit, and to llama.cpp.

Decoding one token reads every weight once (and the KV cache), so its ceiling is the machine's
read bandwidth. For each model, dtype, quantization, compile setting and batch size it prints
tokens/s, the bandwidth the decode step achieves (bytes of weights + KV cache read per step x
steps/s) and that as a percentage of this machine's read bandwidth, measured here with one large
matrix-vector product in the same dtype. Then decode latency at 1,000 tokens of context against
50; transformers' generate on the same weights against ours (eager, compiled with --compile, and
each --quantize method) in one alternating loop, greedy, identical tokens checked; and, for a
trained checkpoint (--ckpt), how far each quantization moves its logits and greedy tokens, and its
bits per byte on held-out text (--eval_data). With --peers, instead: the same model and prompt
decoded by us, transformers and llama.cpp, alternated, whole calls and steady state
(llm/bench/decode_peers.py).

    python -m llm.bench decode                                   # default + llama-small shapes
    python -m llm.bench decode --config llama-small --batch 1 --compile --json out.json
    python -m llm.bench decode --peers smollm2-135m --compile --llama_cpp ~/llama.cpp --prompt_len 18
    python -m llm.bench decode --ckpt out --compile --eval_data llm/ --no_hf --no_latency --no_kernels
"""
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.bench import machine, sync
from llm.runtime import choose_device, native_bf16
from llm.files import write_json
from llm.errors import ArgumentParser, UserError
from llm.infer.generate import CompiledStep, Sampling, check_compile_backend, decode_one, generate
from llm.model.transformer import Transformer
from llm.infer import hugepages
from llm.infer.quantize import (METHODS, bytes_per_step, check_method, describe, Int8Linear, PackedLinear,
                                 TransposedLinear, for_decoding, streamed_product)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_model(name: str, device, dtype, block_size: int) -> Transformer:
    """A config's shapes with random weights (GPT-2 init), built without a throwaway init."""
    from llm.config import resolve

    config = resolve(name, {"block_size": block_size}).model
    with torch.device("meta"):
        model = Transformer(config, attention="sdpa")
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    model.init_buffers()
    return model.to(dtype).eval()


def read_bandwidth(device, dtype, quantized: bool, compile_backend: str | None = None, repeats: int = 20) -> float:
    """GB/s of one large matrix-vector product in this dtype (256 MB of fp32 or bf16 weights, 128 MB
    of int8: far beyond the caches), the fastest of F.linear, the transposed and the oneDNN-packed
    layouts for floats, the int8 kernel, and with compile_backend="inductor" on CPU the streamed sum
    that compiled decode steps use: the most a decode step in this dtype can read."""
    n, k = 8192, 8192 if dtype == torch.float32 and not quantized else 16384
    w = torch.randn(n, k, device=device).to(dtype)
    x = torch.randn(1, k, device=device, dtype=dtype)
    if device.type == "cpu" and hugepages.available():  # where the decoding formats keep their weights
        [w] = hugepages.huge_page_copies([w])
    layers = [Int8Linear(w)] if quantized else [TransposedLinear(w), lambda x: F.linear(x, w)]
    if not quantized and PackedLinear.supports(w):
        layers.append(PackedLinear(w))
    hugepages.into_huge_pages(nn.ModuleList(layer for layer in layers if isinstance(layer, nn.Module)))
    nbytes = layers[0].weight.nbytes + layers[0].kernel_scales.nbytes if quantized else w.nbytes
    if compile_backend == "inductor" and device.type == "cpu":
        stored = layers[0].weight if quantized else w
        layers.append(torch.compile(lambda x: streamed_product(x, stored), fullgraph=True))
    return max(nbytes / median_seconds(lambda: layer(x), device, repeats) / 1e9 for layer in layers)


def matvec_kernels(config, device, repeats: int = 20) -> list[dict]:
    """The int8 kernel against the float ones, on the model's two typical shapes (d_model x 4·d_model
    and vocab x d_model) at batch 1 and 8: microseconds and GB/s of weights read. (Small matrices
    stay in the caches when timed alone: GB/s here can exceed the machine's read bandwidth.)"""
    rows = []
    for n, k in ((4 * config.d_model, config.d_model), (config.vocab_size, config.d_model)):
        w = torch.randn(n, k, device=device)
        int8 = Int8Linear(w)
        for batch in (1, 8):
            x = torch.randn(batch, k, device=device)
            kernels = {
                "fp32 F.linear": (lambda: F.linear(x, w), w.nbytes),
                "fp32 transposed": (lambda t=TransposedLinear(w): t(x), w.nbytes),
                "bf16 F.linear": (lambda wb=w.bfloat16(), xb=x.bfloat16(): F.linear(xb, wb), w.nbytes // 2),
                "int8 (bf16 activations)": (lambda xb=x.bfloat16(): int8(xb), int8.weight.nbytes),
                "int8 (fp32 in and out)": (lambda: int8(x), int8.weight.nbytes),
            }
            for label, wp in (("fp32", w), ("bf16", w.bfloat16())):
                if PackedLinear.supports(wp):
                    kernels[f"{label} oneDNN packed"] = (lambda t=PackedLinear(wp), xp=x.to(wp.dtype): t(xp), wp.nbytes)
            for name, (fn, nbytes) in kernels.items():
                seconds = median_seconds(fn, device, repeats)
                rows.append({"shape": [n, k], "batch": batch, "kernel": name, "us": seconds * 1e6,
                             "gbps": nbytes / seconds / 1e9})
    return rows


def median_seconds(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_seconds(model, prompts, new_tokens: int, step) -> float:
    """Seconds for the decode steps of one greedy generation (after the prefill and first token)."""
    device = next(model.parameters()).device
    tokens = generate(model, prompts, new_tokens, Sampling(temperature=0), decode_step=step)
    next(tokens)
    sync(device)
    start = time.perf_counter()
    for _ in tokens:
        pass
    sync(device)
    return time.perf_counter() - start


def measure(model, batch: int, prompt_len: int, new_tokens: int, step, repeats: int) -> dict:
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len)).tolist()
    decode_seconds(model, prompts, new_tokens, step)  # warm up (and compile)
    seconds = statistics.median(decode_seconds(model, prompts, new_tokens, step) for _ in range(repeats))
    steps_per_s = (new_tokens - 1) / seconds
    return {"tokens_per_s": batch * steps_per_s, "ms_per_step": 1e3 / steps_per_s,
            "achieved_gbps": bytes_per_step(model, batch, prompt_len + new_tokens) * steps_per_s / 1e9}


def latency(model, context: int, steps: int, step, repeats: int) -> float:
    """Median ms per decode step at batch 1 with `context` tokens already cached."""
    prompts = torch.randint(0, model.config.vocab_size, (1, context)).tolist()
    decode_seconds(model, prompts, steps + 1, step)
    return 1e3 * statistics.median(decode_seconds(model, prompts, steps + 1, step) for _ in range(repeats)) / steps


def compare_with_transformers(model, variants: dict, new_tokens: int, repeats: int) -> dict | None:
    """Greedy generation, batch 1, prompt 32, the same weights: ours (each of `variants`, name ->
    (prepared model, decode step), whole generate calls, prefill included, as theirs) against
    transformers' generate on `model` exported, alternated so drifts hit all alike."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers is not installed: no comparison")
        return None
    from llm.formats.hf import check_exportable, write_hf
    from llm.model.tokenizer import Tokenizer

    try:
        check_exportable(model.config)
    except UserError as e:
        print(f"not comparable with transformers' Llama: {e}")
        return None
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(model, Tokenizer.train(["placeholder text"], 260), Path(tmp))
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), device=device)

    def ours(prepared, step):
        return lambda: torch.stack(list(generate(prepared, prompt.tolist(), new_tokens, Sampling(temperature=0),
                                                 decode_step=step)), dim=1)

    def theirs():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[:, 32:]

    runners = {"transformers": theirs, **{name: ours(*variant) for name, variant in variants.items()}}
    outputs = {name: fn() for name, fn in runners.items()}  # also warms up (and compiles)
    runs = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            runs[name].append(median_seconds(fn, device, 1))
    speed = {name: new_tokens / statistics.median(r) for name, r in runs.items()}
    rows = []
    for name in variants:
        differ = outputs[name] != outputs["transformers"]
        same = not differ.any()
        rows.append({"ours": name, "tokens_per_s": speed[name], "ratio": speed[name] / speed["transformers"],
                     "identical_tokens": same, "first_difference": None if same else int(differ.int().argmax())})
    return {"dtype": str(dtype).removeprefix("torch."), "new_tokens": new_tokens,
            "transformers_tokens_per_s": speed["transformers"], "ours": rows}


@torch.inference_mode()
def quantization_quality(model, method: str = "int8", tokens: int = 256, compile_backend: str | None = None,
                         held_out: tuple | None = None) -> dict:
    """A quantization `method` against the model as it is: logit difference and greedy agreement
    (teacher-forced on the float model's own greedy continuation, and free-running, also through a
    step compiled with `compile_backend`: under inductor on CPU, int8 products at batch 1 are in
    fp32) over `tokens` tokens (fewer if the context is shorter); with held_out = (token stream,
    bytes it stands for, block size), bits per byte of both models on that text."""
    tokens = min(tokens, model.config.block_size - 8)
    prompt = [torch.randint(0, model.config.vocab_size, (8,)).tolist()]

    def greedy(model, step=decode_one):
        return torch.stack(list(generate(model, prompt, tokens, Sampling(temperature=0), decode_step=step)), dim=1)

    def identical(a, b) -> int:
        return int((a == b).int().cumprod(1).sum())

    reference = greedy(model)
    quantized = for_decoding(copy.deepcopy(model), method, compile_backend, batch_size=1)
    sequence = torch.cat([torch.tensor(prompt, device=reference.device), reference], dim=1)
    logits, logits_q = model(sequence)[0, 7:-1].float(), quantized(sequence)[0, 7:-1].float()
    result = {"method": method, "tokens": tokens, "max_abs_logit_diff": (logits - logits_q).abs().max().item(),
              "max_abs_logit": logits.abs().max().item(),
              "teacher_forced_agreement": (logits.argmax(-1) == logits_q.argmax(-1)).float().mean().item(),
              "free_running_identical_tokens": identical(reference, greedy(quantized))}
    if compile_backend:
        compiled = greedy(quantized, CompiledStep(compile_backend))
        result["free_running_identical_tokens_compiled"] = identical(reference, compiled)
    if held_out is not None:
        result["bits_per_byte"], result["bits_per_byte_quantized"] = (held_out_bits_per_byte(m, *held_out)
                                                                        for m in (model, quantized))
    return result


def held_out_bits_per_byte(model, stream, n_bytes: int, block_size: int) -> float:
    from llm.eval import bits_per_byte, evaluate_tokens

    nats, _ = evaluate_tokens(model, stream, block_size, batch_size=8)
    return bits_per_byte(nats, n_bytes)


def parse(argv):
    p = ArgumentParser(prog="python -m llm.bench decode", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="default,llama-small",
                   help="model shapes (random weights), comma-separated (default: default,llama-small)")
    p.add_argument("--ckpt", help="a checkpoint to load instead of --config (also reports each quantization's "
                                  "effect on it)")
    p.add_argument("--eval_data", help="with --ckpt: held-out text (file, directory or glob) on which to report bits "
                                       "per byte of the float and quantized models")
    p.add_argument("--eval_tokens", type=int, default=200_000, help="at most this many tokens of --eval_data")
    p.add_argument("--peers", metavar="MODEL",
                   help="instead of --config/--ckpt: the same-model comparison with transformers and llama.cpp on "
                        "MODEL, smollm2-135m (its shapes, random weights, built offline) or a Hugging Face Llama "
                        "directory (see llm/bench/decode_peers.py)")
    p.add_argument("--llama_cpp", default=os.environ.get("LLAMA_CPP_DIR"), metavar="DIR",
                   help="with --peers: a llama.cpp source tree, for its convert_hf_to_gguf.py (default: $LLAMA_CPP_DIR)")
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated (default: 1,8)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16, comma-separated (default: float32, "
                                   "and bfloat16 where the hardware has it)")
    p.add_argument("--quantize", help=f"none | {' | '.join(METHODS)}, comma-separated (default: all; int4 on CPU only)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="also time the compiled decode step (a torch.compile backend, inductor if omitted; "
                        "on CUDA it is replayed as a CUDA graph)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto, cuda if available)")
    p.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row (default: 32)")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per row (default: 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per row, median (default: 3)")
    p.add_argument("--no_hf", action="store_true", help="skip the comparison with transformers")
    p.add_argument("--no_latency", action="store_true", help="skip decode latency at 50 and 1000 tokens of context")
    p.add_argument("--no_kernels", action="store_true", help="skip the int8 / float matrix-vector micro-benchmark")
    p.add_argument("--json", help="write the results here as a JSON object")
    args = p.parse_args(argv)
    try:
        args.batch = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise UserError(f"--batch must be comma-separated integers, got {args.batch!r}")
    args.device = choose_device(args.device).value
    names = args.dtype.split(",") if args.dtype else ["float32"] + ["bfloat16"] * native_bf16(args.device)
    if unknown := [n for n in names if n not in DTYPES]:
        raise UserError(f"--dtype {unknown[0]}: choose from {', '.join(DTYPES)}")
    args.dtypes = [DTYPES[n] for n in names]
    cpu = args.device.type == "cpu"
    args.quantize = args.quantize.split(",") if args.quantize else ["none", *(m for m in METHODS if cpu or m != "int4")]
    if unknown := [q for q in args.quantize if q not in ("none", *METHODS)]:
        raise UserError(f"--quantize {unknown[0]}: not supported (none or {', '.join(METHODS)})")
    for method in set(args.quantize) - {"none"}:
        check_method(method, args.device)
    if args.eval_data and not args.ckpt:
        raise UserError("--eval_data needs --ckpt (the checkpoint whose tokenizer reads it)")
    if args.peers and not cpu:
        raise UserError("--peers compares CPU decoding (llama.cpp's CPU build): use --device cpu")
    if args.compile:
        check_compile_backend(args.compile)
    if min(args.batch) < 1 or args.new_tokens < 2 or args.repeats < 1 or args.prompt_len < 1:
        raise UserError("--batch, --prompt_len and --repeats must be >= 1, --new_tokens >= 2")
    return args


def bench_decode(argv):
    args = parse(argv)
    results = {"machine": machine(), "device": str(args.device), "rows": [], "latency": [],
               "transformers": [], "quantization": [], "kernels": []}
    print(f"{results['machine']}; prompt {args.prompt_len} tokens, {args.new_tokens} new, greedy; "
          f"decode steps only (the prefill and first token are not timed)")
    if "int4" in args.quantize:
        results["int4_kernel"] = describe("int4")
        print(results["int4_kernel"])
    print()
    bandwidth = {}  # (dtype, quantized) -> GB/s, measured once
    if args.peers:
        from llm.bench.decode_peers import compare_peers

        results["peers"] = compare_peers(args, lambda quantized: read_bandwidth(args.device, torch.float32, quantized,
                                                                                args.compile))
    for name in [] if args.peers else [args.ckpt] if args.ckpt else args.config.split(","):
        for dtype in args.dtypes:
            base = load_model(name, dtype, args)
            if dtype == args.dtypes[0] and not args.no_kernels:
                results["kernels"] += kernel_rows(name, base.config, args.device)
            results["rows"] += speed_rows(name, base, args, bandwidth)
            prepared = for_decoding(copy.deepcopy(base))  # what sample.py runs
            if not args.no_latency and base.config.block_size >= 1000 + 33:
                results["latency"].append(latency_row(name, prepared, args.repeats))
            if not args.no_hf:
                results["transformers"] += transformers_rows(name, base, prepared, args)
            if args.ckpt:
                held_out = read_held_out(args, base)
                for method in [m for m in args.quantize if m != "none"]:
                    results["quantization"].append(quantization_row(name, base, method, args.compile, held_out))
            print()
    if args.json:
        write_json(args.json, results)
        print(f"results written to {args.json}")


def load_model(name: str, dtype, args) -> Transformer:
    if args.ckpt:
        from llm.formats.load import load

        model, _ = load(args.ckpt, device=args.device, dtype=dtype)
    else:
        block_size = max(1024, 1000 + 40, args.prompt_len + args.new_tokens)  # room for the latency test
        model = random_model(name, args.device, dtype, block_size)
    c = model.config
    print(f"{name}: {model.num_params() / 1e6:.1f}M parameters ({c.n_layer} layers, d_model {c.d_model}, "
          f"{c.n_head}/{c.n_kv_head} heads, vocab {c.vocab_size}), {str(dtype).removeprefix('torch.')}")
    return model


def kernel_rows(name: str, config, device) -> list[dict]:
    rows = [{"model": name, **k} for k in matvec_kernels(config, device)]
    print("  one matrix-vector product (a layer's weights and the head's), microseconds and GB/s of weights:")
    for k in rows:
        print(f"  {k['shape'][0]:>6} x {k['shape'][1]:<5} batch {k['batch']}  {k['kernel']:<24} "
              f"{k['us']:>9,.0f} us {k['gbps']:>7.1f} GB/s")
    return rows


def speed_rows(name: str, base, args, bandwidth: dict) -> list[dict]:
    """Decode speed for each quantization, compile setting and batch size, as sample.py runs it (the
    format of float weights for a compiled step depends on the batch size: see for_decoding)."""
    dtype = next(base.parameters()).dtype
    print(f"{'quantize':>8} {'compile':>9} {'batch':>5} {'tokens/s':>10} {'ms/step':>8} {'GB/s':>7} "
          f"{'read GB/s':>9} {'of read':>7}")
    rows = []
    for method in args.quantize:
        quantize = None if method == "none" else method
        key = (dtype, method != "none")
        if key not in bandwidth:
            bandwidth[key] = read_bandwidth(args.device, dtype, method != "none", args.compile)
        for compiled in [None] + [args.compile] * bool(args.compile):
            prepared = {}  # format -> (model, step): one conversion and one compiled step per format
            for batch in args.batch:
                streamed = compiled == "inductor" and batch == 1
                if streamed not in prepared:
                    model = for_decoding(copy.deepcopy(base), quantize, compiled, batch_size=batch if streamed else None)
                    prepared[streamed] = model, CompiledStep(compiled) if compiled else decode_one
                row = {"model": name, "parameters": base.num_params(), "dtype": str(dtype).removeprefix("torch."),
                       "quantize": method, "compile": compiled or False, "batch": batch, "device": str(args.device),
                       **measure(prepared[streamed][0], batch, args.prompt_len, args.new_tokens,
                                 prepared[streamed][1], args.repeats),
                       "read_bandwidth_gbps": bandwidth[key]}
                row["percent_of_read"] = 100 * row["achieved_gbps"] / row["read_bandwidth_gbps"]
                rows.append(row)
                print(f"{method:>8} {str(compiled or '-'):>9} {batch:>5} {row['tokens_per_s']:>10,.1f} "
                      f"{row['ms_per_step']:>8.2f} {row['achieved_gbps']:>7.1f} {row['read_bandwidth_gbps']:>9.1f} "
                      f"{row['percent_of_read']:>6.0f}%", flush=True)
    return rows


def transformers_rows(name: str, base, prepared, args) -> list[dict]:
    """Ours as sample.py runs it at batch 1 (eager; compiled with --compile; each --quantize method)
    against transformers' generate on the same weights, in one alternating loop."""
    variants = {"eager": (prepared, decode_one)}
    if args.compile:
        variants["compiled"] = (for_decoding(copy.deepcopy(base), None, args.compile, batch_size=1),
                                CompiledStep(args.compile))
    for method in args.quantize:
        if method != "none":
            quantized = for_decoding(copy.deepcopy(base), method, args.compile, batch_size=1)
            variants[method] = (quantized, decode_one)
            if args.compile:
                variants[f"{method} compiled"] = (quantized, CompiledStep(args.compile))
    hf = compare_with_transformers(base, variants, args.new_tokens, max(3, args.repeats))
    if hf is None:
        return []
    print(f"transformers' generate, batch 1, same weights: {hf['transformers_tokens_per_s']:,.1f} tokens/s; ours:")
    for row in hf["ours"]:
        tokens = "identical tokens" if row["identical_tokens"] else f"tokens differ from #{row['first_difference']}"
        print(f"  {row['ours']:<14} {row['tokens_per_s']:>9,.1f} tokens/s ({row['ratio']:.2f}x, {tokens})")
    return [{"model": name, **hf}]


def latency_row(name: str, model, repeats: int) -> dict:
    near, far = (latency(model, n, 32, decode_one, repeats) for n in (50, 1000))
    print(f"decode latency, batch 1: {near:.2f} ms/token at 50 tokens of context, "
          f"{far:.2f} at 1000 ({far / near:.2f}x)")
    return {"model": name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "ms_at_50": near, "ms_at_1000": far, "ratio": far / near}


def quantization_row(name: str, model, method: str, compile_backend: str | None, held_out) -> dict:
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    q = {"model": name, "dtype": dtype,
         **quantization_quality(model, method, compile_backend=compile_backend, held_out=held_out)}
    compiled = q.get("free_running_identical_tokens_compiled")
    print(f"{method} vs {q['dtype']} over {q['tokens']} greedy tokens: max |logit diff| {q['max_abs_logit_diff']:.3g} "
          f"(logits up to {q['max_abs_logit']:.3g}), argmax agreement {q['teacher_forced_agreement']:.3f}, "
          f"free-running identical for {q['free_running_identical_tokens']} tokens"
          + ("" if compiled is None else f" ({compiled} compiled)")
          + ("" if held_out is None else f"; bits per byte on held-out text {q['bits_per_byte']:.4f} -> "
                                         f"{q['bits_per_byte_quantized']:.4f}"))
    return q


def read_held_out(args, model) -> tuple | None:
    """(token stream, its bytes, block size) of --eval_data, tokenized by the checkpoint's tokenizer."""
    if not args.eval_data:
        return None
    from llm.eval import target_bytes, tokenize_text
    from llm.formats.load import load_tokenizer

    tokenizer = load_tokenizer(args.ckpt)
    stream, _ = tokenize_text(args.eval_data, tokenizer, args.eval_tokens)
    return stream, target_bytes(tokenizer, [stream]), model.config.block_size
