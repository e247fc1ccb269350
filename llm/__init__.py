"""A small decoder-only LLM toolkit: tokenizer, model, data, training, sampling."""
from llm.config import ModelConfig, TrainConfig
from llm.formats.load import load
from llm.model.tokenizer import Tokenizer
from llm.model.transformer import Transformer

__all__ = ["load", "ModelConfig", "TrainConfig", "Transformer", "Tokenizer"]
