"""Serve a checkpoint over HTTP in the shape of OpenAI's API, batching concurrent requests.

    python -m llm.serve --ckpt out                                  # http://127.0.0.1:8000/v1
    python -m llm.serve --ckpt out --compile --max_batch 16         # a compiled step for 16 rows
    python -m llm.serve --ckpt hf/my-model --host 0.0.0.0 --api_key "$KEY"   # reachable from other hosts

Requests share one static decode step of --max_batch rows; more wait in a queue of --max_queue
(beyond it: 429). SIGTERM (or Ctrl-C) stops accepting connections, lets requests in flight
finish for up to --shutdown_timeout seconds, cancels the rest and exits (SIGTERM: status 0).
"""
import argparse
import signal
import socket
import sys

import torch
import uvicorn

import llm
from llm import runtime
from llm.errors import ArgumentParser, HelpFormatter, UserError, exit_on_user_error
from llm.formats import run_dir
from llm.formats.load import format_of
from llm.infer.generate import check_compile_backend
from llm.infer.quantize import METHODS, check_method, describe, for_decoding
from llm.model.chat import ChatTemplate, find_template
from llm.serve.api import Served, build_app
from llm.serve.engine import Engine
from llm.serve.runner import ModelRunner

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Help(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the examples below kept as written."""


def parse(argv):
    doc = __doc__.split("\n\n")
    p = ArgumentParser(prog="python -m llm.serve", description=doc[0], epilog="\n\n".join(doc[1:]),
                       formatter_class=Help, allow_abbrev=False)
    p.add_argument("--ckpt", default="out", help="run directory, checkpoint folder or Hugging Face directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (another than loopback: reachable "
                                                       "from other machines; consider --api_key)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    p.add_argument("--name", help="the model's name in /v1/models and responses (default: --ckpt as given)")
    p.add_argument("--max_batch", type=int, default=8, help="rows of the decode step: requests generated at once")
    p.add_argument("--max_queue", type=int, default=64, help="requests (choices) waiting for a row; more get 429")
    p.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the decode step (BACKEND: inductor if omitted); on CUDA also a CUDA graph")
    p.add_argument("--quantize", metavar="METHOD", help=f"quantize the weights for decoding: {', '.join(METHODS)}")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--attention", choices=["naive", "sdpa", "triton", "auto"], help="override the attention backend")
    p.add_argument("--shutdown_timeout", type=float, default=10.0,
                   help="seconds requests in flight may take to finish after SIGTERM before they are cancelled")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.max_queue < 0:
        raise UserError("--max_batch must be >= 1 and --max_queue >= 0")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port}: not a port number")
    if args.compile:
        check_compile_backend(args.compile)
    if args.quantize:
        check_method(args.quantize)
    return args


def chat_template(ckpt: str) -> ChatTemplate | None:
    """The checkpoint's own template; our runs without one use the documented default (ChatML)."""
    ours = format_of(ckpt) is run_dir
    template = find_template(run_dir.model_folder(ckpt) if ours else ckpt)
    if template is None and ours:
        template = ChatTemplate.default()
    return template


def warm_up(runner: ModelRunner, backend: str | None):
    try:
        with torch.inference_mode():
            runner.warm_up()
    except torch._dynamo.exc.TorchDynamoException as e:  # e.g. no C++ compiler for inductor on CPU
        cause = getattr(e, "inner_exception", None) or e
        raise UserError(f"--compile {backend} failed ({type(cause).__name__}: "
                        f"{str(cause).strip().splitlines()[0][:300]}); try another backend or no --compile")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, made here so that a taken port is one clear line (connections made
    while the model loads wait in its backlog)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}")
    sock.set_inheritable(True)
    return sock


def main(argv) -> int:
    # uvicorn shuts down gracefully on SIGTERM, then raises it again for the handler it found: this one
    # exits 0 (as it does before serving starts)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with exit_on_user_error():
        args = parse(argv)
        sock = listen(args.host, args.port)  # a taken port fails now, not after loading and compiling
        device = runtime.choose_device(args.device)
        dtype = runtime.inference_dtype(args.dtype, device.value)
        model, tokenizer = llm.load(args.ckpt, device=device.value, dtype=dtype.value)
        template = chat_template(args.ckpt)
        if args.attention:
            model.set_attention(args.attention)
        params = model.num_params()
        for_decoding(model, args.quantize, args.compile)
        runner = ModelRunner(model, args.max_batch, args.compile)
        warm_up(runner, args.compile)
        engine = Engine(runner, args.max_queue)
        served = Served(args.name or args.ckpt, model.config, tokenizer, template, engine, device.value, args.api_key)
        host, port = sock.getsockname()[:2]
        how = [f"device {device}", f"dtype {dtype}", runtime.threads(), f"{args.max_batch} rows",
               f"queue {args.max_queue}"] + [f"compiled ({args.compile})"] * bool(args.compile)
        how += [describe(args.quantize)] * bool(args.quantize)
        print(f"model {served.name}: {params / 1e6:.1f}M parameters, context {model.config.block_size}, "
              f"chat template {'none' if template is None else 'yes'}; {', '.join(how)}", flush=True)
        if args.host not in LOOPBACK and not args.api_key:
            print(f"warning: listening on {args.host} without --api_key: anyone who reaches it can use it",
                  file=sys.stderr, flush=True)
        print(f"serving on http://{host if ':' not in host else f'[{host}]'}:{port}/v1", flush=True)
        engine.start()
        config = uvicorn.Config(build_app(served), log_level=args.log_level,
                                timeout_graceful_shutdown=args.shutdown_timeout)
        uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
