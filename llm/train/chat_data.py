"""Conversations -> tokens and targets, cached like the pretraining tokens -> packed windows.

1. `read_conversations` streams rows of .jsonl, .json or .parquet files (through Hugging Face
   `datasets`, as pretraining reads its rows) in the OpenAI shape {"messages": [{"role", "content"},
   ...]} or the prompt/completion shape {"prompt": ..., "completion": ...} (strings: one user and
   one assistant turn; lists of messages: the two joined). A malformed row stops the run with one
   line naming its file and row: a fine-tuning set is small and curated, and a row skipped in
   silence is a row the user meant to teach.
2. `prepare_chats` renders each conversation with the run's chat template, tokenizes it as
   transformers' apply_chat_template does (no special tokens added beyond the template's), and
   marks the tokens that are targets: those with a character in an assistant turn
   (llm/model/chat.py assistant_spans). Written to cache_dir/chats/<key>/, keyed by corpus,
   tokenizer, template and settings, split into training and validation by conversation.
3. `pack` places conversations into windows of block_size positions (a conversation of n tokens
   takes n - 1: its inputs, each with its next token as target), best fit, longest first; one
   longer than block_size + 1 tokens is truncated to its beginning (counted and printed: its
   prompt and the start of its reply still teach, where dropping would bias the set against long
   replies), and dropped only if no target is left.
4. `ChatBatches` gives the windows of any (step, micro-batch) as a pure function of them, epoch
   after epoch in a fresh order, so a resumed run, or the same global batch on more processes,
   trains on the same rows. Each row says which conversation each position belongs to
   (Batch.documents), so attention and positions stay inside it.
"""
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from bisect import bisect_left, insort
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llm.config import RunConfig
from llm.errors import UserError
from llm.eval import token_bytes
from llm.model.chat import ChatTemplate, assistant_spans, check_conversation
from llm.model.tokenizer import Tokenizer
from llm.train.batches import Batch, to_device
from llm.train.data import ROW_FORMATS, Corpus, is_validation, token_dtype
from llm.train.distributed import Dist

CHATS_FORMAT = 1  # part of the cache key
CHUNK = 512  # conversations rendered and tokenized together


# --- rows ------------------------------------------------------------------------------------------

def row_messages(row: dict, where: str) -> list[dict]:
    """One row as a list of messages, checked; a UserError naming `where` if malformed."""
    if row.get("messages") is not None:
        messages = row["messages"]
    elif row.get("prompt") is not None and row.get("completion") is not None:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        elif isinstance(prompt, list) and isinstance(completion, list):
            messages = prompt + completion
        else:
            raise UserError(f"{where}: prompt and completion must both be text or both lists of messages")
    else:
        raise UserError(f"{where}: a row needs 'messages', or 'prompt' and 'completion' (it has: "
                        f"{', '.join(k for k, v in row.items() if v is not None) or 'nothing'})")
    if isinstance(messages, list):  # Arrow gives every message every key seen in the file: None where absent
        messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
    return check_conversation(messages, where)


def read_conversations(corpus: Corpus) -> Iterator[list[dict]]:
    """Each row's messages, file by file, in order."""
    import datasets

    datasets.disable_progress_bars()
    sources = [(f, ROW_FORMATS.get(Path(f).suffix)) for f in corpus.files or []]
    for f, fmt in sources:
        if fmt is None:
            raise UserError(f"--task sft reads conversations from .jsonl, .json or .parquet rows; {f} is none of those")
    if corpus.hub_name is not None:
        sources = [(corpus.hub_name, None)]
    for name, fmt in sources:
        try:
            if fmt is None:
                hub, _, config = name.partition(":")
                rows = datasets.load_dataset(hub, config or None, split="train", streaming=True)
            else:
                rows = datasets.load_dataset(fmt, data_files=[name], split="train", streaming=True)
            for i, row in enumerate(rows, start=1):
                yield row_messages(row, f"{name}: row {i}")
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # datasets and pyarrow raise many kinds for a bad file
            raise UserError(f"cannot read {name}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")


# --- tokens and targets ----------------------------------------------------------------------------

def tokenize_conversations(conversations: list[list[dict]], tokenizer: Tokenizer, template: ChatTemplate,
                           last_only: bool) -> list[tuple[list[int], np.ndarray]]:
    """(token ids, target mask) of each conversation: mask[i] says whether token i is a target
    (it has a character in an assistant turn). Tokenized as apply_chat_template does: special
    tokens in the text are recognised, none are added."""
    rendered = [assistant_spans(template, messages, last_only) for messages in conversations]
    encodings = tokenizer.hf.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    out = []
    for (_, spans), encoding in zip(rendered, encodings):
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(offsets), dtype=bool)
        for start, end in spans:
            mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        out.append((encoding.ids, mask))
    return out


def chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Chats:
    """One split's conversations: all tokens and masks end to end, and where each starts."""
    tokens: np.ndarray
    mask: np.ndarray  # uint8, 1: a target
    starts: np.ndarray  # int64, n + 1 offsets

    def __len__(self):
        return len(self.starts) - 1

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.starts[i], self.starts[i + 1]
        return self.tokens[a:b], self.mask[a:b]

    @classmethod
    def read(cls, folder: Path, split: str, dtype: str) -> "Chats":
        read = lambda name, t: np.fromfile(folder / f"{split}.{name}", dtype=t)
        return cls(read("tokens", dtype), read("mask", np.uint8), read("starts", np.int64))


def cache_key(corpus: Corpus, tokenizer: Tokenizer, template: ChatTemplate, last_only: bool,
              val_fraction: float) -> str:
    parts = [corpus.fingerprint, tokenizer.fingerprint(), template.source, json.dumps(template.special_tokens,
             sort_keys=True), str(last_only), str(val_fraction), str(CHATS_FORMAT)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def prepare_chats(corpus: Corpus, tokenizer: Tokenizer, template: ChatTemplate, cache_dir: Path,
                  val_fraction: float, last_only: bool) -> Path:
    """Tokenize the conversations into cache_dir/chats/<key>/, unless already there; returns it."""
    final = cache_dir / "chats" / cache_key(corpus, tokenizer, template, last_only, val_fraction)
    if (final / "meta.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        meta = write_chats(corpus, tokenizer, template, tmp, val_fraction, last_only)
        (tmp / "meta.json").write_text(json.dumps({**meta, "corpus": corpus.name}, indent=2))
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_chats(corpus: Corpus, tokenizer: Tokenizer, template: ChatTemplate, out: Path, val_fraction: float,
                last_only: bool) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    files = {(split, name): open(out / f"{split}.{name}", "wb") for split in ("train", "val")
             for name in ("tokens", "mask")}
    starts = {"train": [0], "val": [0]}
    count = 0
    with tqdm(desc="tokenizing conversations", unit=" conversations", leave=False) as bar:
        for chunk in chunks(read_conversations(corpus), CHUNK):
            for ids, mask in tokenize_conversations(chunk, tokenizer, template, last_only):
                split = "val" if is_validation(count, val_fraction) else "train"
                files[split, "tokens"].write(np.asarray(ids, dtype=dtype).tobytes())
                files[split, "mask"].write(mask.astype(np.uint8).tobytes())
                starts[split].append(starts[split][-1] + len(ids))
                count += 1
            bar.update(len(chunk))
    for f in files.values():
        f.close()
    for split, offsets in starts.items():
        np.asarray(offsets, dtype=np.int64).tofile(out / f"{split}.starts")
    if len(starts["train"]) < 2:
        raise UserError(f"{corpus.name}: {count} conversation(s): at least 2 are needed (one is held out for "
                        f"validation, every {round(1 / val_fraction)}th)")
    return {"dtype": np.dtype(dtype).name, "conversations": count, "train_conversations": len(starts["train"]) - 1,
            "val_conversations": len(starts["val"]) - 1, "tokenizer": tokenizer.fingerprint(),
            "train_on": "last_assistant" if last_only else "assistant"}


# --- windows ---------------------------------------------------------------------------------------

@dataclass
class Packed:
    """Conversations placed in windows: windows[w] lists (conversation, tokens used) pairs."""
    windows: list[list[tuple[int, int]]]
    truncated: int  # conversations cut to block_size + 1 tokens
    dropped: int  # ... of which no target was left


def usable_length(chats: Chats, i: int, block_size: int) -> int:
    """Tokens of conversation i that train: at most block_size + 1; 0 when none of its targets is among them."""
    _, mask = chats.get(i)
    n = min(len(mask), block_size + 1)
    return n if n >= 2 and mask[1:n].any() else 0


def pack(chats: Chats, block_size: int, packing: bool) -> Packed:
    """Best fit, longest first: each conversation (n tokens, n - 1 positions) goes into the open
    window with the least room that still holds it. Without packing, one per window."""
    lengths = [usable_length(chats, i, block_size) for i in range(len(chats))]
    full = np.diff(chats.starts)
    truncated = int(sum(1 for n in full if n > block_size + 1))
    dropped = sum(1 for n in lengths if n == 0)
    order = sorted((i for i in range(len(chats)) if lengths[i]), key=lambda i: -lengths[i])
    if not packing:
        return Packed([[(i, lengths[i])] for i in sorted(order)], truncated, dropped)
    windows, room = [], []  # room: sorted (free positions, window)
    for i in order:
        need = lengths[i] - 1
        at = bisect_left(room, (need, -1))
        if at == len(room):
            windows.append([])
            free, w = block_size, len(windows) - 1
        else:
            free, w = room.pop(at)
        windows[w].append((i, lengths[i]))
        if free - need > 0:
            insort(room, (free - need, w))
    return Packed(windows, truncated, dropped)


def window_rows(chats: Chats, windows: list[list[tuple[int, int]]], width: int, pad_id: int,
                documents: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(inputs, targets, documents) of `width` positions per window; -1: no target. Padding is
    its own document, after the conversations."""
    inputs = np.full((len(windows), width), pad_id, dtype=np.int64)
    targets = np.full((len(windows), width), -1, dtype=np.int64)
    docs = np.zeros((len(windows), width), dtype=np.int64)
    for row, window in enumerate(windows):
        at = 0
        for doc, (i, n) in enumerate(window):
            ids, mask = chats.get(i)
            ids, mask = ids[:n].astype(np.int64), mask[:n].astype(bool)
            inputs[row, at : at + n - 1] = ids[:-1]
            targets[row, at : at + n - 1] = np.where(mask[1:], ids[1:], -1)
            docs[row, at : at + n - 1] = doc
            at += n - 1
        docs[row, at:] = len(window)
    return inputs, targets, docs if documents else None


class ChatBatches:
    """Fine-tuning batches: rows of packed (or padded) conversations, epoch after epoch."""

    def __init__(self, folder: Path, run: RunConfig, d: Dist, tokenizer: Tokenizer):
        meta = json.loads((folder / "meta.json").read_text())
        self.cfg, self.d, self.block_size = run.train, d, run.model.block_size
        self.pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        self.train_chats = Chats.read(folder, "train", meta["dtype"])
        self.packed = pack(self.train_chats, self.block_size, self.cfg.packing)
        if not self.packed.windows:
            raise UserError(f"no training conversation has a target within block_size={self.block_size} tokens")
        val_chats = Chats.read(folder, "val", meta["dtype"])
        val_windows = pack(val_chats, self.block_size, self.cfg.packing).windows
        val_windows = val_windows[: self.cfg.eval_iters * self.cfg.batch_size]
        if not val_windows:
            raise UserError(f"no validation conversation has a target within block_size={self.block_size} tokens")
        self.val_chats, self.val_bytes = val_chats, self._target_bytes(val_chats, val_windows, tokenizer)
        rows = math.ceil(len(val_windows) / d.world_size)  # every rank runs as many rows; padding rows count 0
        self.val_windows = val_windows[d.rank :: d.world_size]
        self.val_windows += [[]] * (rows - len(self.val_windows))
        self.meta = meta

    def _target_bytes(self, chats: Chats, windows, tokenizer: Tokenizer) -> int:
        counts, _ = token_bytes(tokenizer)
        _, targets, _ = window_rows(chats, windows, self.block_size, self.pad_id, False)
        return max(1, int(counts[targets[targets >= 0]].sum()))

    def describe(self) -> str:
        p, n = self.packed, len(self.train_chats)
        slots = sum(sum(k - 1 for _, k in w) for w in p.windows)
        how = f"packed into {len(p.windows):,} windows" if self.cfg.packing else "one per row"
        line = (f"data: {self.meta['corpus']}: {n:,} training conversations, {how} of {self.block_size} positions "
                f"({slots / (len(p.windows) * self.block_size):.0%} filled), {len(self.val_chats):,} validation")
        if p.truncated:
            line += (f"; {p.truncated:,} longer than block_size+1 = {self.block_size + 1} tokens truncated to it"
                     + (f", {p.dropped:,} of them dropped (no target left)" if p.dropped else ""))
        return line

    def _batch(self, chats: Chats, windows, documents: bool) -> Batch:
        width = self.block_size
        if not self.cfg.packing:  # padded to the longest row of the batch
            width = max([n - 1 for w in windows for _, n in w] or [1])
        inputs, targets, docs = window_rows(chats, windows, width, self.pad_id, documents and self.cfg.packing)
        device = self.d.device
        return Batch(to_device(inputs, device), to_device(targets, device), int((targets >= 0).sum()),
                     None if docs is None else to_device(docs, device))

    def train(self, step: int, micro: int) -> Batch:
        # The global micro-batch index, as in pretraining: K processes × A accumulation steps read
        # the same rows as one process with K·A steps.
        per_step = self.d.world_size * self.cfg.grad_accum
        first = (step * per_step + self.d.rank * self.cfg.grad_accum + micro) * self.cfg.batch_size
        n = len(self.packed.windows)
        rows = []
        for position in range(first, first + self.cfg.batch_size):
            epoch, k = divmod(position, n)
            rows.append(self.packed.windows[epoch_order(self.cfg.seed, epoch, n)[k]])
        return self._batch(self.train_chats, rows, documents=True)

    def validation(self) -> Iterator[Batch]:
        for i in range(0, len(self.val_windows), self.cfg.batch_size):
            yield self._batch(self.val_chats, self.val_windows[i : i + self.cfg.batch_size], documents=True)


@functools.lru_cache(maxsize=2)  # the current epoch, and the next at a boundary
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the windows in an epoch: a permutation drawn from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)
