"""A small decoder-only LLM toolkit: tokenizer, model, data, training, sampling."""
from llm.checkpoint import load
from llm.config import ModelConfig, TrainConfig
from llm.model import Transformer
from llm.tokenizer import Tokenizer

__all__ = ["load", "ModelConfig", "TrainConfig", "Transformer", "Tokenizer"]
