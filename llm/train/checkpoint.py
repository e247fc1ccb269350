"""Writing checkpoints during training, and restoring a run's training state from one.

A checkpoint (the folder layout: llm/formats/run_dir.py) is written into a temporary folder
and renamed into place; older ones are deleted only after that, so a crash at any instant
leaves the previous checkpoint loadable. trainer.json is written last: its presence marks a
complete checkpoint. A fine-tuning run's checkpoint also holds its chat template
(chat_template.jinja: export and GGUF carry it) and, with LoRA, model.safetensors holds the
merged weights (a plain model for llm.load and export), adapter.safetensors the adapters alone,
and state/ the base weights and adapters apart, for an exact resume. A write that fails for want
of space (ENOSPC, EDQUOT, or EFBIG under a file-size limit) removes the half-written folder and
ends the run with one line (how much the checkpoint needs, and where). Data windows and dropout
masks are functions of (seed, step, micro-batch), so restoring the step restores the data
position and the random state.
"""
import errno
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llm.config import RunConfig
from llm.errors import UserError
from llm.files import NO_ROOM, read_json, sync_dir, write_json
from llm.formats.run_dir import checkpoints, latest, step_of
from llm.model.chat import ChatTemplate
from llm.model.lora import ADAPTER_FILE, lora_scale, merged, save_adapters
from llm.model.tokenizer import Tokenizer
from llm.train.distributed import Dist, any_rank, barrier

LINKED = ("config.json", "model.safetensors", "tokenizer.json")

# DCP warns that it assumes a single process when there is no process group: that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class Progress:
    """Where a run stands: saved as trainer.json with each checkpoint."""
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps whose loss or gradient was not finite
    train_seconds: float = 0.0  # training time, evaluation and checkpoints left out
    wandb_id: str | None = None
    dtype: str | None = None  # what `--dtype auto` chose: a resumed run keeps it

    @classmethod
    def read(cls, ckpt: Path) -> "Progress":
        saved = read_json(ckpt / "trainer.json")
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


@dataclass
class Resume:
    """The checkpoint a run continues from: read once, when the command is resolved."""
    checkpoint: Path
    config: RunConfig
    progress: Progress


def resume_point(run_dir: Path) -> Resume | None:
    """The run's latest checkpoint with its settings and progress, or None."""
    ckpt = latest(run_dir)
    if ckpt is None:
        return None
    try:
        config = RunConfig.from_dict(read_json(ckpt / "run.json"))
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{ckpt / 'run.json'} is not a run config: {e}")
    return Resume(ckpt, config, Progress.read(ckpt))


def unwrapped_state_dict(model) -> dict:
    """Full (unsharded) fp32 weights on CPU, with plain names; every rank must call this."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.contiguous() for k, v in sd.items()}


def save(run_dir: Path, progress: Progress, model, optimizers, tokenizer: Tokenizer, run: RunConfig, d: Dist,
         chat_template: ChatTemplate | None = None):
    """Write checkpoint `progress.step` into run_dir and make it the current one (collective
    under torchrun). Out of space: the half-written one is removed and every rank raises UserError."""
    step = progress.step
    final = run_dir / f"ckpt-{step:07d}"
    tmp = run_dir / f".tmp-ckpt-{step:07d}"
    failure = None
    try:
        write(tmp, progress, model, optimizers, tokenizer, run, d, chat_template)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        failure = no_room_error(e)
        if failure is None:
            raise
    if any_rank(failure is not None, d):
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(no_room_message(run_dir, final.name, failure, checkpoint_bytes(model, optimizers)))
    if d.is_main:
        if final.exists():  # an earlier, superseded attempt at this step
            shutil.rmtree(final)
        os.rename(tmp, final)
        point_to(run_dir, final.name)
        for old in checkpoints(run_dir):  # only now that their successor exists
            if old != final and step_of(old) < step:
                shutil.rmtree(old, ignore_errors=True)
    barrier(d)


def write(tmp: Path, progress: Progress, model, optimizers, tokenizer: Tokenizer, run: RunConfig, d: Dist,
          chat_template: ChatTemplate | None):
    """The checkpoint's files, in tmp: the sharded state by every rank, the rest by the first."""
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir(parents=True)
    barrier(d)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizers)}
    dcp.save(state, checkpoint_id=tmp / "state")  # every rank writes its own shards
    weights = unwrapped_state_dict(model)
    if d.is_main:
        save_file(merged(weights, lora_scale(run.train)), tmp / "model.safetensors")
        if run.train.lora_rank:
            save_adapters(weights, run.train, tmp / ADAPTER_FILE)
        if chat_template is not None:
            chat_template.save(tmp)
        write_json(tmp / "config.json", asdict(run.model))
        write_json(tmp / "run.json", run.to_saved())
        tokenizer.save(tmp / "tokenizer.json")
        write_json(tmp / "trainer.json", {**asdict(progress), "world_size": d.world_size})
        sync_dir(tmp)


def no_room_error(e: BaseException) -> OSError | None:
    """The out-of-space error behind e: DCP wraps what each rank raised, and the Rust writers
    (safetensors, tokenizers) raise plain exceptions that quote the OS error's number."""
    seen, pending = set(), [e]
    while pending:
        x = pending.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        code = errno_of(x)
        if code in NO_ROOM:
            return x if isinstance(x, OSError) else OSError(code, os.strerror(code))
        pending += [x.__cause__, x.__context__]
        if isinstance(x, CheckpointException):
            pending += [failure[0] for failure in x.failures.values()]
    return None


def errno_of(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    quoted = re.search(r"os error (\d+)|code: (\d+)", str(e))  # Rust's io::Error, as text
    return int(quoted.group(1) or quoted.group(2)) if quoted else None


def no_room_message(run_dir: Path, name: str, error: OSError | None, needed: int) -> str:
    reason = (f"{error.strerror} [{errno.errorcode.get(error.errno, error.errno)}]" if error
              else "out of space on another rank")
    last = latest(run_dir)
    return (f"cannot write checkpoint {name} in {run_dir}: {reason}; it needs about {human_bytes(needed)} "
            f"({needed:,} bytes) and {human_bytes(shutil.disk_usage(run_dir).free)} is free there. "
            f"The last checkpoint ({last.name if last else 'none'}) is untouched: make room (or raise the quota or "
            "file-size limit) and continue with --resume")


def checkpoint_bytes(model, optimizers) -> int:
    """About what one checkpoint takes on disk: the weights twice (sharded state and the consolidated
    model.safetensors) and the optimizers' state (AdamW: 2 tensors per parameter, Muon: 1)."""
    optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    slots = {id(p): 2 if isinstance(o, torch.optim.AdamW) else 1 for o in optimizers for g in o.param_groups
             for p in g["params"]}
    return sum(p.numel() * p.element_size() * (2 + slots.get(id(p), 0)) for p in model.parameters())


def human_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000


def replace_with_link(path: Path, target: str):
    """Make `path` a symbolic link to `target`, atomically, whatever was there (a link, or the plain
    copy that a tool following links left)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # a copied checkpoint folder: its original is in a ckpt-* folder
    tmp = path.with_name(f".{path.name}.link-tmp")
    if os.path.lexists(tmp):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)  # readers see the old or the new target, never neither


def point_to(run_dir: Path, name: str):
    """The `checkpoint` link and the top-level files: conveniences, so that the run directory
    reads like a checkpoint. Resuming and loading find the checkpoint without them."""
    replace_with_link(run_dir / "checkpoint", name)
    for file in LINKED:
        replace_with_link(run_dir / file, f"checkpoint/{file}")


def load_training_state(ckpt: Path, model, optimizers):
    """Restore the model and its optimizers (one or a list) from the sharded state, whatever
    world size wrote it."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizers)}
    try:
        dcp.load(state, checkpoint_id=ckpt / "state")
    except Exception as e:
        raise UserError(f"cannot load training state from {ckpt / 'state'}: {e}")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizers, state["optim"])
