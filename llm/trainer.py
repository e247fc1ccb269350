"""Pretraining: settings -> data -> model -> optimizer -> loop, on one device or under torchrun.

One loop serves every setup: without torchrun there is no process group and the
distributed helpers do nothing; under torchrun the model is sharded with FSDP2.
How a command becomes a run (new, resumed, initialized, replacing another) is llm/launch.py.
"""
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from llm import checkpoint, launch
from llm.config import RunConfig, describe, flatten
from llm.data import eval_windows, open_corpus, prepare_tokens, split_tokens, train_or_load_tokenizer, train_windows
from llm.distributed import Dist, any_rank, barrier, parallelize, setup, sum_across_ranks, teardown
from llm.errors import UserError
from llm.eval import bits_per_byte, target_bytes
from llm.metrics import MetricsLog, flops_per_token, peak_flops
from llm.model import Transformer
from llm.optim import lr_multiplier, make_optimizers, set_hyperparameters
from llm.device import bf16_speedup, keep_freed_memory, training_dtype
from llm.tokenizer import Tokenizer


class Batches:
    """Training and validation windows, moved to the device."""

    def __init__(self, train_tokens, val_tokens, run: RunConfig, d: Dist, tokenizer: Tokenizer):
        self.train_tokens, self.cfg, self.d = train_tokens, run.train, d
        self.block_size = run.model.block_size
        # The fixed validation windows, shared out among the ranks. Every rank gets as many
        # rows (so all run the same forward passes); padding rows have no targets.
        windows = eval_windows(val_tokens, self.block_size, self.cfg.eval_iters * self.cfg.batch_size)
        self.val_bytes = target_bytes(tokenizer, windows)  # of all ranks' windows together
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
def evaluate(model, batches: Batches, autocast, d: Dist) -> dict:
    """Loss (nats per token), perplexity and bits per UTF-8 byte on the fixed validation windows."""
    model.eval()
    total = torch.zeros(2, device=d.device, dtype=torch.float64)
    for x, y in batches.validation():
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum")
        total += torch.stack([loss.double(), (y >= 0).sum().double()])
    model.train()
    nats, tokens = sum_across_ranks(total, d).tolist()
    loss = nats / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": bits_per_byte(nats, batches.val_bytes)}


def load_tokenizer_and_data(run: RunConfig, d: Dist, ckpt: Path | None) -> tuple[Tokenizer, Path]:
    """The run's tokenizer (from the checkpoint, a file, or trained) and its prepared token folder.

    Under torchrun the first process of each node builds the caches while the others
    wait; if it fails, the others stop too instead of waiting forever.
    """
    cfg = run.train
    cache_dir = Path(run.runtime.cache_dir).expanduser()
    corpus = open_corpus(cfg.data)  # cheap checks, on every process
    source = ckpt if ckpt is not None else Path(cfg.tokenizer).expanduser() if cfg.tokenizer else None
    tokenizer = Tokenizer.from_file(source) if source is not None else None

    def build():
        tok = tokenizer or train_or_load_tokenizer(corpus, run.model.vocab_size, cache_dir, cfg.tokenizer_train_bytes)
        if tok.vocab_size > run.model.vocab_size:
            raise UserError(f"the tokenizer has {tok.vocab_size} tokens but vocab_size is {run.model.vocab_size}: "
                            f"pass --vocab_size {tok.vocab_size} (or more)")
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


class Stopwatch:
    """Seconds of training, with evaluation and checkpointing left out (pause ... resume)."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.started = seconds, time.perf_counter()

    def pause(self):
        self.seconds += time.perf_counter() - self.started
        self.started = None

    def resume(self):
        self.started = time.perf_counter()

    def read(self) -> float:
        return self.seconds + (time.perf_counter() - self.started if self.started is not None else 0.0)


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


def train_step(model, train_model, optimizers, batches, step, autocast, loss_sum, cfg, d) -> tuple[torch.Tensor, bool]:
    """One optimizer step over grad_accum micro-batches. Adds the step's loss to loss_sum on the
    device and returns the gradient norm before clipping, and whether the update was taken: a
    non-finite loss or gradient norm (on any rank) skips it, so NaNs never reach the weights."""
    step_loss = torch.zeros((), device=d.device)
    for micro in range(cfg.grad_accum):
        torch.manual_seed(hash((cfg.seed, step, d.rank * cfg.grad_accum + micro)) & 0xFFFF_FFFF)  # dropout
        x, y = batches.train(step, micro)
        if d.enabled:  # reduce-scatter gradients only after the last micro-step
            model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
        with autocast:
            loss = train_model(x, y, label_smoothing=cfg.label_smoothing) / cfg.grad_accum
        loss.backward()
        step_loss += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    bad = sum_across_ranks((~torch.isfinite(step_loss) | ~torch.isfinite(grad_norm)).float(), d)
    ok = bad.item() == 0  # one scalar to the host per step: the price of never stepping on NaN
    for optimizer in optimizers:
        if ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if ok:
        loss_sum += step_loss
    return grad_norm, ok


def choose_dtype(setting: str, saved: str | None, model, batch_size: int, block_size: int, d: Dist) -> torch.dtype:
    """--dtype, with `auto` decided once per run (llm/device.py): a resumed run keeps the dtype it
    trained in. Where `auto` measures, every rank uses the mean of their measurements."""
    if setting == "auto" and saved is not None:
        return getattr(torch, saved)
    measured = []

    def probe() -> float:
        speedup = sum_across_ranks(torch.tensor([bf16_speedup(model, min(batch_size, 4), block_size)]), d)
        measured.append(speedup.item() / d.world_size)
        return measured[0]

    dtype = training_dtype(setting, d.device, probe=probe)
    if measured and d.is_main:
        print(f"dtype auto: a forward and backward ran {measured[0]:.2f}x as fast in bfloat16 as in float32 "
              f"here, so {str(dtype).removeprefix('torch.')}")
    return dtype


def train(run: RunConfig) -> int:
    """Train to max_steps; returns the process exit status (128 + signal number if interrupted)."""
    keep_freed_memory()
    d = setup(run.runtime.device)
    try:
        with StopSignal() as stop:
            status = _train(run, d, stop)
        barrier(d)  # no process tears the group down while another still talks to it
        return status
    finally:
        teardown()


def _train(run: RunConfig, d: Dist, stop: StopSignal) -> int:
    cfg, rt = run.train, run.runtime
    out = launch.check_out_dir(run) if d.is_main else Path(run.launch.out_dir).expanduser()
    ckpt, trainer_state = None, {"step": 0, "tokens_seen": 0}
    if run.launch.resume == "true":
        _, trainer_state, ckpt = checkpoint.resume_state(out)
    tokenizer, token_dir = load_tokenizer_and_data(run, d, ckpt or (Path(run.launch.init_from).expanduser()
                                                                    if run.launch.init_from else None))
    splits = split_tokens(token_dir, run.model.block_size)
    batches = Batches(splits.train, splits.val, run, d, tokenizer)

    torch.manual_seed(cfg.seed)
    if run.launch.init_from and ckpt is None:
        source, _ = checkpoint.load(Path(run.launch.init_from).expanduser(), dtype=torch.float32)
        model = Transformer(run.model, rt.attention, cfg.dropout)
        model.load_state_dict(source.state_dict())
        del source
    else:
        model = Transformer(run.model, rt.attention, cfg.dropout)
    n_params = model.num_params()
    flops = flops_per_token(model)
    model.to(d.device)
    dtype = choose_dtype(rt.dtype, trainer_state.get("dtype"), model, cfg.batch_size, run.model.block_size, d)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    parallelize(model, d, dtype if dtype != torch.float32 else None, rt.activation_checkpointing)
    optimizers = make_optimizers(model, cfg, d.device, dtype)
    if ckpt is not None:
        checkpoint.load_training_state(ckpt, model, optimizers)
    train_model = torch.compile(model) if rt.compile else model
    # Without FSDP, mixed precision is autocast; FSDP casts parameters itself.
    use_autocast = dtype != torch.float32 and not d.enabled
    autocast = torch.autocast(d.device.type, dtype=dtype) if use_autocast else nullcontext()

    # Everything is ready: only now may an old run make way (--overwrite).
    if d.is_main and run.launch.overwrite:
        launch.set_aside_old_run(out)
    start_step, tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
    tokens_per_step = cfg.batch_size * run.model.block_size * cfg.grad_accum * d.world_size
    metrics = MetricsLog(out, d.is_main, start_step if ckpt is not None else None,
                         dict(project=rt.wandb_project, name=rt.wandb_run_name, config=flatten(run), dir=str(out),
                              id=trainer_state.get("wandb_id"), resume="allow") if rt.wandb else None)
    if d.is_main:
        print(describe(run))
        if ckpt is not None:
            print(f"resuming from {ckpt} at step {start_step}")
        print(f"parameters: {n_params:,} | device: {d.device} x {d.world_size} | dtype: {dtype} | "
              f"global batch: {cfg.batch_size} x {cfg.grad_accum} accumulation x {d.world_size} processes "
              f"= {tokens_per_step:,} tokens/step")
        print(f"data: {splits.meta['corpus']}: {len(splits.train):,} training, {len(splits.val):,} validation tokens "
              f"(validation: {splits.how})")
        checkpoint.write_json(out / "run.json", {**run.to_dict(), "init_from": run.launch.init_from})

    def save(step):
        state = {"tokens_seen": tokens_seen, "skipped_steps": skipped, "train_seconds": clock.read(),
                 "wandb_id": metrics.wandb_id, "dtype": str(dtype).removeprefix("torch.")}
        checkpoint.save(out, step, model, optimizers, tokenizer, run, d, state)
        if d.is_main:
            launch.drop_old_runs(out)

    peak = peak_flops(d.device) if dtype == torch.bfloat16 else None
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="training", disable=not d.is_main, dynamic_ncols=True)
    loss_sum = torch.zeros((), device=d.device)
    skipped, bad_in_a_row = trainer_state.get("skipped_steps", 0), 0
    clock = Stopwatch(trainer_state.get("train_seconds", 0.0))
    window_mark, window_steps, window_ok = clock.read(), 0, 0
    step = start_step
    stop.arm()
    while step < cfg.max_steps:
        multiplier = lr_multiplier(step, cfg)
        lr = cfg.lr * multiplier
        set_hyperparameters(optimizers, cfg, multiplier)
        grad_norm, ok = train_step(model, train_model, optimizers, batches, step, autocast, loss_sum, cfg, d)
        step += 1
        tokens_seen += tokens_per_step
        window_steps += 1
        window_ok += ok
        skipped += not ok
        bad_in_a_row = 0 if ok else bad_in_a_row + 1
        bar.update(1)
        if bad_in_a_row >= cfg.max_bad_steps:
            bar.close()
            metrics.log({"step": step, "skipped_steps": skipped})
            metrics.close()
            last = checkpoint.latest(out)
            raise UserError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient norm (up to step {step}); "
                            f"stopped without saving, the last checkpoint ({last.name if last else 'none'}) is untouched: "
                            "lower lr, check the data, or raise max_bad_steps")

        last = step == cfg.max_steps
        if step % rt.log_interval == 0 or last:  # the loss stays on the device until here
            loss_value = (sum_across_ranks(loss_sum / max(window_ok, 1), d) / d.world_size).item()
            now = clock.read()
            record = {"step": step, "loss": loss_value if window_ok else None, "lr": lr,
                      "grad_norm": grad_norm.item(), "tokens": tokens_seen, "train_seconds": now,
                      "tokens_per_s": window_steps * tokens_per_step / (now - window_mark), "skipped_steps": skipped}
            if peak:
                record["mfu"] = record["tokens_per_s"] * flops / (peak * d.world_size)
            metrics.log(record)
            bar.set_postfix(loss=f"{loss_value:.3f}" if window_ok else "-", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}",
                            **({"skipped": skipped} if skipped else {}))
            loss_sum.zero_()
            window_mark, window_steps, window_ok = now, 0, 0
        clock.pause()  # evaluation and checkpoints are not training time
        if step % cfg.eval_interval == 0 or last:
            val = evaluate(train_model, batches, autocast, d)
            metrics.log({"step": step, **val, "tokens": tokens_seen, "train_seconds": clock.read()})
            metrics.plot()
            if d.is_main:
                bar.write(f"step {step}: validation loss {val['val_loss']:.4f}, perplexity {val['val_ppl']:.2f}, "
                          f"{val['val_bpb']:.4f} bits per byte")
        interrupted = any_rank(stop.signum is not None, d)
        if step % rt.ckpt_interval == 0 or last or interrupted:
            save(step)
        clock.resume()
        if interrupted:
            break
    bar.close()
    metrics.close()
    if step < cfg.max_steps:
        if d.is_main:
            print(f"stopped at step {step}; checkpoint saved in {out}. Continue with the same command and --resume "
                  f"(or: python train.py --out_dir {out} --resume)", file=sys.stderr)
        return 128 + (stop.signum or signal.SIGTERM)  # under torchrun another rank may have caught it
    if d.is_main:
        print(f"done: {step} steps, checkpoint in {out}" + (f" ({skipped} steps skipped: non-finite)" if skipped else ""))
    return 0
