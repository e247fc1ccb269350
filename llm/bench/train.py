"""python -m llm.bench train: training tokens/s of train.py, side by side with nanoGPT's own train.py.

    python -m llm.bench train [--config default] [--steps 30] [--repeats 3] [--json PATH] [--key=value ...]
    python -m llm.bench train --peer nanogpt --nanogpt ~/nanoGPT --vocab_size 8192 --n_layer 4 --n_head 4 \
        --n_kv_head 4 --d_model 256 --batch_size 8 --norm layernorm --ffn gelu --pos_embedding learned \
        --bias false --dtype float32 --steps 40 --repeats 5        # nanoGPT's own architecture

Ours is train.py's loop itself (data windows, logging, the non-finite check: everything a step
does), in this process. The peer is karpathy/nanoGPT's train.py, run from a checkout given with
--nanogpt (never copied here), in a child process on the same token files, at the same shapes and
settings (its architecture: LayerNorm, GELU MLP, learned positions). Runs alternate, ours then
the peer, `repeats` times, so that drifts in machine speed hit both alike; both measure the
second half of their steps, and the medians are compared.
"""
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from llm.bench import machine
from llm.formats.run_dir import latest
from llm.config import flatten, parse_args, resolve
from llm.train.data import open_corpus, prepare_tokens
from llm.files import write_json
from llm.errors import ArgumentParser, UserError
from llm.model.tokenizer import Tokenizer


def ours(name, overrides: dict, steps: int, token_dir: list) -> dict:
    """Train `steps` steps with train.py's loop; tokens/s (and MFU) of the second half."""
    from llm.train.launch import configure
    from llm.train.trainer import train

    with tempfile.TemporaryDirectory() as out:
        settings = {**overrides, "out_dir": out, "max_steps": steps, "log_interval": steps // 2,
                    "eval_interval": 10**9, "eval_iters": 1, "ckpt_interval": 10**9}
        run, resume = configure(name, settings)
        train(run, resume)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if "tokens_per_s" in r][-1]
        tokenizer = Tokenizer.from_file(latest(Path(out)) / "tokenizer.json")  # the run's, to find its token files
        cache = Path(run.runtime.cache_dir).expanduser()
        token_dir.append(prepare_tokens(open_corpus(run.train.data), tokenizer, cache, run.train.val_fraction))
    return {"tokens_per_s": last["tokens_per_s"], "mfu": last.get("mfu"), "run": run}


def nanogpt(checkout: Path, run, steps: int, token_dir: Path, work: Path) -> float:
    """nanoGPT's train.py at the same shapes and settings, on the same training tokens: tokens/s
    over the second half of its steps, from the per-iteration times it prints."""
    for name in ("train.py", "model.py", "configurator.py"):
        if not (checkout / name).is_file():
            raise UserError(f"--nanogpt {checkout} is not a nanoGPT checkout (no {name})")
        target = work / name
        if not target.exists():
            target.symlink_to((checkout / name).resolve())
    data = work / "data" / "bench"
    if not data.exists():
        data.mkdir(parents=True)
        tokens = read_stream(token_dir)
        if tokens.dtype != np.uint16:
            raise UserError("nanoGPT reads uint16 token files: use a vocabulary of at most 65,536 tokens")
        tokens.tofile(data / "train.bin")
        tokens[: 10 * (run.model.block_size + 1)].tofile(data / "val.bin")
        with open(data / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": run.model.vocab_size}, f)
    m, t, rt = run.model, run.train, run.runtime
    device = "cuda" if rt.device == "auto" and _cuda() else rt.device.replace("auto", "cpu")
    dtype = {"auto": "bfloat16" if device.startswith("cuda") else "float32"}.get(rt.dtype, rt.dtype)
    settings = dict(dataset="bench", out_dir=str(work / "out"), n_layer=m.n_layer, n_head=m.n_head, n_embd=m.d_model,
                    block_size=m.block_size, bias=m.bias, dropout=t.dropout, batch_size=t.batch_size,
                    gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, weight_decay=t.weight_decay,
                    beta1=t.beta1, beta2=t.beta2, grad_clip=t.grad_clip, warmup_iters=t.warmup_steps,
                    lr_decay_iters=t.decay_steps or t.max_steps, min_lr=t.lr * t.min_lr_ratio, max_iters=steps,
                    eval_interval=10**9, eval_iters=1, log_interval=1, always_save_checkpoint=False,
                    compile=rt.compile, device=device, dtype=dtype, wandb_log=False)
    argv = [f"--{k}={v}" for k, v in settings.items()]
    result = subprocess.run([sys.executable, "train.py", *argv], cwd=work, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ""})
    times = [float(ms) for it, ms in re.findall(r"iter (\d+): loss [\d.naninf]+, time ([\d.]+)ms", result.stdout)
             if int(it) >= steps // 2]
    if result.returncode != 0 or not times:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"nanoGPT's train.py failed: {tail[0]}")
    return t.batch_size * m.block_size * t.grad_accum / (statistics.mean(times) / 1e3)


def read_stream(token_dir: Path) -> np.ndarray:
    """The training tokens of a prepared corpus, as one array."""
    meta = json.loads((token_dir / "meta.json").read_text())
    name = "tokens.bin" if meta["split"] == "tokens" else "train.bin"
    return np.fromfile(token_dir / name, dtype=meta["dtype"])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bench_train(argv):
    extra = ArgumentParser(prog="python -m llm.bench train", description=__doc__.split("\n\n")[0],
                           epilog="Any train.py setting is accepted too: --config NAME and --key=value "
                                  "(python train.py --help lists them).")
    extra.add_argument("--steps", type=int, default=30, help="steps per run; the second half is timed (default 30)")
    extra.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating (default 1)")
    extra.add_argument("--peer", choices=["none", "nanogpt"], default="none", help="what to run beside ours")
    extra.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT (for --peer nanogpt)")
    extra.add_argument("--json", type=Path, help="also write the figures here as JSON")
    known, rest = extra.parse_known_args(argv)
    name, overrides = parse_args(rest, "python -m llm.bench train: training tokens/s")
    if known.steps < 4 or known.repeats < 1:
        raise UserError("--steps must be at least 4 and --repeats at least 1")
    if known.peer == "nanogpt" and known.nanogpt is None:
        raise UserError("--peer nanogpt needs --nanogpt DIR, a checkout of https://github.com/karpathy/nanoGPT")
    name = name or "default"
    if known.peer == "nanogpt" and resolve(name, overrides).train.optimizer != "adamw":
        raise UserError("nanoGPT trains with AdamW: compare at --optimizer adamw")
    mine, peer, token_dirs = [], [], []
    with tempfile.TemporaryDirectory() as work:
        for i in range(known.repeats):
            result = ours(name, overrides, known.steps, token_dirs)
            mine.append(result)
            print(f"ours:    {result['tokens_per_s']:10,.0f} tokens/s", flush=True)
            if known.peer == "nanogpt":
                peer.append(nanogpt(known.nanogpt, result["run"], known.steps, Path(token_dirs[-1]), Path(work)))
                print(f"nanoGPT: {peer[-1]:10,.0f} tokens/s", flush=True)
    run = mine[0]["run"]
    speed = statistics.median(r["tokens_per_s"] for r in mine)
    mfu = mine[0]["mfu"]
    summary = {"device": machine(), "config": flatten(run), "steps": known.steps, "repeats": known.repeats,
               "tokens_per_s": speed, "runs": [r["tokens_per_s"] for r in mine], "mfu": mfu, "peer": known.peer}
    print(f"\n{run.train.max_steps} steps of {run.train.batch_size} x {run.model.block_size} tokens x "
          f"{run.train.grad_accum} accumulation on {machine()}")
    print(f"train.py: {speed:,.0f} tokens/s (median of {known.repeats})" + (f", MFU {mfu:.1%}" if mfu else ""))
    if peer:
        summary.update(peer_tokens_per_s=statistics.median(peer), peer_runs=peer,
                       ratio=statistics.median(a["tokens_per_s"] / b for a, b in zip(mine, peer)))
        pairs = ", ".join(f"{a['tokens_per_s'] / b:.2f}" for a, b in zip(mine, peer))
        print(f"nanoGPT's train.py: {summary['peer_tokens_per_s']:,.0f} tokens/s; ratio {summary['ratio']:.2f}x "
              f"(median of the per-pair ratios {pairs})")
    if known.json:
        write_json(known.json, summary)
