"""`llm.load`: any model we can read, whatever its format, decided here and only here.

    a run directory or checkpoint folder (ours)     llm/formats/run_dir.py
    a Hugging Face directory (config.json with model_type)   llm/formats/hf.py

Each format module answers the same three questions: model_config(path), load_tokenizer(path),
load_model(path) (weights in the dtype the files hold; `load` casts and places them).
`chat_template(path)` finds the chat template saved beside a model, in either format.
"""
from pathlib import Path

import torch

from llm import runtime
from llm.config import ModelConfig
from llm.errors import UserError
from llm.formats import hf, run_dir
from llm.model.chat import ChatTemplate, find_template
from llm.model.tokenizer import Tokenizer
from llm.model.transformer import Transformer


def format_of(path):
    """The module that reads `path`."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist or is not a directory")
    if hf.is_hf_dir(path):
        return hf
    if not (run_dir.model_folder(path) / "config.json").is_file():
        raise UserError(f"{path} holds no checkpoint (no config.json, no complete ckpt-* folder)")
    return run_dir


def model_config(path) -> ModelConfig:
    return format_of(path).model_config(Path(path).expanduser())


def load_tokenizer(path) -> Tokenizer:
    return format_of(path).load_tokenizer(Path(path).expanduser())


def chat_template(path) -> ChatTemplate | None:
    """The chat template saved with a model (a run's latest checkpoint, a checkpoint folder or a
    Hugging Face directory), or None."""
    path = Path(path).expanduser()
    return find_template(path if format_of(path) is hf else run_dir.model_folder(path))


def load(path, device="cpu", dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """A run directory (its latest checkpoint), a checkpoint folder or a Hugging Face directory
    -> (model in eval mode, tokenizer). dtype: every parameter is cast to it; by default the
    inference dtype of `device` (llm/runtime.py), whatever the files hold."""
    source = format_of(path)
    path = Path(path).expanduser()
    model, tokenizer = source.load_model(path), source.load_tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    dtype = dtype or runtime.inference_dtype("auto", torch.device(device)).value
    return model.to(device=device, dtype=dtype).eval(), tokenizer
