"""python -m llm.bench serve: the server under 1, 4 and 16 concurrent clients, next to sample.py alone.

For a checkpoint (--ckpt), or random weights in each --config's shapes (random weights decode
as fast as trained ones; the tokenizer is the one train.py trains for that vocabulary on the
standard library, cached), it times sample.py generating alone (greedy: its tokens/s), then starts
`python -m llm.serve` on 127.0.0.1 on a free port and, for each number of concurrent clients,
sends streamed completions (prompts of --prompt_tokens random tokens; greedy, ignore_eos, so that
every request generates --max_tokens) until each client has made --requests (or --seconds have
passed), and prints requests/s, generated tokens/s, time to first token, per-token latency (p50
and p99) and the requests that failed (an error, or a stream cut short).

    python -m llm.bench serve                                            # default and llama-small shapes
    python -m llm.bench serve --ckpt out --clients 16 --seconds 120      # two minutes under 16 clients
"""
import asyncio
import itertools
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import save_file

from llm.bench import machine
from llm.files import write_json
from llm.errors import ArgumentParser, UserError

ROOT = Path(__file__).resolve().parent.parent.parent


def parse(argv):
    p = ArgumentParser(prog="python -m llm.bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="default,llama-small", help="model shapes, random weights (ignored with --ckpt)")
    p.add_argument("--ckpt", help="a checkpoint to serve instead")
    p.add_argument("--clients", default="1,4,16", help="numbers of concurrent clients, one run each")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--seconds", type=float, help="run each level this long instead (requests then in flight finish)")
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--max_tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--max_batch", type=int, default=16, help="the server's rows (python -m llm.serve --max_batch)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND", help="for the server and sample.py")
    p.add_argument("--quantize", metavar="METHOD", help="for the server and sample.py")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        raise UserError(f"--clients {args.clients}: comma-separated numbers")
    if min(args.clients) < 1 or args.requests < 1 or args.max_tokens < 2 or args.prompt_tokens < 1:
        raise UserError("--clients, --requests and --prompt_tokens must be >= 1, --max_tokens >= 2")
    return args


def random_checkpoint(name: str, folder: Path, context: int) -> Path:
    """A checkpoint folder with random weights in a config's shapes (its context at least `context`)
    and train.py's tokenizer for it."""
    from llm.bench.decode import random_model
    from llm.config import resolve
    from llm.train.data import open_corpus, train_or_load_tokenizer

    model = random_model(name, "cpu", torch.float32, max(resolve(name, {}).model.block_size, context))
    tokenizer = train_or_load_tokenizer(open_corpus(None), model.config.vocab_size, Path("~/.cache/llm").expanduser(),
                                        50_000_000)
    path = folder / name
    path.mkdir()
    save_file(model.state_dict(), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(asdict(model.config)))
    tokenizer.save(path / "tokenizer.json")
    return path


def decode_options(args) -> list[str]:
    return ["--compile", args.compile] * bool(args.compile) + ["--quantize", args.quantize] * bool(args.quantize)


def sample_rate(ckpt: Path, prompt: Path, args) -> float:
    """sample.py's tokens/s for one greedy completion of the prompt (as it prints them)."""
    command = [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(ckpt), "--prompt_file", str(prompt),
               "--temperature", "0", "--max_new_tokens", str(args.max_tokens), *decode_options(args)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    found = re.search(r"([\d.]+) tokens/s", result.stderr)
    if result.returncode or not found:
        raise UserError(f"sample.py failed: {result.stderr.strip()[-500:]}")
    return float(found.group(1))


def start_server(ckpt: Path, log: Path, args) -> tuple[subprocess.Popen, str]:
    return launch_server(ckpt, log, ["--max_batch", str(args.max_batch), "--max_queue", str(max(args.clients) * 2),
                                     *decode_options(args)])


def launch_server(ckpt: Path, log: Path, options: list[str], timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """python -m llm.serve on a free port, its output in `log`; returns the process and its base
    URL once it answers, or a UserError with the log's end."""
    command = [sys.executable, "-m", "llm.serve", "--ckpt", str(ckpt), "--port", "0", "--log_level", "warning",
               *options]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        url = next((line.split()[-1].removesuffix("/v1") for line in log.read_text().splitlines()
                    if line.startswith("serving on ")), None)
        try:
            if url and httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:  # not listening yet, or still loading
            pass
        time.sleep(0.2)
    proc.kill()
    raise UserError(f"the server did not start: {log.read_text().strip()[-500:]}")


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    """A streamed completion: when its first and last tokens came, and whether it came whole."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start, first, last, tokens, done = time.perf_counter(), None, None, 0, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                data = line.removeprefix("data: ")
                if data == line:
                    continue
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("choices"):
                    first, last = first or time.perf_counter(), time.perf_counter()
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if not done or tokens != max_tokens or first is None:
        seen = "seen" if done else "not seen"
        return {"ok": False, "error": f"cut short: {tokens} of {max_tokens} tokens, [DONE] {seen}"}
    return {"ok": True, "ttft": first - start, "per_token": (last - first) / (tokens - 1), "tokens": tokens}


async def run_clients(url: str, clients: int, prompts: list[list[int]], args) -> dict:
    """`clients` clients, each sending one request after another, until the budget or the time is spent."""
    records, count = [], itertools.count()
    budget = clients * args.requests
    start = time.perf_counter()
    deadline = start + args.seconds if args.seconds else None

    async def client_loop(client):
        for i in count:  # shared by the clients: request numbers
            if (time.perf_counter() >= deadline) if deadline else i >= budget:
                return
            records.append(await one_request(client, url, prompts[i % len(prompts)], args.max_tokens))

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return summarize(clients, records, time.perf_counter() - start)


def summarize(clients: int, records: list[dict], seconds: float) -> dict:
    ok = [r for r in records if r["ok"]]
    ttft, per_token = [r["ttft"] for r in ok], [r["per_token"] for r in ok]

    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    return {"clients": clients, "requests": len(records), "failed": len(records) - len(ok),
            "errors": sorted({r["error"] for r in records if not r["ok"]})[:5], "seconds": seconds,
            "requests_per_s": len(ok) / seconds, "tokens_per_s": sum(r["tokens"] for r in ok) / seconds,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "per_token_p50": pct(per_token, 50), "per_token_p99": pct(per_token, 99)}


def print_row(row: dict, one_client: float | None):
    ms = lambda v: "-" if v is None else f"{1e3 * v:,.0f}"  # noqa: E731
    ratio = "" if one_client is None else f"{row['tokens_per_s'] / one_client:.2f}x"
    print(f"{row['clients']:>7} {row['requests']:>8} {row['failed']:>6} {row['requests_per_s']:>7.2f} "
          f"{row['tokens_per_s']:>9,.1f} {ratio:>6} {ms(row['ttft_p50']):>9} {ms(row['ttft_p99']):>9} "
          f"{ms(row['per_token_p50']):>9} {ms(row['per_token_p99']):>9}", flush=True)
    for error in row["errors"]:
        print(f"        failed: {error}")


async def warm_up(url: str, prompt: list[int], max_tokens: int):
    async with httpx.AsyncClient(timeout=600.0) as client:
        await one_request(client, url, prompt, max_tokens)


def bench_checkpoint(name: str, ckpt: Path, tmp: Path, args) -> dict:
    from llm.formats.load import load_tokenizer, model_config

    config, tokenizer = model_config(ckpt), load_tokenizer(ckpt)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, tokenizer.vocab_size, (64, args.prompt_tokens)).tolist()
    prompt_file = tmp / f"{Path(name).name}.prompt"
    prompt_file.write_text(tokenizer.decode(prompts[0]))
    alone = sample_rate(ckpt, prompt_file, args)
    print(f"{name}: {config.n_layer} layers, d_model {config.d_model}, vocab {config.vocab_size} (tokenizer "
          f"{tokenizer.vocab_size}), context {config.block_size}; server --max_batch {args.max_batch}"
          f"{''.join(' ' + o for o in decode_options(args))}; prompts {args.prompt_tokens} tokens, "
          f"{args.max_tokens} generated, greedy")
    print(f"sample.py alone: {alone:,.1f} tokens/s")
    print(f"{'clients':>7} {'requests':>8} {'failed':>6} {'req/s':>7} {'tokens/s':>9} {'vs 1':>6} "
          f"{'TTFT p50':>9} {'p99 (ms)':>9} {'token p50':>9} {'p99 (ms)':>9}")
    proc, url = start_server(ckpt, tmp / f"{Path(name).name}.log", args)
    rows = []
    try:
        asyncio.run(warm_up(url, prompts[-1], args.max_tokens))
        for clients in args.clients:
            rows.append(asyncio.run(run_clients(url, clients, prompts, args)))
            one = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), None)
            print_row(rows[-1], one)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    print(f"server exit status after SIGTERM: {status}\n")
    return {"name": name, "sample_tokens_per_s": alone, "rows": rows, "server_exit_status": status}


def bench_serve(argv):
    args = parse(argv)
    context = args.prompt_tokens + args.max_tokens
    print(f"{machine()}\n")
    results = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "json"}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in [args.ckpt] if args.ckpt else args.config.split(","):
            ckpt = Path(args.ckpt) if args.ckpt else random_checkpoint(name, tmp, context)
            results["runs"].append(bench_checkpoint(name, ckpt, tmp, args))
    if args.json:
        write_json(args.json, results)
        print(f"results written to {args.json}")
