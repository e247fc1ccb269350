"""Checkpoints: a run directory is a folder that `llm.load` and `sample.py` read.

    out/
      ckpt-0001000/
        config.json                   ModelConfig: the architecture
        model.safetensors             consolidated fp32 weights
        tokenizer.json
        run.json                      the run's settings (model, train, runtime) and init_from
        state/                        torch.distributed.checkpoint: model + optimizer, sharded by rank
        trainer.json                  step, tokens seen, ...; written last: the completion marker
      checkpoint -> ckpt-0001000      conveniences: the latest checkpoint, and its files at the top
      config.json, model.safetensors, tokenizer.json -> checkpoint/...
      metrics.jsonl, loss.png

A checkpoint is written into a temporary directory and renamed into place; older ones are
deleted only after that. The latest checkpoint is the highest-numbered complete ckpt-*
folder, so a crash at any instant leaves the previous checkpoint loadable, and a run
directory copied by a tool that follows (or drops) symbolic links still resumes. Data windows and dropout masks are
functions of (seed, step, micro-batch), so restoring the step restores the data
position and the random state.
"""
import json
import os
import re
import shutil
import warnings
from dataclasses import asdict
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


def save(run_dir: Path, step: int, model, optimizers, tokenizer: Tokenizer, run: RunConfig, d: Dist, trainer_state: dict):
    """Write checkpoint `step` into run_dir and make it the current one (collective under torchrun).

    trainer_state (step, tokens seen, ...) is written last, as trainer.json: a checkpoint folder
    that has it, and the files before it, is complete."""
    final = run_dir / f"ckpt-{step:07d}"
    tmp = run_dir / f".tmp-ckpt-{step:07d}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir(parents=True)
    barrier(d)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizers)}
    dcp.save(state, checkpoint_id=tmp / "state")  # every rank writes its own shards
    weights = unwrapped_state_dict(model)
    if d.is_main:
        save_file(weights, tmp / "model.safetensors")
        write_json(tmp / "config.json", asdict(run.model))
        write_json(tmp / "run.json", {**run.to_dict(), "init_from": run.launch.init_from})
        tokenizer.save(tmp / "tokenizer.json")
        write_json(tmp / "trainer.json", {**trainer_state, "step": step, "world_size": d.world_size})
        sync_dir(tmp)
        if final.exists():  # an earlier, superseded attempt at this step
            shutil.rmtree(final)
        os.rename(tmp, final)
        point_to(run_dir, final.name)
        for old in checkpoints(run_dir):  # only now that their successor exists
            if old != final and step_of(old) < step:
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


CKPT_NAME = re.compile(r"ckpt-(\d+)")
COMPLETE = ("config.json", "model.safetensors", "tokenizer.json", "run.json", "state/.metadata", "trainer.json")


def step_of(ckpt: Path) -> int:
    return int(CKPT_NAME.fullmatch(ckpt.name).group(1))


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first."""
    found = [p for p in Path(run_dir).glob("ckpt-*") if CKPT_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=step_of, reverse=True)


def latest(run_dir: Path) -> Path | None:
    """The highest-numbered complete checkpoint, found from the folder's contents alone, so that a
    run directory copied, synced or unpacked without its symbolic links still resumes."""
    return next((c for c in checkpoints(run_dir) if all((c / f).exists() for f in COMPLETE)), None)


def holds_run(path: Path) -> bool:
    path = Path(path)
    return (os.path.lexists(path / "checkpoint") or (path / "run.json").exists() or bool(checkpoints(path))
            or (path / "metrics.jsonl").exists())


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


def resume_state(run_dir: Path) -> tuple[RunConfig, dict, Path] | None:
    """The saved settings, trainer state and folder of the run's latest checkpoint, or None."""
    ckpt = latest(run_dir)
    if ckpt is None:
        return None
    try:
        run = RunConfig.from_dict(read_json(ckpt / "run.json"))
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{ckpt / 'run.json'} is not a run config: {e}")
    return run, read_json(ckpt / "trainer.json"), ckpt


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


def model_config_of(path: Path) -> ModelConfig:
    """The architecture of a checkpoint folder, run directory or Hugging Face Llama directory."""
    path = latest(path) or path
    config = read_json(path / "config.json")
    if "model_type" in config:
        from llm.hf import model_config

        return model_config(config)
    try:
        return ModelConfig.from_dict(config)
    except TypeError as e:
        raise UserError(f"{path / 'config.json'} is not a model config: {e}")


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load(path, device="cpu", dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """A run directory (its latest checkpoint), a checkpoint folder, or a Hugging Face Llama
    directory -> (model in eval mode, tokenizer).

    dtype: every parameter is cast to it; default float32 on CPU, bfloat16 on CUDA, whatever
    the files hold (Hub checkpoints are mostly bf16).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist or is not a directory")
    path = latest(path) or path
    if "model_type" in read_json(path / "config.json"):
        from llm.hf import load_llama

        model, tokenizer = load_llama(path)
    else:
        model = build_model(model_config_of(path), read_safetensors(path / "model.safetensors"), "model.safetensors")
        tokenizer = Tokenizer.from_file(path / "tokenizer.json")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    return model.to(device=device, dtype=dtype or default_dtype(device)).eval(), tokenizer
