"""`llm.load`: any model we can read, whatever its format, decided here and only here.

    a run directory or checkpoint folder (ours)     llm/formats/run_dir.py
    a Hugging Face directory (config.json with model_type)   llm/formats/hf.py
    a GGUF file (llama.cpp's format)               llm/formats/gguf.py

Each format module answers the same four questions: model_config(path), load_tokenizer(path),
load_model(path) (weights in the dtype the files hold; `load` casts and places them) and
chat_template(path) (the model's own, or None).
"""
from pathlib import Path

import torch

from llm import runtime
from llm.config import ModelConfig
from llm.errors import UserError
from llm.formats import gguf, hf, run_dir
from llm.model.chat import ChatTemplate
from llm.model.tokenizer import Tokenizer
from llm.model.transformer import Transformer


def format_of(path):
    """The module that reads `path`."""
    path = Path(path).expanduser()
    if path.is_file() and gguf.is_gguf(path):
        return gguf
    if path.is_file():
        raise UserError(f"checkpoint {path} is a file but not a GGUF file (checkpoints are directories or .gguf files)")
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
    return format_of(path).chat_template(Path(path).expanduser())


def load(path, device="cpu", dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """A run directory (its latest checkpoint), a checkpoint folder, a Hugging Face directory or a
    GGUF file -> (model in eval mode, tokenizer). dtype: every parameter is cast to it; by default the
    inference dtype of `device` (llm/runtime.py), whatever the files hold."""
    source = format_of(path)
    path = Path(path).expanduser()
    tokenizer = source.load_tokenizer(path)  # first: the cheaper of the two to refuse
    model = source.load_model(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    dtype = dtype or runtime.inference_dtype("auto", torch.device(device)).value
    return model.to(device=device, dtype=dtype).eval(), tokenizer
