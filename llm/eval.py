"""Bits per byte, and `python -m llm.eval`: any checkpoint's loss on any text.

Loss per token depends on the tokenizer: a larger vocabulary packs more text into a token,
so it has a higher loss per token for the same model quality. Bits per UTF-8 byte does not:
the total cross-entropy of the predicted tokens, in bits, over the bytes of text those tokens
stand for. Runs with different tokenizers or vocabulary sizes compare on it honestly.

    python -m llm.eval --ckpt out --data corpus/ [--block_size 256] [--max_tokens 1000000]
"""
import argparse
import json
import math
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers
from tqdm import tqdm

from llm import runtime
from llm.formats.load import load
from llm.train.data import BATCH_BYTES, batched_by_bytes, open_corpus, pieces
from llm.errors import ArgumentParser, UserError, exit_on_user_error
from llm.model.tokenizer import Tokenizer

SPACE_MARK = "\u2581"  # "▁": SentencePiece's visible space (Metaspace)
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token


# --- bytes ----------------------------------------------------------------------------------------

def decoder_types(spec) -> set[str]:
    """The types of a tokenizer.json decoder, looking inside Sequence decoders."""
    if isinstance(spec, dict):
        return {spec.get("type")} | set().union(*(decoder_types(v) for v in spec.values()))
    if isinstance(spec, list):
        return set().union(*(decoder_types(v) for v in spec))
    return set()


def token_bytes(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(bytes each token id stands for, whether it is a special token).

    Counted from each token's own string, never by decoding text, so a character split across
    tokens counts once, in parts, wherever a window cuts it:
    - byte-level BPE (GPT-2, Llama 3, ours): each character of a token is one byte;
    - SentencePiece style (Metaspace, byte fallback: Llama 2, Mistral): "▁" is a space, a
      byte-fallback token <0xNN> one byte, other characters their UTF-8 bytes;
    - added tokens are their literal text; special tokens (BOS, EOS, ...) are no text: 0.
    """
    spec = json.loads(tokenizer.hf.to_str())
    byte_level = "ByteLevel" in decoder_types(spec.get("decoder"))
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    added = tokenizer.hf.get_added_tokens_decoder()
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    counts = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    special = np.zeros(len(counts), dtype=bool)
    for token, i in vocab.items():
        if i in added:
            special[i] = added[i].special
            counts[i] = 0 if added[i].special else len(added[i].content.encode())
        elif byte_level and all(c in alphabet for c in token):
            counts[i] = len(token)
        elif byte_fallback and BYTE_TOKEN.fullmatch(token):
            counts[i] = 1
        else:
            counts[i] = len(token.replace(SPACE_MARK, " ").encode())
    return counts, special


def document_prefix_bytes(tokenizer: Tokenizer, counts: np.ndarray) -> int:
    """Bytes a tokenizer puts in front of every document: 1 where it prepends a space
    (SentencePiece's "▁", byte-level add_prefix_space), else 0. Found by encoding "a"."""
    return max(0, int(counts[tokenizer.encode_corpus(["a"])[0]].sum()) - 1)


def target_bytes(tokenizer: Tokenizer, ids_rows) -> int:
    """UTF-8 bytes of the text that the predicted tokens of `ids_rows` stand for.

    ids_rows: windows of token ids as they are evaluated: in each row, tokens 1..n are
    predicted from those before them; token 0 is context only, and ids < 0 (padding) count 0.

    Exact, wherever windows start or end: every token counts its own bytes (see token_bytes),
    so a multi-byte character split between two windows counts once, in parts, and the bytes
    of windows that overlap by one token add up to the bytes of the whole text. A space the
    tokenizer prepended to a document (the first token after a special token such as BOS or
    EOS) is not counted: it is not in the text. A document that really begins with a space
    loses that byte too (one byte per such document, for tokenizers that cannot tell the two
    apart; their decoder drops it as well).
    """
    counts, special = token_bytes(tokenizer)
    prefix = document_prefix_bytes(tokenizer, counts)
    total = 0
    for row in ids_rows:
        row = np.asarray(row, dtype=np.int64)
        targets, previous = row[1:], row[:-1]
        n = np.where(targets >= 0, counts[targets.clip(min=0)], 0)
        after_special = (previous >= 0) & special[previous.clip(min=0)]
        total += int((n - np.minimum(n, prefix) * after_special).sum())
    return total


def bits_per_byte(nats_total: float, n_bytes: int) -> float:
    return nats_total / (math.log(2) * n_bytes)


# --- evaluation --------------------------------------------------------------------------------------

def tokenize_text(data: str, tokenizer: Tokenizer, max_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """(token stream, documents in it) of the text files at `data`, tokenized as training does:
    each document (long ones in pieces) through encode_corpus and followed by the EOS token, with
    one EOS in front too, so the first document's first token is predicted like every other's.
    Stops after max_tokens + 1 tokens (max_tokens predictions)."""
    corpus = open_corpus(data)
    if corpus.hub_name is not None:
        raise UserError(f"no files found at {data}")
    eos = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    chunks, n = [np.array(eos, dtype=np.int64)], len(eos)
    starts, new_document = [], True  # where each document's tokens begin
    for batch in batched_by_bytes(pieces(corpus.documents()), BATCH_BYTES):
        for ids, (_, ends_document) in zip(tokenizer.encode_corpus([text for text, _ in batch]), batch):
            if new_document:
                starts.append(n)
            chunks.append(np.array(ids + (eos if ends_document else []), dtype=np.int64))
            n += len(chunks[-1])
            new_document = ends_document
        if max_tokens is not None and n > max_tokens:
            break
    if not starts:
        raise UserError(f"{data} holds no text")
    tokens = np.concatenate(chunks)[: None if max_tokens is None else max_tokens + 1]
    if len(tokens) < 2:
        raise UserError(f"{data} is a single token: nothing to predict")
    return tokens, sum(start < len(tokens) for start in starts)


def windows(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """(n, block_size + 1) consecutive windows overlapping by one token, so that every token but
    the first is a target exactly once; the last window is padded with -1 (no target)."""
    n = math.ceil((len(tokens) - 1) / block_size)
    padded = np.full(n * block_size + 1, -1, dtype=np.int64)
    padded[: len(tokens)] = tokens
    return padded[np.arange(n)[:, None] * block_size + np.arange(block_size + 1)]


@torch.inference_mode()
def evaluate_tokens(model, tokens: np.ndarray, block_size: int, batch_size: int) -> tuple[float, int]:
    """(total cross-entropy in nats, predicted tokens) over the stream, each token after the
    first predicted once from the tokens before it in its window."""
    device = next(model.parameters()).device
    rows = torch.from_numpy(windows(tokens, block_size))
    total, count = 0.0, 0
    for i in tqdm(range(0, len(rows), batch_size), desc="evaluating", unit=" batches", leave=False, disable=None):
        w = rows[i : i + batch_size].to(device)
        x, y = w[:, :-1].clamp(min=0), w[:, 1:]  # padding: any input (causal: later positions only), no target
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum").item()
        count += int((y >= 0).sum())
    return total, count


# --- command line -------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expects a positive integer, got {text!r}")
    return value


def parse_args(argv):
    parser = ArgumentParser(prog="python -m llm.eval", description=(
        "Loss, perplexity and bits per UTF-8 byte of a checkpoint (a run directory or a Hugging Face "
        "Llama directory) on text files, tokenized as training does; every token predicted once."))
    parser.add_argument("--ckpt", required=True,
                        help="run directory, checkpoint folder, Hugging Face directory or GGUF file")
    parser.add_argument("--data", required=True,
                        help="a text file, a directory of them, or a glob (.jsonl/.json/.parquet: their 'text' field)")
    parser.add_argument("--block_size", type=positive_int, help="context of each window (default: the model's)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument("--max_tokens", type=positive_int, help="predict at most this many tokens (default: all)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: bfloat16 on CUDA, float32 on CPU (default: auto)")
    return parser.parse_args(argv)


def main(argv=None):
    with exit_on_user_error():
        args = parse_args(sys.argv[1:] if argv is None else argv)
        device = runtime.choose_device(args.device)
        dtype = runtime.inference_dtype(args.dtype, device.value)
        model, tokenizer = load(args.ckpt, device=device.value, dtype=dtype.value)
        block_size = args.block_size or model.config.block_size
        if block_size > model.config.block_size:
            raise UserError(f"--block_size {block_size} exceeds the model's context of {model.config.block_size}")
        tokens, documents = tokenize_text(args.data, tokenizer, args.max_tokens)
        nats, n_tokens = evaluate_tokens(model, tokens, block_size, args.batch_size)
        n_bytes = target_bytes(tokenizer, [tokens])
        loss = nats / n_tokens
        print(f"checkpoint: {args.ckpt} ({model.num_params():,} parameters) | block_size {block_size} | "
              f"{args.data}: {documents:,} documents")
        print(f"device: {device} | dtype: {dtype} | {runtime.threads()}")
        print(f"tokens: {n_tokens:,} predicted | bytes: {n_bytes:,} ({n_bytes / n_tokens:.2f} per token)")
        print(f"loss: {loss:.6f} nats/token | perplexity: {math.exp(min(loss, 50)):.4f} | "
              f"bits per byte: {bits_per_byte(nats, n_bytes) if n_bytes else float('nan'):.6f}")


if __name__ == "__main__":
    main()
