"""Corpora -> packed token files -> training windows.

1. `open_corpus` names a stream of documents, read through Hugging Face `datasets`
   (local text/code files as one document per file, .jsonl/.json/.parquet rows with
   a `text` field, or a Hub dataset), by default the running interpreter's standard
   library sources.
2. `prepare_tokens` tokenizes that stream in parallel batches into two flat token
   files (train and validation, split by document) with `<|endoftext|>` after each
   document, written incrementally and cached by corpus and tokenizer fingerprint.
3. `train_windows` draws random windows of block_size + 1 tokens from a generator
   seeded by (seed, step, micro-batch index): any run that reaches a step sees the
   same data there, whether resumed or spread over more processes.
"""
import glob
import hashlib
import itertools
import json
import math
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llm.errors import UserError
from llm.tokenizer import Tokenizer

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


def open_corpus(spec: str | None) -> Corpus:
    """A corpus from a path, directory, glob or Hub dataset name ("owner/name[:config]")."""
    if spec is None:
        files = stdlib_sources()
        return Corpus("the standard library's Python sources", fingerprint_files(files), files)
    if not spec.strip():
        raise UserError("--data is empty")
    files = local_files(spec)
    looks_local = os.path.exists(os.path.expanduser(spec)) or glob.has_magic(spec) or spec.startswith((".", "/", "~"))
    if not files and looks_local:
        raise UserError(f"no files found at {spec}")
    if not files:
        if spec.count("/") != 1:  # Hub names are owner/name
            raise UserError(f"{spec} is neither a local path nor a Hub dataset name (owner/name)")
        return Corpus(spec, hashlib.sha256(f"hub:{spec}".encode()).hexdigest()[:16], hub_name=spec)
    for f in files:
        if not os.access(f, os.R_OK):
            raise UserError(f"cannot read {f}: permission denied")
    return Corpus(spec, fingerprint_files(files), files)


# --- tokenizer ----------------------------------------------------------------------------

def train_or_load_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: Path, max_bytes: int) -> Tokenizer:
    """Train a tokenizer on (the first max_bytes of) the corpus, or reuse the cached one."""
    key = hashlib.sha256(f"{corpus.fingerprint}:{vocab_size}:{max_bytes}".encode()).hexdigest()[:16]
    path = cache_dir / "tokenizers" / key / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(path)
    docs = tqdm(corpus.documents(max_bytes), desc="training tokenizer", unit=" docs", leave=False)
    tokenizer = Tokenizer.train(docs, vocab_size)
    if docs.n == 0:
        raise UserError(f"corpus {corpus.name} has no documents (all files are empty)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(path)
    return tokenizer


# --- packed token files -----------------------------------------------------------------------

def is_validation(doc_index: int, val_fraction: float) -> bool:
    """Every (1/val_fraction)-th document, starting with the first, so validation is never empty."""
    return math.ceil((doc_index + 1) * val_fraction) > math.ceil(doc_index * val_fraction)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


@dataclass
class TokenSplits:
    train: np.ndarray  # memory-mapped, read-only
    val: np.ndarray
    meta: dict


def prepare_tokens(corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path, val_fraction: float) -> TokenSplits:
    """Tokenize the corpus into cache_dir/tokens/<key>/{train,val}.bin, unless already there."""
    key = hashlib.sha256(f"{corpus.fingerprint}:{tokenizer.fingerprint()}:{val_fraction}".encode()).hexdigest()[:16]
    final = cache_dir / "tokens" / key
    if not (final / "meta.json").exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}."))
        try:
            meta = write_tokens(corpus, tokenizer, tmp, val_fraction)
            meta["corpus"] = corpus.name
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            try:
                os.rename(tmp, final)  # atomic; fails if another process finished first
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokens(final)


def write_tokens(corpus: Corpus, tokenizer: Tokenizer, out: Path, val_fraction: float) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    with open(out / "train.bin", "wb") as train_f, open(out / "val.bin", "wb") as val_f:
        files = {"train": train_f, "val": val_f}
        bar = tqdm(desc="tokenizing", unit=" docs", leave=False)
        doc_index = 0
        for batch in batched_by_bytes(corpus.documents(), BATCH_BYTES):
            for ids in tokenizer.encode_batch(batch):
                split = "val" if is_validation(doc_index, val_fraction) else "train"
                files[split].write(np.asarray(ids, dtype=dtype).tobytes() + eot.tobytes())
                counts[split][0] += len(ids) + 1
                counts[split][1] += 1
                doc_index += 1
            bar.update(len(batch))
        bar.close()
    if doc_index == 0:
        raise UserError(f"corpus {corpus.name} has no documents (all files are empty)")
    return {
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.fingerprint(),
        **{f"{split}_tokens": n for split, (n, _) in counts.items()},
        **{f"{split}_documents": d for split, (_, d) in counts.items()},
    }


def batched_by_bytes(docs: Iterator[str], max_bytes: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def load_tokens(directory: Path) -> TokenSplits:
    meta = json.loads((directory / "meta.json").read_text())
    splits = {}
    for split in ("train", "val"):
        n = meta[f"{split}_tokens"]
        # np.memmap cannot map an empty file
        splits[split] = np.memmap(directory / f"{split}.bin", dtype=meta["dtype"], mode="r") if n else np.zeros(0, meta["dtype"])
    return TokenSplits(splits["train"], splits["val"], meta)


# --- windows -------------------------------------------------------------------------------------

def check_length(tokens: np.ndarray, block_size: int, split: str):
    if len(tokens) < block_size + 1:
        raise UserError(
            f"the {split} split has {len(tokens)} tokens, fewer than block_size+1={block_size + 1}: "
            "use more data, a smaller block_size or (for validation) a larger val_fraction"
        )


def train_windows(tokens: np.ndarray, block_size: int, batch_size: int, seed: int, step: int, index: int) -> np.ndarray:
    """(batch_size, block_size + 1) random windows, a pure function of (seed, step, index)."""
    rng = np.random.default_rng([seed, step, index])
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    return tokens[starts[:, None] + np.arange(block_size + 1)]


def eval_windows(tokens: np.ndarray, block_size: int, count: int) -> np.ndarray:
    """`count` windows evenly spread over the split: the same tokens at every evaluation."""
    starts = np.linspace(0, len(tokens) - block_size - 1, num=count).astype(np.int64)
    return tokens[starts[:, None] + np.arange(block_size + 1)]
