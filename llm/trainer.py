"""Pretraining: settings -> data -> model -> optimizer -> loop, on one device or under torchrun.

One loop serves every setup: without torchrun there is no process group and the
distributed helpers do nothing; under torchrun the model is sharded with FSDP2.
"""
import math
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from llm import checkpoint
from llm.config import FIELDS, RunConfig, TrainConfig, describe, flatten, resolve
from llm.data import check_length, eval_windows, open_corpus, prepare_tokens, train_or_load_tokenizer, train_windows
from llm.distributed import Dist, any_rank, barrier, parallelize, setup, sum_across_ranks, teardown
from llm.errors import UserError
from llm.metrics import MetricsLog, flops_per_token, peak_flops
from llm.model import Transformer
from llm.tokenizer import Tokenizer

# Model settings that change how the model runs, not its weights: a resumed or
# initialized run may change them.
RUNTIME_MODEL_FIELDS = {"attention", "dropout"}
RUN_FILES = ("checkpoint", "config.json", "model.safetensors", "tokenizer.json", "run.json", "metrics.jsonl", "loss.png")


def configure(name: str | None, overrides: dict) -> RunConfig:
    """Resolve the run's settings; --resume and --init_from take the architecture from their checkpoint."""
    if overrides.get("resume"):
        if name is not None:
            raise UserError("--resume continues with the run's saved settings: drop --config (override fields with --key=value)")
        out_dir = Path(overrides.get("out_dir", TrainConfig.out_dir)).expanduser()
        saved, _, _ = checkpoint.resume_state(out_dir)
        check_architecture_kept(overrides, flatten(saved), "--resume")
        return resolve(None, {**overrides, "out_dir": str(out_dir)}, base=flatten(saved))
    run = resolve(name, overrides)
    if run.train.init_from:
        source = Path(run.train.init_from).expanduser()
        saved = checkpoint.read_json(source / "config.json")
        check_architecture_kept(overrides, saved, "--init_from")
        runtime = {k: v for k, v in flatten(run).items() if k in RUNTIME_MODEL_FIELDS}
        run = resolve(None, {**flatten(run), **saved, **runtime})
    return run


def check_architecture_kept(overrides: dict, saved: dict, flag: str):
    for key, value in overrides.items():
        if FIELDS[key][0] == "model" and key not in RUNTIME_MODEL_FIELDS and value != saved.get(key):
            raise UserError(f"{flag} keeps the checkpoint's architecture: cannot change {key} ({saved.get(key)} -> {value})")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to lr·min_lr_ratio at decay_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices and embeddings only (not on norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=not fused)


class Batches:
    """Training and validation windows, moved to the device."""

    def __init__(self, train_tokens, val_tokens, run: RunConfig, d: Dist):
        self.train_tokens, self.cfg, self.d = train_tokens, run.train, d
        self.block_size = run.model.block_size
        check_length(train_tokens, self.block_size, "training")
        check_length(val_tokens, self.block_size, "validation")
        # The fixed validation windows, shared out among the ranks. Every rank gets as many
        # rows (so all run the same forward passes); padding rows have no targets.
        windows = eval_windows(val_tokens, self.block_size, self.cfg.eval_iters * self.cfg.batch_size)
        mine = windows[d.rank :: d.world_size]
        rows = math.ceil(len(windows) / d.world_size)
        w = self.to_device(np.concatenate([mine, windows[: rows - len(mine)]]))
        self.val_x, self.val_y = w[:, :-1], w[:, 1:].clone()
        self.val_y[len(mine):] = -1

    def to_device(self, windows: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(windows.astype(np.int64))
        if self.d.device.type == "cuda":
            return t.pin_memory().to(self.d.device, non_blocking=True)
        return t

    def train(self, step: int, micro: int):
        # The global micro-batch index: K processes × A accumulation steps read the same
        # windows as one process with K·A accumulation steps.
        index = self.d.rank * self.cfg.grad_accum + micro
        w = self.to_device(train_windows(self.train_tokens, self.block_size, self.cfg.batch_size, self.cfg.seed, step, index))
        return w[:, :-1], w[:, 1:]

    def validation(self):
        for i in range(0, len(self.val_x), self.cfg.batch_size):
            yield self.val_x[i : i + self.cfg.batch_size], self.val_y[i : i + self.cfg.batch_size]


@torch.no_grad()
def evaluate(model, batches: Batches, autocast, d: Dist) -> float:
    model.eval()
    total = torch.zeros(2, device=d.device, dtype=torch.float64)
    for x, y in batches.validation():
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum")
        total += torch.stack([loss.double(), (y >= 0).sum().double()])
    model.train()
    total = sum_across_ranks(total, d)
    return (total[0] / total[1]).item()


def prepare_run_dir(cfg: TrainConfig, d: Dist) -> Path:
    out = Path(cfg.out_dir).expanduser()
    if d.is_main:
        if out.exists() and not out.is_dir():
            raise UserError(f"out_dir {out} exists and is not a directory")
        if not cfg.resume and out.is_dir() and checkpoint.holds_run(out):
            if not cfg.overwrite:
                raise UserError(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
            for name in RUN_FILES:
                path = out / name
                if path.is_symlink() or path.is_file():
                    path.unlink()
            for path in list(out.glob("ckpt-*")) + list(out.glob(".tmp-ckpt-*")):
                shutil.rmtree(path)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write-test").touch()
            (out / ".write-test").unlink()
        except OSError as e:
            raise UserError(f"cannot write to out_dir {out}: {e.strerror}")
    barrier(d)
    return out


def load_tokenizer_and_data(run: RunConfig, d: Dist, ckpt: Path | None):
    """The run's tokenizer (from the checkpoint, a file, or trained) and its token files.

    Under torchrun the first process of each node builds the caches while the others
    wait; if it fails, the others stop too instead of waiting forever.
    """
    cfg = run.train
    cache_dir = Path(cfg.cache_dir).expanduser()
    corpus = open_corpus(cfg.data)  # cheap checks, on every process
    source = ckpt / "tokenizer.json" if ckpt is not None else Path(cfg.tokenizer).expanduser() if cfg.tokenizer else None
    tokenizer = Tokenizer.from_file(source) if source is not None else None

    def build():
        tok = tokenizer or train_or_load_tokenizer(corpus, run.model.vocab_size, cache_dir, cfg.tokenizer_train_bytes)
        return tok, prepare_tokens(corpus, tok, cache_dir, cfg.val_fraction)

    error = None
    if d.local_rank == 0:
        try:
            result = build()
        except UserError as e:
            error = e
    if any_rank(error is not None, d):
        raise error or UserError("another process failed while preparing the data (its error is above)")
    return result if d.local_rank == 0 else build()


class StopSignal:
    """Once armed (when training starts), SIGINT/SIGTERM ask the loop to checkpoint and stop
    after the current step; a second SIGINT aborts at once. Before that, Ctrl-C simply stops.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum, self.previous = None, []
        return self

    def arm(self):
        self.previous = [signal.signal(s, self.handle) for s in self.SIGNALS]

    def __exit__(self, *exc):
        for s, handler in zip(self.SIGNALS, self.previous):
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


def train_step(model, train_model, optimizer, batches, step, lr, autocast, loss_sum, cfg, d) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches. Adds the step's loss to loss_sum on the
    device (no host synchronization) and returns the gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    for micro in range(cfg.grad_accum):
        torch.manual_seed(hash((cfg.seed, step, d.rank * cfg.grad_accum + micro)) & 0xFFFF_FFFF)  # dropout
        x, y = batches.train(step, micro)
        if d.enabled:  # reduce-scatter gradients only after the last micro-step
            model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
        with autocast:
            loss = train_model(x, y, label_smoothing=cfg.label_smoothing) / cfg.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train(run: RunConfig) -> int:
    """Train to max_steps; returns the process exit status (128 + signal number if interrupted)."""
    d = setup(run.train.device)
    try:
        with StopSignal() as stop:
            return _train(run, d, stop)
    finally:
        teardown()


def _train(run: RunConfig, d: Dist, stop: StopSignal) -> int:
    cfg = run.train
    out = prepare_run_dir(cfg, d)
    ckpt, start_step, tokens_seen = None, 0, 0
    if cfg.resume:
        _, state, ckpt = checkpoint.resume_state(out)
        start_step, tokens_seen = state["step"], state["tokens_seen"]
    elif cfg.init_from:
        ckpt = Path(cfg.init_from).expanduser()
    tokenizer, splits = load_tokenizer_and_data(run, d, ckpt)
    if ckpt is None and tokenizer.vocab_size != run.model.vocab_size:
        run = replace(run, model=replace(run.model, vocab_size=tokenizer.vocab_size))
    if tokenizer.vocab_size > run.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {run.model.vocab_size}")
    batches = Batches(splits.train, splits.val, run, d)

    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = checkpoint.build_model(run.model, checkpoint.read_safetensors(ckpt / "model.safetensors"), "model.safetensors")
    else:
        model = Transformer(run.model)
    n_params = model.num_params()
    flops = flops_per_token(model)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and d.device.type == "cuda") else torch.float32
    model.to(d.device)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    parallelize(model, d, dtype if dtype != torch.float32 else None, cfg.activation_checkpointing)
    optimizer = make_optimizer(model, cfg, d.device)
    if cfg.resume:
        checkpoint.load_training_state(ckpt, model, optimizer)
    train_model = torch.compile(model) if cfg.compile else model
    # Without FSDP, mixed precision is autocast; FSDP casts parameters itself.
    use_autocast = dtype != torch.float32 and not d.enabled
    autocast = torch.autocast(d.device.type, dtype=dtype) if use_autocast else nullcontext()

    tokens_per_step = cfg.batch_size * run.model.block_size * cfg.grad_accum * d.world_size
    metrics = MetricsLog(out, d.is_main, start_step if cfg.resume else None,
                         dict(project=cfg.wandb_project, name=cfg.wandb_run_name, config=flatten(run), dir=str(out))
                         if cfg.wandb else None)
    if d.is_main:
        print(describe(run))
        print(f"parameters: {n_params:,} | device: {d.device} x {d.world_size} | dtype: {dtype} | "
              f"global batch: {cfg.batch_size} x {cfg.grad_accum} accumulation x {d.world_size} processes "
              f"= {tokens_per_step:,} tokens/step")
        print(f"data: {splits.meta['corpus']}: {len(splits.train):,} training, {len(splits.val):,} validation tokens")
        checkpoint.write_json(out / "run.json", run.to_dict())

    def save(step):
        checkpoint.save(out, step, model, optimizer, tokenizer, run, d, tokens_seen)

    peak = peak_flops(d.device) if dtype == torch.bfloat16 else None
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="training", disable=not d.is_main, dynamic_ncols=True)
    loss_sum = torch.zeros((), device=d.device)
    window_start, window_steps = time.perf_counter(), 0
    step = start_step
    stop.arm()
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        grad_norm = train_step(model, train_model, optimizer, batches, step, lr, autocast, loss_sum, cfg, d)
        step += 1
        tokens_seen += tokens_per_step
        window_steps += 1
        bar.update(1)

        last = step == cfg.max_steps
        if step % cfg.log_interval == 0 or last:  # the only per-step host synchronization
            loss_value = (sum_across_ranks(loss_sum / window_steps, d) / d.world_size).item()
            elapsed = time.perf_counter() - window_start
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                      "tokens": tokens_seen, "tokens_per_s": window_steps * tokens_per_step / elapsed}
            if peak:
                record["mfu"] = record["tokens_per_s"] * flops / (peak * d.world_size)
            metrics.log(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}")
            loss_sum.zero_()
            window_start, window_steps = time.perf_counter(), 0
        if step % cfg.eval_interval == 0 or last:
            val_loss = evaluate(train_model, batches, autocast, d)
            metrics.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
            metrics.plot()
            if d.is_main:
                bar.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
            window_start = time.perf_counter()  # keep evaluation out of tokens/s
        interrupted = any_rank(stop.signum is not None, d)
        if step % cfg.ckpt_interval == 0 or last or interrupted:
            save(step)
            window_start = time.perf_counter()
        if interrupted:
            break
    bar.close()
    metrics.close()
    if step < cfg.max_steps:
        if d.is_main:
            print(f"stopped at step {step}; checkpoint saved in {out}. Continue with: python train.py --out_dir {out} --resume",
                  file=sys.stderr)
        return 128 + (stop.signum or signal.SIGTERM)  # under torchrun another rank may have caught it
    if d.is_main:
        print(f"done: {step} steps, checkpoint in {out}")
    return 0
