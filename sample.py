"""Sample completions from a checkpoint (a run directory, a Hugging Face directory or a GGUF file).

    python sample.py --ckpt out --prompt "def fib(n):" --max_new_tokens 200 --temperature 0.8 --top_k 200
    echo "import os" | python sample.py --prompt - --temperature 0     # greedy, prompt from stdin
    python sample.py --prompt "class " --prompt "import " --num_samples 2 --stop "\\n\\n"
    python sample.py --prompt "def " --attention_png attn.png --attention_layer -1 --attention_head 0
    python sample.py --ckpt out --compile --quantize int8             # a compiled decode step, int8 weights
    python sample.py --ckpt out --chat --prompt "What is 2 + 2?"      # one user message, the model's chat template
    python sample.py --ckpt out --chat --prompt_file conversation.json --temperature 0   # a JSON list of messages
    python sample.py --ckpt out --compile --quantize int4             # 4-bit weights (CPU)
"""
import re
import sys
import time

import torch

import llm
from llm import runtime
from llm.errors import ArgumentParser, HelpFormatter, UserError, exit_on_user_error
from llm.formats.load import chat_template
from llm.infer.chat import chat_prompt, read_conversation
from llm.infer.generate import CompiledStep, Sampling, check_compile_backend, complete, decode_one, prompt_tokens
from llm.infer.quantize import INT4_GROUP_SIZE, METHODS, check_method, describe, for_decoding
from llm.infer.viz import check_layer_and_head, save_attention_map
from llm.model.chat import end_of_turn


def parse(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default="out", help="run directory, checkpoint folder, Hugging Face directory or GGUF file")
    p.add_argument("--prompt", action="append", help="prompt text, '-' for stdin; repeat for a batch")
    p.add_argument("--prompt_file", action="append", help="a file whose whole text is one prompt; repeatable")
    p.add_argument("--chat", action="store_true",
                   help="apply the model's chat template: each --prompt is a user message, each --prompt_file a JSON "
                        "conversation (a list of messages); the reply stops at the template's end of turn")
    p.add_argument("--system", help="with --chat: a system message before each --prompt")
    p.add_argument("--num_samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--max_new_tokens", type=int,
                   help="tokens to generate per completion (default: 200, or what the context leaves after the longest prompt)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=200, help="0 keeps every token")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    p.add_argument("--seed", type=int, default=1337, help="seeds the sampling")
    p.add_argument("--stop", action="append", default=[], help="stop a completion at this string; repeatable")
    p.add_argument("--truncate_prompt", action="store_true", help="drop a too-long prompt's left side instead of failing")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--attention", choices=["naive", "sdpa", "triton", "auto"], help="override the attention backend")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole sequence every step (slow; for checking)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the one-token decode step, once per generation (BACKEND: a torch.compile "
                        "backend, inductor if omitted); on CUDA it also replays as a CUDA graph")
    p.add_argument("--quantize", metavar="METHOD",
                   help=f"quantize the weights for decoding: {', '.join(METHODS)} (weight-only; int8: one "
                        f"scale per output channel; int4, CPU only: a scale and offset per {INT4_GROUP_SIZE} inputs)")
    p.add_argument("--attention_png", help="save a heatmap of one head's attention over the first completion")
    p.add_argument("--attention_layer", type=int, default=-1, help="the layer of --attention_png (negative: from the end)")
    p.add_argument("--attention_head", type=int, default=0, help="the head of --attention_png")
    args = p.parse_args(argv)
    if (args.max_new_tokens is not None and args.max_new_tokens < 0) or args.num_samples < 1:
        raise UserError("--max_new_tokens must be >= 0 and --num_samples >= 1")
    args.stop = tuple(unescape(s) for s in args.stop)
    if args.compile:
        check_compile_backend(args.compile)
    if args.quantize:
        check_method(args.quantize)
    return args


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0"}


def unescape(text: str) -> str:
    """Backslash escapes typed on a command line ("\\n\\n"), leaving every other character as it is
    (unicode_escape would read UTF-8 text as Latin-1 and mangle it)."""
    return re.sub(r"\\([ntr0\\])", lambda m: ESCAPES[m.group(1)], text)


def read_prompts(args) -> list[str]:
    prompts = []
    for p in args.prompt or []:
        prompts.append(sys.stdin.read() if p == "-" else p)
    for path in args.prompt_file or []:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                prompts.append(f.read())
        except OSError as e:
            raise UserError(f"cannot read prompt file {path}: {e.strerror}")
    return prompts or [""]


def read_chats(args, tokenizer, template) -> list[list[int]]:
    """--chat: each --prompt as a user message (after --system, if given), each --prompt_file as a
    JSON conversation; rendered with the generation prompt and tokenized."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    conversations = [system + [{"role": "user", "content": sys.stdin.read() if p == "-" else p}]
                     for p in args.prompt or []]
    conversations += [read_conversation(path) for path in args.prompt_file or []]
    if not conversations:
        raise UserError("--chat needs a --prompt (a user message) or a --prompt_file (a JSON conversation)")
    return [chat_prompt(tokenizer, template, c) for c in conversations]


def room(model, tokenizer, prompts, most: int = 200) -> int:
    """--max_new_tokens by default: `most`, or what the context leaves after the longest prompt (a
    chat's template around a question can fill much of a small model's context)."""
    longest = max(len(p) if isinstance(p, list) else len(prompt_tokens(tokenizer, p)) for p in prompts)
    return max(1, min(most, model.config.block_size - longest))


def main(argv) -> int:
    with exit_on_user_error():
        args = parse(argv)
        try:
            sampling = Sampling(args.temperature, args.top_k, args.top_p)
        except ValueError as e:
            raise UserError(str(e))
        device = runtime.choose_device(args.device)
        if args.quantize:
            check_method(args.quantize, device.value)
        dtype = runtime.inference_dtype(args.dtype, device.value)
        model, tokenizer = llm.load(args.ckpt, device=device.value, dtype=dtype.value)
        if args.attention_png:
            check_layer_and_head(model.config, args.attention_layer, args.attention_head)
        if args.attention:
            model.set_attention(args.attention)
        stop_ids = ()
        if args.chat:
            template = chat_template(args.ckpt)
            if template is None:
                raise UserError(f"{args.ckpt} has no chat template (chat_template.jinja, or chat_template in "
                                "tokenizer_config.json): fine-tune it with train.py --task sft, or sample without --chat")
            stop_ids = tuple(i for i in [end_of_turn(template, tokenizer.special_ids)] if i is not None)
            prompts = [p for p in read_chats(args, tokenizer, template) for _ in range(args.num_samples)]
        else:
            prompts = [p for p in read_prompts(args) for _ in range(args.num_samples)]
        # the layout one-token steps read fastest, at this batch size
        for_decoding(model, args.quantize, args.compile, batch_size=len(prompts))
        max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else room(model, tokenizer, prompts)
        stream = len(prompts) == 1
        if stream and not args.chat:  # (a chat prints the reply only)
            print(prompts[0], end="", flush=True)
        decode_step = CompiledStep(args.compile) if args.compile else decode_one
        start = time.perf_counter()
        try:
            results = complete(model, tokenizer, prompts, max_new_tokens, sampling, seed=args.seed, stop=args.stop,
                               on_text=(lambda row, text: print(text, end="", flush=True)) if stream else None,
                               use_cache=not args.no_cache, truncate=args.truncate_prompt, decode_step=decode_step,
                               stop_ids=stop_ids)
        except ValueError as e:
            raise UserError(f"{e} (pass --truncate_prompt to drop the prompt's left side)" if "exceeds" in str(e) else str(e))
        except torch._dynamo.exc.TorchDynamoException as e:  # e.g. no C++ compiler for inductor on CPU
            cause = getattr(e, "inner_exception", None) or e
            raise UserError(f"--compile {args.compile} failed ({type(cause).__name__}: "
                            f"{str(cause).strip().splitlines()[0][:300]}); try another backend or no --compile")
        seconds = time.perf_counter() - start
        compiled = f"compiled ({args.compile}"
        if args.compile and decode_step.compile_seconds is not None:  # compiling is not sampling speed
            seconds -= decode_step.compile_seconds
            compiled += f", {decode_step.compile_seconds:.1f} s to compile, not counted"
        if stream:
            print()
        else:
            for prompt, result in zip(prompts, results):
                print(result["text"] if args.chat else prompt + result["text"])
                print("-" * 40)
        n_tokens = sum(len(r["ids"]) for r in results)
        how = ["no cache" if args.no_cache else "KV cache", f"device {device}", f"dtype {dtype}", runtime.threads()]
        how += [compiled + ")"] * bool(args.compile) + [describe(args.quantize)] * bool(args.quantize)
        print(f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s "
              f"(batch {len(prompts)}, {', '.join(how)})", file=sys.stderr)
        if args.attention_png:
            first = results[0]
            save_attention_map(model, tokenizer, first["prompt_ids"] + first["ids"], args.attention_layer,
                               args.attention_head, args.attention_png)
            print(f"attention map written to {args.attention_png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
