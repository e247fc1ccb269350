"""The training loop around a prepared run (llm/train/prepare.py).

    train(config, resume)   one process, or one torchrun worker: set up, prepare, loop, tear down
    loop(run, stop)         step, log, evaluate, checkpoint, stop
    train_step(run, step)   one optimizer step over grad_accum micro-batches

One loop serves every setup: without torchrun there is no process group and the distributed
helpers do nothing; under torchrun the model is sharded with FSDP2.
"""
import math
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from llm.config import RunConfig
from llm.errors import UserError
from llm.eval import bits_per_byte
from llm.formats.run_dir import latest
from llm.runtime import keep_freed_memory
from llm.train import checkpoint, out_dir
from llm.train.checkpoint import Resume
from llm.train.distributed import any_rank, barrier, setup, sum_across_ranks, teardown, total_across_ranks
from llm.train.optim import lr_multiplier, set_hyperparameters
from llm.train.prepare import PreparedRun, claim_out_dir, prepare


def train(config: RunConfig, resume: Resume | None = None) -> int:
    """Train to max_steps; returns the process exit status (128 + signal number if interrupted)."""
    keep_freed_memory()
    d = setup(config.runtime.device)
    try:
        with claim_out_dir(config, resume, d) as out, StopSignal() as stop:
            status = loop(prepare(config, resume, d, out), stop)
            barrier(d)  # no process tears the group down while another still talks to it
        return status
    finally:
        teardown()


def loop(run: PreparedRun, stop: "StopSignal") -> int:
    cfg, rt, progress, d = run.config.train, run.config.runtime, run.progress, run.d
    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="training", disable=not d.is_main, dynamic_ncols=True)
    clock = Stopwatch(progress.train_seconds)
    window = LogWindow(clock.read(), d.device)
    bad_in_a_row = 0
    stop.arm()
    while progress.step < cfg.max_steps:
        lr = cfg.lr * lr_multiplier(progress.step, cfg)
        set_hyperparameters(run.optimizers, cfg, lr / cfg.lr)
        loss, grad_norm, ok = train_step(run, progress.step)
        progress.step += 1
        progress.tokens_seen += run.tokens_per_step
        progress.skipped_steps += not ok
        window.add(loss, ok)
        bar.update(1)
        bad_in_a_row = 0 if ok else bad_in_a_row + 1
        if bad_in_a_row >= cfg.max_bad_steps:
            stop_on_non_finite(run, bad_in_a_row, bar)

        last = progress.step == cfg.max_steps
        if progress.step % rt.log_interval == 0 or last:
            log_training(run, window, lr, grad_norm, clock.read(), bar)
        clock.pause()  # evaluation and checkpoints are not training time
        if progress.step % cfg.eval_interval == 0 or last:
            log_validation(run, clock.read(), bar)
        interrupted = any_rank(stop.signum is not None, d)
        if progress.step % rt.ckpt_interval == 0 or last or interrupted:
            save(run, clock.read(), bar)
        clock.resume()
        if interrupted:
            break
    bar.close()
    run.metrics.close()
    return finish(run, stop)


def train_step(run: PreparedRun, step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step. Returns (the step's mean loss on this rank's share, on the device; the
    gradient norm before clipping; whether the update was taken). The loss is the sum over every
    target of the step (all micro-batches, all ranks) divided by their number, so any split of a
    global batch into processes and accumulation steps computes the same update. A non-finite loss
    or gradient norm (on any rank) skips the update, so NaNs never reach the weights."""
    cfg, d = run.config.train, run.d
    batches = [run.batches.train(step, micro) for micro in range(cfg.grad_accum)]
    # FSDP averages gradients over the ranks: each rank divides by its share of the targets.
    per_rank = max(total_across_ranks(sum(b.n_targets for b in batches), d), 1) / d.world_size
    step_loss = torch.zeros((), device=d.device)
    for micro, batch in enumerate(batches):
        torch.manual_seed(hash((cfg.seed, step, d.rank * cfg.grad_accum + micro)) & 0xFFFF_FFFF)  # dropout
        if d.enabled:  # reduce-scatter gradients only after the last micro-step
            run.model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
        with run.autocast:
            loss = run.step_model(batch.inputs, batch.targets, label_smoothing=cfg.label_smoothing,
                                  reduction="sum", **batch.model_inputs()) / per_rank
        loss.backward()
        step_loss += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or float("inf"))
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    bad = sum_across_ranks((~torch.isfinite(step_loss) | ~torch.isfinite(grad_norm)).float(), d)
    ok = bad.item() == 0  # one scalar to the host per step: the price of never stepping on NaN
    for optimizer in run.optimizers:
        if ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, ok


@torch.no_grad()
def evaluate(run: PreparedRun) -> dict:
    """Loss (nats per token), perplexity and bits per UTF-8 byte on the fixed validation windows."""
    model, d = run.step_model, run.d
    model.eval()
    total = torch.zeros(2, device=d.device, dtype=torch.float64)
    for batch in run.batches.validation():
        with run.autocast:
            logits = model(batch.inputs, **batch.model_inputs())
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=-1, reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(float(batch.n_targets), device=d.device, dtype=torch.float64)])
    model.train()
    nats, tokens = sum_across_ranks(total, d).tolist()
    loss = nats / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": bits_per_byte(nats, run.batches.val_bytes)}


class LogWindow:
    """The steps since the last log line: their summed loss (kept on the device), count, time."""

    def __init__(self, start: float, device):
        self.start, self.steps, self.ok = start, 0, 0
        self.loss_sum = torch.zeros((), device=device)

    def add(self, loss: torch.Tensor, ok: bool):
        self.steps += 1
        self.ok += ok
        if ok:
            self.loss_sum += loss

    def reset(self, now: float):
        self.start, self.steps, self.ok = now, 0, 0
        self.loss_sum.zero_()


def log_training(run: PreparedRun, window: LogWindow, lr: float, grad_norm: torch.Tensor, now: float, bar):
    d, p = run.d, run.progress
    loss = (sum_across_ranks(window.loss_sum / max(window.ok, 1), d) / d.world_size).item()
    record = {"step": p.step, "loss": loss if window.ok else None, "lr": lr, "grad_norm": grad_norm.item(),
              "tokens": p.tokens_seen, "train_seconds": now,
              "tokens_per_s": window.steps * run.tokens_per_step / (now - window.start), "skipped_steps": p.skipped_steps}
    if run.peak_flops:
        record["mfu"] = record["tokens_per_s"] * run.flops_per_token / (run.peak_flops * d.world_size)
    run.metrics.log(record)
    bar.set_postfix(loss=f"{loss:.3f}" if window.ok else "-", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}",
                    **({"skipped": p.skipped_steps} if p.skipped_steps else {}))
    window.reset(now)


def log_validation(run: PreparedRun, now: float, bar):
    val = evaluate(run)
    run.metrics.log({"step": run.progress.step, **val, "tokens": run.progress.tokens_seen, "train_seconds": now})
    run.metrics.plot()
    if run.d.is_main:
        bar.write(f"step {run.progress.step}: validation loss {val['val_loss']:.4f}, perplexity {val['val_ppl']:.2f}, "
                  f"{val['val_bpb']:.4f} bits per byte")


def save(run: PreparedRun, train_seconds: float, bar):
    run.progress.train_seconds = train_seconds
    run.progress.wandb_id = run.metrics.wandb_id
    try:
        checkpoint.save(run.out, run.progress, run.model, run.optimizers, run.tokenizer, run.config, run.d,
                        run.chat_template)
    except UserError:  # no room: the one line goes below the bar, not onto it
        bar.close()
        raise
    if run.d.is_main:
        out_dir.drop_old_runs(run.out)  # an old run set aside by --overwrite goes once this one has a checkpoint


def stop_on_non_finite(run: PreparedRun, in_a_row: int, bar):
    """Too many steps in a row were skipped: stop without saving (NaN weights are never saved)."""
    bar.close()
    run.metrics.log({"step": run.progress.step, "skipped_steps": run.progress.skipped_steps})
    run.metrics.close()
    last = latest(run.out)
    raise UserError(f"{in_a_row} steps in a row had a non-finite loss or gradient norm (up to step {run.progress.step}); "
                    f"stopped without saving, the last checkpoint ({last.name if last else 'none'}) is untouched: "
                    "lower lr, check the data, or raise max_bad_steps")


def finish(run: PreparedRun, stop: "StopSignal") -> int:
    p = run.progress
    if p.step < run.config.train.max_steps:
        if run.d.is_main:
            print(f"stopped at step {p.step}; checkpoint saved in {run.out}. Continue with the same command and --resume "
                  f"(or: python train.py --out_dir {run.out} --resume)", file=sys.stderr)
        return 128 + (stop.signum or signal.SIGTERM)  # under torchrun another rank may have caught it
    if run.d.is_main:
        skipped = f" ({p.skipped_steps} steps skipped: non-finite)" if p.skipped_steps else ""
        print(f"done: {p.step} steps, checkpoint in {run.out}{skipped}")
    return 0


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
    after the current step; a second SIGINT aborts at once. Before that, Ctrl-C simply stops."""

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
