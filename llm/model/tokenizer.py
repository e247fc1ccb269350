"""Tokenizers of every family through Hugging Face `tokenizers`: ours, and any tokenizer.json.

We train byte-level BPE (every string is first turned into UTF-8 bytes, so any text
round-trips losslessly and there is no unknown token), with `<|endoftext|>` between
documents and the default chat template's two markers, `<|im_start|>` and `<|im_end|>`,
reserved as special tokens (llm/model/chat.py), so a run pretrained from now on can be
fine-tuned on conversations without growing its embedding. Loaded tokenizer.json files may be of any family (byte-level BPE as in GPT-2,
Llama 3, Qwen; SentencePiece-style BPE with Metaspace and byte fallback as in Llama 2,
Mistral, TinyLlama); their end-of-sequence token is read from the files beside them.

Two encodings: `encode` reads a prompt as the tokenizer's own users would (special tokens
such as `<|endoftext|>` are recognised, the template's BOS is added); `encode_corpus` reads
training text, where special-token strings are plain text: only the data pipeline inserts
separators.
"""
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm.errors import UserError
from llm.model.chat import TURN_END, TURN_START

EOT = "<|endoftext|>"
# End-of-sequence tokens of common families, tried in order when no file names one.
KNOWN_EOS = (EOT, "</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>", "<|im_end|>")
AUTO = "auto"


class Tokenizer:
    """A `tokenizers.Tokenizer` and its end-of-sequence token (`eot_id`, None if it has none)."""

    def __init__(self, tokenizer: HFTokenizer, eos: str | None = EOT):
        self.hf = tokenizer
        self.eot_id = None
        if eos is not None:
            self.eot_id = tokenizer.token_to_id(eos)
            if self.eot_id is None:
                raise UserError(f"tokenizer has no {eos!r} token")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT, TURN_START, TURN_END],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path, eos: str | None = AUTO) -> "Tokenizer":
        """A tokenizer.json, or a folder holding one. eos: the end-of-sequence token, or "auto"
        to read it from the files beside it (config.json, generation_config.json,
        tokenizer_config.json) or else recognise a common one; None for none."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad files
            raise UserError(f"cannot load tokenizer {path}: {e}")
        return cls(hf, find_eos(path.parent, hf) if eos == AUTO else eos)

    def add_special_tokens(self, tokens: list[str]) -> list[str]:
        """Add those of `tokens` that the vocabulary lacks as special tokens (new ids at its end);
        returns the ones added."""
        missing = [t for t in tokens if self.hf.token_to_id(t) is None]
        self.hf.add_special_tokens(missing)
        return missing

    @property
    def special_ids(self) -> dict[str, int]:
        """The special tokens, text -> id."""
        return {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

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

    @property
    def eos(self) -> str | None:
        return None if self.eot_id is None else self.hf.id_to_token(self.eot_id)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """A prompt: special tokens are recognised and the tokenizer's template (e.g. BOS) applies."""
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts, in parallel (tokenizers' Rust thread pool)."""
        return [e.ids for e in self.hf.encode_batch_fast(texts)]

    def encode_corpus(self, texts: list[str]) -> list[list[int]]:
        """Training documents, in parallel: special-token strings in the text are plain text,
        so a literal "<|endoftext|>" in a document never becomes a document boundary."""
        previous = self.hf.encode_special_tokens
        self.hf.encode_special_tokens = True
        try:
            return [e.ids for e in self.hf.encode_batch_fast(texts)]
        finally:
            self.hf.encode_special_tokens = previous

    def decode(self, ids: list[int]) -> str:
        # Special tokens are kept, so that text containing "<|endoftext|>" round-trips too.
        return self.hf.decode(ids, skip_special_tokens=False)

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """The ids of SentencePiece-style byte tokens, <0x00> ... <0xFF> (none in byte-level BPE)."""
        ids = (self.hf.token_to_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token decoded on its own (for labels; multi-byte characters may split)."""
        return [self.decode([i]) for i in ids]


class StreamDecoder:
    """The text of a sequence as its tokens arrive, each piece exactly what decoding the whole
    sequence adds.

    It runs on tokenizers' own incremental decoding (DecodeStream: it decodes a short window of
    recent tokens and returns what the newest one adds, holding it back while it ends in an
    incomplete character), primed with the prompt, so that the first piece follows the prompt as
    a full decode would (SentencePiece-style decoders drop the leading space of a sequence's first
    word only). One addition: a run of byte-fallback tokens (<0xE4><0xB8>...) decodes as one UTF-8
    sequence, all of it U+FFFD if invalid, so a later byte can change what earlier ones showed;
    such a run is held until it ends. Where the decoder still turns out not to extend its own
    earlier output (invalid bytes), the piece comes from decoding the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids=()):
        self.hf = tokenizer.hf
        self.byte_ids = tokenizer.byte_fallback_ids
        self.prompt_ids, self.ids = list(prompt_ids), []
        self.text = ""  # everything returned so far
        self.held: list[int] = []  # a run of byte-fallback tokens not yet given to the stream
        self.stream = self._primed(self.prompt_ids)

    def _primed(self, ids) -> decoders.DecodeStream:
        stream = decoders.DecodeStream(skip_special_tokens=False)
        for i in ids:
            try:
                stream.step(self.hf, i)
            except Exception:  # tokenizers raises plain Exception; a fresh stream from here on
                stream = decoders.DecodeStream(skip_special_tokens=False)
                stream.step(self.hf, i)
        return stream

    def add(self, token: int) -> str:
        self.ids.append(token)
        self.held.append(token)
        if token in self.byte_ids:
            return ""
        return self._flush()

    def _flush(self) -> str:
        group, self.held = self.held, []
        try:  # the run and the token after it in one step, decoded together as in the whole sequence
            piece = self.stream.step(self.hf, group if len(group) > 1 else group[0]) or ""
        except Exception:  # the decoder contradicted its earlier output: decode the whole sequence
            piece = self._rest()
            self.stream = self._primed(group)
        self.text += piece
        return piece

    def _rest(self) -> str:
        """What decoding prompt + completion adds after the prompt and the text so far."""
        head = self.hf.decode(self.prompt_ids, skip_special_tokens=False)
        full = self.hf.decode(self.prompt_ids + self.ids, skip_special_tokens=False)
        return full[len(head) + len(self.text):] if full.startswith(head + self.text) else ""

    def finish(self) -> str:
        """The end of the sequence: what is still held back (a byte run, an incomplete character)."""
        self.held = []
        rest = self._rest()
        self.text += rest
        return rest


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}")
    return value if isinstance(value, dict) else {}


def find_eos(directory: Path, hf: HFTokenizer) -> str | None:
    """The end-of-sequence token named by the files beside a tokenizer.json (as transformers
    reads them: config.json, then generation_config.json, then tokenizer_config.json), else the
    first common EOS token the vocabulary has as a special token, else None."""
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        if not (directory / name).is_file():
            continue
        values = _read_json(directory / name)
        eos = values.get("eos_token_id")
        if isinstance(eos, list):  # several EOS ids: the first is the one we stop on and separate with
            eos = eos[0] if eos else None
        if isinstance(eos, int) and not isinstance(eos, bool):
            token = hf.id_to_token(eos)
            if token is None:
                raise UserError(f"{directory / name}: eos_token_id {eos} is not in tokenizer.json's vocabulary")
            return token
        eos = values.get("eos_token")
        if isinstance(eos, dict):  # older tokenizer_config.json: an AddedToken
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            if hf.token_to_id(eos) is None:
                raise UserError(f"{directory / name}: eos_token {eos!r} is not in tokenizer.json's vocabulary")
            return eos
    special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    return next((t for t in KNOWN_EOS if t in special), None)
