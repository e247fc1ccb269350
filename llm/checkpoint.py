"""Checkpoints: a run directory is a folder that `llm.load` and `sample.py` read.

    out/
      checkpoint -> ckpt-0001000      the latest complete checkpoint (a symlink, swapped atomically)
      config.json, model.safetensors, tokenizer.json -> checkpoint/...
      ckpt-0001000/
        config.json                   ModelConfig
        model.safetensors             consolidated fp32 weights
        tokenizer.json
        run.json                      the resolved run settings
        trainer.json                  step and tokens seen
        state/                        torch.distributed.checkpoint: model + optimizer, sharded by rank
      metrics.jsonl, loss.png

A checkpoint is written into a temporary directory and renamed into place, then the
`checkpoint` link is swapped with an atomic rename, so a crash at any instant
leaves the previous checkpoint loadable. Data windows and dropout masks are
functions of (seed, step, micro-batch), so restoring the step restores the data
position and the random state.
"""
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llm.config import ModelConfig, RunConfig
from llm.distributed import Dist, barrier
from llm.errors import UserError
from llm.model import Transformer
from llm.tokenizer import Tokenizer

LINKED = ("config.json", "model.safetensors", "tokenizer.json")

# DCP warns that it assumes a single process when there is no process group: that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def write_json(path: Path, obj):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def unwrapped_state_dict(model) -> dict:
    """Full (unsharded) fp32 weights on CPU, with plain names; every rank must call this."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.contiguous() for k, v in sd.items()}


def save(run_dir: Path, step: int, model, optimizer, tokenizer: Tokenizer, run: RunConfig, d: Dist, tokens_seen: int):
    """Write checkpoint `step` into run_dir and make it the current one (collective under torchrun)."""
    final = run_dir / f"ckpt-{step:07d}"
    tmp = run_dir / f".tmp-ckpt-{step:07d}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir(parents=True)
    barrier(d)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=tmp / "state")  # every rank writes its own shards
    weights = unwrapped_state_dict(model)
    if d.is_main:
        save_file(weights, tmp / "model.safetensors")
        write_json(tmp / "config.json", run.to_dict()["model"])
        write_json(tmp / "run.json", run.to_dict())
        write_json(tmp / "trainer.json", {"step": step, "tokens_seen": tokens_seen, "world_size": d.world_size})
        tokenizer.save(tmp / "tokenizer.json")
        sync_dir(tmp)
        if final.exists():  # an earlier, superseded attempt at this step
            shutil.rmtree(final)
        os.rename(tmp, final)
        point_to(run_dir, final.name)
        for old in run_dir.glob("ckpt-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(d)


def sync_dir(path: Path):
    """Flush a directory's files to disk (readable by all, as plain files are) before it
    becomes visible under its final name."""
    for f in path.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o644)  # some writers (temporary files) leave 0600
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def point_to(run_dir: Path, name: str):
    link = run_dir / "checkpoint"
    tmp = run_dir / ".checkpoint.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, link)  # atomic: readers see the old or the new checkpoint, never neither
    for name in LINKED:
        if not os.path.lexists(run_dir / name):
            os.symlink(f"checkpoint/{name}", run_dir / name)


def current(run_dir: Path) -> Path | None:
    link = Path(run_dir) / "checkpoint"
    return link.resolve() if link.is_symlink() and link.exists() else None


def holds_run(path: Path) -> bool:
    return (path / "checkpoint").is_symlink() or (path / "run.json").exists() or any(path.glob("ckpt-*"))


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}")
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value


def resume_state(run_dir: Path) -> tuple[RunConfig, dict, Path]:
    """The run settings, trainer state and directory of the run's latest checkpoint."""
    ckpt = current(run_dir)
    if ckpt is None:
        raise UserError(f"--resume: {run_dir} holds no checkpoint")
    try:
        run = RunConfig.from_dict(read_json(ckpt / "run.json"))
    except (KeyError, TypeError) as e:
        raise UserError(f"{ckpt / 'run.json'} is not a run config: {e}")
    return run, read_json(ckpt / "trainer.json"), ckpt


def load_training_state(ckpt: Path, model, optimizer):
    """Restore model and optimizer from the sharded state, whatever world size wrote it."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.load(state, checkpoint_id=ckpt / "state")
    except Exception as e:
        raise UserError(f"cannot load training state from {ckpt / 'state'}: {e}")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def read_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e})")


def check_weights(weights: dict, expected: dict, source: str):
    """Names and shapes of `weights` against `expected` (name -> tensor), as one clear line."""
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"config.json does not match {source}: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for name, tensor in expected.items():  # in the model's order: the first layer's first mismatch
        if weights[name].shape != tensor.shape:
            raise UserError(f"config.json does not match {source}: {name} has shape {tuple(weights[name].shape)}, "
                            f"the config implies {tuple(tensor.shape)}")


def build_model(config: ModelConfig, weights: dict, source: str) -> Transformer:
    """A model holding `weights` (checked against the config), built on the meta device so no
    memory or time goes into a random initialization that would be overwritten."""
    with torch.device("meta"):
        model = Transformer(config)
    check_weights(weights, model.state_dict(), source)
    model.load_state_dict(weights, assign=True)
    model.init_buffers()  # the position tables, now on a real device
    return model


def load(path, device="cpu", dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """A run directory (or a Hugging Face Llama directory) -> (model in eval mode, tokenizer)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist or is not a directory")
    config = read_json(path / "config.json")
    if "model_type" in config:
        from llm.hf import load_llama

        model, tokenizer = load_llama(path)
    else:
        try:
            config = ModelConfig.from_dict(config)
        except TypeError as e:
            raise UserError(f"{path / 'config.json'} is not a model config: {e}")
        model = build_model(config, read_safetensors(path / "model.safetensors"), "model.safetensors")
        tokenizer = Tokenizer.from_file(path / "tokenizer.json")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    return model.to(device=device, dtype=dtype).eval(), tokenizer
