"""Weights from files into the model: safetensors reading, name and shape checks, and a model
built around given weights without a throwaway initialization."""
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llm.config import ModelConfig
from llm.errors import UserError
from llm.model.transformer import Transformer


def read_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e})")


def check_weights(weights: dict, expected: dict, source: str, config: str = "config.json"):
    """Names and shapes of `weights` (from `source`) against `expected` (name -> tensor, implied by
    `config`), as one clear line."""
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"{config} does not match {source}: {what} ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected)")
    for name, tensor in expected.items():  # in the model's order: the first layer's first mismatch
        if weights[name].shape != tensor.shape:
            raise UserError(f"{config} does not match {source}: {name} has shape {tuple(weights[name].shape)}, "
                            f"the config implies {tuple(tensor.shape)}")


def expected_weights(config: ModelConfig) -> dict:
    """The model's parameter names and shapes (meta tensors: no memory)."""
    with torch.device("meta"):
        return Transformer(config).state_dict()


def build_model(config: ModelConfig, weights: dict, source: str) -> Transformer:
    """A model holding `weights` (checked against the config), built on the meta device so no
    memory or time goes into a random initialization that would be overwritten."""
    with torch.device("meta"):
        model = Transformer(config)
    check_weights(weights, model.state_dict(), source)
    model.load_state_dict(weights, assign=True)
    model.init_buffers()  # the position tables, now on a real device
    return model
