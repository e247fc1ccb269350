"""Byte-level BPE tokenizer, trained and run by Hugging Face `tokenizers`.

Byte-level means every string is first turned into UTF-8 bytes, so any text
round-trips losslessly and there is no unknown token. `<|endoftext|>` separates
documents.
"""
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm.errors import UserError

EOT = "<|endoftext|>"


class Tokenizer:
    """A thin wrapper around `tokenizers.Tokenizer` that knows its document separator."""

    def __init__(self, tokenizer: HFTokenizer, eot: str = EOT):
        self.hf = tokenizer
        self.eot_id = tokenizer.token_to_id(eot)
        if self.eot_id is None:
            raise UserError(f"tokenizer has no {eot!r} token")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path, eot: str = EOT) -> "Tokenizer":
        try:
            return cls(HFTokenizer.from_file(str(path)), eot)
        except Exception as e:  # tokenizers raises plain Exception on bad files
            raise UserError(f"cannot load tokenizer {path}: {e}")

    def save(self, path):
        """Atomically: write a temporary file beside the target, then rename it."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        try:
            self.hf.save(tmp)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes in parallel (tokenizers' Rust thread pool)."""
        return [e.ids for e in self.hf.encode_batch_fast(texts)]

    def decode(self, ids: list[int]) -> str:
        # Special tokens are kept, so that text containing "<|endoftext|>" round-trips too.
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token decoded on its own (for labels; multi-byte characters may split)."""
        return [self.decode([i]) for i in ids]
