"""Corpora -> packed token files -> training windows.

1. `open_corpus` names a stream of documents, read through Hugging Face `datasets`
   (local text/code files as one document per file, .jsonl/.json/.parquet rows with
   a `text` field, or a Hub dataset), by default the running interpreter's standard
   library sources.
2. `prepare_tokens` tokenizes that stream in parallel batches into flat token files
   (train and validation split by document, or one corpus-order stream when there are
   few documents) with the end-of-sequence token after each document, written
   incrementally and cached by corpus and tokenizer fingerprint; `split_tokens` gives
   the training and validation tokens for a context length.
   Every cache entry (tokenizer, token files) records its files' sizes and checksums and is
   checked before use; a damaged one is rebuilt with a note, never read. An entry is built
   under a file lock: one process builds it, the others (of this job, of another job, on
   another node sharing cache_dir) wait for it.
3. `train_windows` draws random windows of block_size + 1 tokens from a generator
   seeded by (seed, step, micro-batch index): any run that reaches a step sees the
   same data there, whether resumed or spread over more processes.
"""
import contextlib
import glob
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llm.errors import UserError
from llm.files import lock, lock_holder, sha256_file, write_json
from llm.model.tokenizer import Tokenizer

ROW_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # rows with a `text` field
BATCH_BYTES = 8 << 20  # documents tokenized together: bounds memory whatever the corpus size


@dataclass
class Corpus:
    name: str
    fingerprint: str  # changes when the content may have changed
    files: list[str] | None = None  # local files, or None for a Hub dataset
    hub_name: str | None = None

    def documents(self, max_bytes: int | None = None) -> Iterator[str]:
        """Stream the non-empty documents (optionally only the first max_bytes of text)."""
        seen = 0
        for doc in self._stream():
            if doc:
                yield doc
                seen += len(doc)
                if max_bytes is not None and seen >= max_bytes:
                    return

    def _stream(self) -> Iterator[str]:
        import datasets

        datasets.disable_progress_bars()
        try:
            for dataset in self._datasets(datasets):
                for row in dataset:
                    if "text" not in row:
                        raise UserError(f"{self.name}: rows have no 'text' field (fields: {', '.join(row)})")
                    yield row["text"] or ""
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # datasets and pyarrow raise many kinds for a bad file
            raise UserError(f"cannot read corpus {self.name}: {type(e).__name__}: {e}")

    def _datasets(self, datasets):
        if self.hub_name is not None:
            name, _, config = self.hub_name.partition(":")
            yield datasets.load_dataset(name, config or None, split="train", streaming=True)
            return
        # Consecutive files of one format share a dataset, so document order is file order.
        for fmt, group in itertools.groupby(self.files, key=lambda f: ROW_FORMATS.get(Path(f).suffix, "text")):
            options = {"sample_by": "document", "encoding_errors": "replace"} if fmt == "text" else {}
            yield datasets.load_dataset(fmt, data_files=list(group), split="train", streaming=True, **options)


def stdlib_sources() -> list[str]:
    """Every .py file of the running interpreter's standard library, site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def local_files(spec: str) -> list[str]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
        hidden = lambda p: any(part.startswith(".") for part in p.relative_to(path).parts)
        return [str(p) for p in candidates if not hidden(p)]
    return sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))


def fingerprint_files(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def looks_local(spec: str) -> bool:
    return os.path.exists(os.path.expanduser(spec)) or glob.has_magic(spec) or spec.startswith((".", "/", "~"))


def normalize_data_spec(spec: str) -> str:
    """A local path as an absolute path (so a run can be continued from another directory);
    a Hub dataset name as it is."""
    return os.path.abspath(os.path.expanduser(spec)) if spec.strip() and looks_local(spec) else spec


def open_corpus(spec: str | None) -> Corpus:
    """A corpus from a path, directory, glob or Hub dataset name ("owner/name[:config]")."""
    if spec is None:
        files = stdlib_sources()
        return Corpus("the standard library's Python sources", fingerprint_files(files), files)
    if not spec.strip():
        raise UserError("--data is empty")
    files = local_files(spec)
    if not files and looks_local(spec):
        raise UserError(f"no files found at {spec}")
    if not files:
        if spec.count("/") != 1:  # Hub names are owner/name
            raise UserError(f"{spec} is neither a local path nor a Hub dataset name (owner/name)")
        return Corpus(spec, hashlib.sha256(f"hub:{spec}".encode()).hexdigest()[:16], hub_name=spec)
    for f in files:
        if not os.access(f, os.R_OK):
            raise UserError(f"cannot read {f}: permission denied")
    return Corpus(spec, fingerprint_files(files), files)


def nonempty(corpus: Corpus, docs: Iterator[str]) -> Iterator[str]:
    """The documents, after checking (before any progress bar is drawn) that there is one."""
    first = next(docs, None)
    if first is None:
        raise UserError(f"corpus {corpus.name} has no documents (all files are empty)")
    return itertools.chain([first], docs)


# --- caches ------------------------------------------------------------------------------

@contextlib.contextmanager
def cache_entry(folder: Path):
    """Holds the lock of a cache entry (cache_dir/<kind>/<key>, locked as cache_dir/.locks/<kind>-<key>)
    while the block checks or builds it."""
    locks = folder.parent.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{folder.parent.name}-{folder.name}"
    held = lock(path, wait=False)
    if held is None:
        print(f"waiting for another process to build {folder} ({lock_holder(path)})")
        held = lock(path, wait=True)
    with held:
        held.write_holder()
        yield held


def digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def write_meta(folder: Path, meta: dict, files: list[str]):
    """meta.json: what the entry holds, each file's size and checksum, and its own checksum."""
    meta = {**meta, "files": {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
                              for name in files}}
    write_json(folder / "meta.json", {**meta, "sha256": digest(meta)})


def cache_problem(folder: Path, checksum: bool) -> str | None:
    """What is wrong with a cache entry, or None: sizes always, file contents when checksum."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        recorded = meta.pop("sha256")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return "meta.json is missing or unreadable"
    if recorded != digest(meta):
        return "meta.json does not match its checksum"
    for name, record in meta["files"].items():
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != record["bytes"]:
            return f"{name} holds {'no file' if size is None else f'{size:,} bytes'}, {record['bytes']:,} when written"
        if checksum and sha256_file(path) != record["sha256"]:
            return f"{name} does not match its checksum"
    return None


def reusable(folder: Path, checksum: bool, what: str) -> bool:
    """Whether a cache entry that exists is whole; a damaged one is removed, with a note."""
    problem = cache_problem(folder, checksum)
    if problem is None:
        return True
    print(f"note: the cached {what} in {folder} failed its check ({problem}): building it again", file=sys.stderr)
    shutil.rmtree(folder)
    return False


# --- tokenizer ----------------------------------------------------------------------------

TOKENIZER_FORMAT = 2  # part of the cache key: entries without checksums are not read


def train_or_load_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: Path, max_bytes: int,
                            checksum: bool = True) -> Tokenizer:
    """Train a tokenizer on (the first max_bytes of) the corpus, or reuse the cached one."""
    key = f"{corpus.fingerprint}:{vocab_size}:{max_bytes}:{TOKENIZER_FORMAT}"
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_dir / "tokenizers" / key
    with cache_entry(folder):
        if folder.exists() and reusable(folder, checksum, "tokenizer"):
            return Tokenizer.from_file(folder / "tokenizer.json")
        docs = tqdm(nonempty(corpus, corpus.documents(max_bytes)), desc="training tokenizer", unit=" docs", leave=False)
        tokenizer = Tokenizer.train(docs, vocab_size)
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save(folder / "tokenizer.json")
        write_meta(folder, {"corpus": corpus.name, "vocab_size": vocab_size}, ["tokenizer.json"])
    print(f"trained a tokenizer of {tokenizer.vocab_size:,} tokens on {corpus.name} (cached in {folder})")
    return tokenizer


# --- packed token files -----------------------------------------------------------------------

TOKENS_FORMAT = 3  # part of the cache key: caches written by an older layout are not read
MIN_VAL_DOCS = 10  # fewer validation documents than this, and the split is by tokens instead
PIECE_CHARS = 1 << 20  # longer documents are encoded in pieces (in parallel, in bounded memory)


def is_validation(doc_index: int, val_fraction: float) -> bool:
    """Every (1/val_fraction)-th document, starting with the first."""
    return math.ceil((doc_index + 1) * val_fraction) > math.ceil(doc_index * val_fraction)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


@dataclass
class TokenSplits:
    train: np.ndarray  # memory-mapped, read-only
    val: np.ndarray
    meta: dict
    how: str  # how validation was taken, for the log


def prepare_tokens(corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path, val_fraction: float,
                   checksum: bool = True) -> Path:
    """Tokenize the corpus into cache_dir/tokens/<key>/, unless already there (and whole: sizes
    always, contents too when checksum); returns that folder.

    A corpus of many documents is split by document (every 1/val_fraction-th one to validation:
    train.bin, val.bin). One with fewer than MIN_VAL_DOCS / val_fraction documents (one text file,
    a few books) is kept whole in corpus order (tokens.bin) and split by tokens when loaded.
    """
    if tokenizer.eot_id is None:
        raise UserError("the tokenizer has no end-of-sequence token to separate documents with "
                        "(name one in a tokenizer_config.json beside its tokenizer.json)")
    key = f"{corpus.fingerprint}:{tokenizer.fingerprint()}:{val_fraction}:{TOKENS_FORMAT}"
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    final = cache_dir / "tokens" / key
    with cache_entry(final) as held:
        if final.exists() and reusable(final, checksum, "tokens"):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        if held.fd is not None:  # a crashed builder's leftovers; without a lock they may be another's work
            for old in final.parent.glob(f".{key}.*"):
                shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}."))
        try:
            meta = write_tokens(corpus, tokenizer, tmp, val_fraction)
            write_meta(tmp, {**meta, "corpus": corpus.name}, sorted(p.name for p in tmp.glob("*.bin")))
            try:
                os.rename(tmp, final)  # atomic; fails if another process finished first (no working lock)
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    total = meta.get("tokens", meta.get("train_tokens", 0) + meta.get("val_tokens", 0))
    print(f"tokenized {corpus.name}: {total:,} tokens (cached in {final})")
    return final


def pieces(docs: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """(text, ends a document): long documents cut after a newline between two non-space
    characters, where byte-level pre-tokenizers would split anyway."""
    for doc in docs:
        while len(doc) > PIECE_CHARS:
            cut = doc.rfind("\n", PIECE_CHARS // 2, PIECE_CHARS)
            while cut > 0 and (doc[cut - 1].isspace() or doc[cut + 1 : cut + 2].isspace()):
                cut = doc.rfind("\n", PIECE_CHARS // 2, cut)
            cut = cut + 1 if cut > 0 else PIECE_CHARS
            yield doc[:cut], False
            doc = doc[cut:]
        yield doc, True


class TokenWriter:
    """Appends each document's tokens and a separator, first to tokens.bin in corpus order; once
    there are enough documents for a split by document, to train.bin and val.bin instead."""

    def __init__(self, out: Path, tokenizer: Tokenizer, val_fraction: float):
        self.out, self.val_fraction = out, val_fraction
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.eot = np.array([tokenizer.eot_id], dtype=self.dtype).tobytes()
        self.doc_lengths = []  # of the documents in tokens.bin
        self.docs = 0
        self.stream = open(out / "tokens.bin", "wb")
        self.splits = None  # {"train": file, "val": file} once splitting by document
        self.counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents

    def add(self, ids: list[int], ends_doc: bool):
        data = np.asarray(ids, dtype=self.dtype).tobytes() + (self.eot if ends_doc else b"")
        n = len(ids) + ends_doc
        if self.splits is None:
            self.stream.write(data)
            if not self.doc_lengths or self.doc_lengths[-1][1]:
                self.doc_lengths.append([0, False])
            self.doc_lengths[-1][0] += n
            self.doc_lengths[-1][1] = ends_doc
        else:
            split = "val" if is_validation(self.docs, self.val_fraction) else "train"
            self.splits[split].write(data)
            self.counts[split][0] += n
            self.counts[split][1] += ends_doc
        self.docs += ends_doc
        if self.splits is None and self.docs >= math.ceil(MIN_VAL_DOCS / self.val_fraction):
            self._split_by_document()

    def _split_by_document(self):
        """Enough documents: move the ones so far from tokens.bin into train.bin and val.bin."""
        self.stream.close()
        self.splits = {name: open(self.out / f"{name}.bin", "wb") for name in ("train", "val")}
        stream = map_tokens(self.out / "tokens.bin", self.dtype)
        start = 0
        for doc, (length, _) in enumerate(self.doc_lengths):
            split = "val" if is_validation(doc, self.val_fraction) else "train"
            self.splits[split].write(stream[start : start + length].tobytes())
            self.counts[split][0] += length
            self.counts[split][1] += 1
            start += length
        os.unlink(self.out / "tokens.bin")

    def close(self) -> dict:
        if self.splits is None:
            self.stream.close()
            total = sum(length for length, _ in self.doc_lengths)
            return {"split": "tokens", "tokens": total, "documents": self.docs}
        for f in self.splits.values():
            f.close()
        return {"split": "documents", **{f"{split}_tokens": n for split, (n, _) in self.counts.items()},
                **{f"{split}_documents": d for split, (_, d) in self.counts.items()}}


def write_tokens(corpus: Corpus, tokenizer: Tokenizer, out: Path, val_fraction: float) -> dict:
    writer = TokenWriter(out, tokenizer, val_fraction)
    docs = nonempty(corpus, corpus.documents())
    bar = tqdm(desc="tokenizing", unit=" docs", leave=False)
    for batch in batched_by_bytes(pieces(docs), BATCH_BYTES):
        for ids, (_, ends_doc) in zip(tokenizer.encode_corpus([text for text, _ in batch]), batch):
            writer.add(ids, ends_doc)
        bar.update(sum(ends_doc for _, ends_doc in batch))
    bar.close()
    meta = writer.close()
    return {**meta, "dtype": np.dtype(writer.dtype).name, "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.fingerprint(), "val_fraction": val_fraction}


def batched_by_bytes(items: Iterator, max_bytes: int) -> Iterator[list]:
    """Consecutive items (texts, or tuples whose first element is the text) of about max_bytes in all."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item if isinstance(item, str) else item[0])
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def map_tokens(path: Path, dtype: str) -> np.ndarray:
    # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


def split_tokens(directory: Path, block_size: int) -> TokenSplits:
    """The training and validation tokens of a prepared corpus, each at least one window of
    block_size + 1 tokens long whenever the corpus holds two such windows.

    By document where there are enough documents and both splits hold a window; otherwise the
    last val_fraction of the token stream (at least one window) is validation, as nanoGPT's
    90/10 split of one text file.
    """
    meta = json.loads((directory / "meta.json").read_text())
    window = block_size + 1
    if meta["split"] == "documents":
        train, val = (map_tokens(directory / f"{split}.bin", meta["dtype"]) for split in ("train", "val"))
        if len(train) >= window and len(val) >= window:
            how = f"{meta['val_documents']:,} of {meta['val_documents'] + meta['train_documents']:,} documents"
            return TokenSplits(train, val, meta, how)
        stream = np.concatenate([train, val])  # a small corpus (its validation documents hold no window)
    else:
        stream = map_tokens(directory / "tokens.bin", meta["dtype"])
    n_val = max(math.ceil(meta["val_fraction"] * len(stream)), window)
    if len(stream) - n_val < window:
        raise UserError(f"the corpus has {len(stream):,} tokens, too few for one training and one validation window "
                        f"of block_size+1 = {window} tokens each (at least {2 * window:,} are needed): "
                        "use more data or a smaller block_size")
    how = f"the last {n_val:,} tokens ({n_val / len(stream):.1%} of the token stream)"
    return TokenSplits(stream[:-n_val], stream[-n_val:], meta, how)


# --- windows -------------------------------------------------------------------------------------

def train_windows(tokens: np.ndarray, block_size: int, batch_size: int, seed: int, step: int, index: int) -> np.ndarray:
    """(batch_size, block_size + 1) random windows, a pure function of (seed, step, index)."""
    rng = np.random.default_rng([seed, step, index])
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    return tokens[starts[:, None] + np.arange(block_size + 1)]


def eval_windows(tokens: np.ndarray, block_size: int, count: int) -> np.ndarray:
    """`count` windows evenly spread over the split: the same tokens at every evaluation."""
    starts = np.linspace(0, len(tokens) - block_size - 1, num=count).astype(np.int64)
    return tokens[starts[:, None] + np.arange(block_size + 1)]
