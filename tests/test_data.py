"""Corpora, packed token files, the document split, the caches and the training windows."""
import json
import math
import os
import random

import numpy as np
import pytest

from llm.train import data
from llm.train.data import (batched_by_bytes, eval_windows, is_validation, open_corpus, prepare_tokens, split_tokens,
                      stdlib_sources, token_dtype, train_or_load_tokenizer, train_windows)
from llm.errors import UserError
from llm.model.tokenizer import Tokenizer


def make_docs(directory, n=30):
    directory.mkdir(parents=True, exist_ok=True)
    docs = [f"def function_{i}():\n    return {i} * 'doc{i:03d}'\n" for i in range(n)]
    for i, doc in enumerate(docs):
        (directory / f"file_{i:03d}.py").write_text(doc)
    return docs


@pytest.fixture
def corpus_dir(tmp_path):
    make_docs(tmp_path / "corpus")
    return tmp_path / "corpus"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([f"def function_{i}():\n    return {i} * 'doc{i:03d}'\n" for i in range(50)], 300)


def test_windows_are_a_function_of_seed_step_and_index(seed):
    tokens = np.arange(10_000, dtype=np.uint32)
    a = train_windows(tokens, 16, 8, seed, step=3, index=1)
    assert a.shape == (8, 17)
    assert np.array_equal(a, train_windows(tokens, 16, 8, seed, step=3, index=1))
    assert not np.array_equal(a, train_windows(tokens, 16, 8, seed, step=4, index=1))
    assert not np.array_equal(a, train_windows(tokens, 16, 8, seed, step=3, index=2))
    assert np.all(np.diff(a.astype(np.int64), axis=1) == 1)  # contiguous slices of the stream
    assert a.min() >= 0 and a.max() < len(tokens)


def test_windows_cover_the_whole_range(seed):
    tokens = np.arange(40, dtype=np.uint16)
    starts = {int(train_windows(tokens, 8, 16, seed, step, 0)[i, 0]) for step in range(50) for i in range(16)}
    assert starts == set(range(40 - 8))  # every start, including the last possible one


def test_eval_windows_are_fixed_and_in_range():
    tokens = np.arange(1000, dtype=np.uint16)
    w = eval_windows(tokens, 32, 10)
    assert np.array_equal(w, eval_windows(tokens, 32, 10))
    assert w[0, 0] == 0 and w[-1, -1] == 999


def split(corpus_dir, tokenizer, cache, val_fraction, block_size=8):
    return split_tokens(prepare_tokens(open_corpus(str(corpus_dir)), tokenizer, cache, val_fraction), block_size)


def documents(tokenizer, tokens) -> list[str]:
    eot = tokenizer.decode([tokenizer.eot_id])
    return tokenizer.decode(tokens.tolist()).split(eot)[:-1]


def test_many_documents_split_by_document(tmp_path, tokenizer):
    docs = make_docs(tmp_path / "corpus", n=60)  # at least MIN_VAL_DOCS / val_fraction documents
    splits = split(tmp_path / "corpus", tokenizer, tmp_path / "cache", 0.2)
    assert documents(tokenizer, splits.val) == [d for i, d in enumerate(docs) if is_validation(i, 0.2)]
    assert documents(tokenizer, splits.train) == [d for i, d in enumerate(docs) if not is_validation(i, 0.2)]
    assert splits.meta["val_documents"] == 12 and "12 of 60 documents" in splits.how
    assert splits.train.dtype == np.uint16 and splits.meta["train_tokens"] == len(splits.train)


@pytest.mark.parametrize("n_docs", [1, 3, 49])
def test_few_documents_split_by_tokens(tmp_path, tokenizer, n_docs):
    """One text file, a few books: the last val_fraction of the token stream, in corpus order."""
    docs = make_docs(tmp_path / "corpus", n=n_docs)
    splits = split(tmp_path / "corpus", tokenizer, tmp_path / "cache", 0.2, block_size=4)
    stream = np.concatenate([splits.train, splits.val])
    assert documents(tokenizer, stream) == docs
    assert len(splits.val) == max(math.ceil(0.2 * len(stream)), 5)
    assert "of the token stream" in splits.how


def test_validation_holds_a_window_whatever_the_fraction(tmp_path, tokenizer):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "one.py").write_text("".join(make_docs(tmp_path / "docs", n=10)))
    splits = split(tmp_path / "corpus", tokenizer, tmp_path / "cache", 0.01, block_size=12)
    assert len(splits.val) == 13 and len(splits.train) >= 13


def test_documents_too_short_for_a_validation_window_fall_back_to_tokens(tmp_path, tokenizer):
    docs = make_docs(tmp_path / "corpus", n=60)
    total = sum(len(tokenizer.encode(d)) + 1 for d in docs)
    splits = split(tmp_path / "corpus", tokenizer, tmp_path / "cache", 0.2, block_size=total // 4)
    assert len(splits.val) > total // 4 and len(splits.train) + len(splits.val) == total


def test_corpus_too_small_for_two_windows(tmp_path, tokenizer):
    make_docs(tmp_path / "corpus", n=2)
    with pytest.raises(UserError, match=r"the corpus has \d+ tokens, too few .* block_size\+1 = 1001 tokens each "
                                        r"\(at least 2,002 are needed\)"):
        split(tmp_path / "corpus", tokenizer, tmp_path / "cache", 0.1, block_size=1000)


def test_literal_separator_in_a_document_is_plain_text(tmp_path, tokenizer):
    """Only the pipeline inserts separators: a document that talks about <|endoftext|> is one document."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.py").write_text('EOT = "<|endoftext|>"  # the separator\n')
    (tmp_path / "corpus" / "b.py").write_text("x = 1\n")
    splits = split(tmp_path / "corpus", tokenizer, tmp_path / "cache", 0.1, block_size=4)
    stream = np.concatenate([splits.train, splits.val])
    assert (stream == tokenizer.eot_id).sum() == 2  # one after each document, none inside
    assert tokenizer.decode(stream.tolist()).count("<|endoftext|>") == 3


def test_long_documents_are_encoded_in_pieces(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 64)
    lines = [f"line_{i} = {i} * 'x'" + (" \n" if i % 3 == 0 else "\n") for i in range(200)]
    text = "".join(lines)
    cuts = [(piece, ends) for piece, ends in data.pieces(iter([text, "short"]))]
    assert "".join(p for p, _ in cuts[:-1]) == text and [e for _, e in cuts].count(True) == 2
    assert all(len(p) <= 64 and p.endswith("\n") and not p[-2].isspace() for p, _ in cuts[:-2])
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "big.txt").write_text(text)
    splits = split(tmp_path / "corpus", tokenizer, tmp_path / "cache", 0.1)
    assert documents(tokenizer, np.concatenate([splits.train, splits.val])) == [text]


def test_token_dtype():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_token_cache_is_reused_and_invalidated(corpus_dir, tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = split(corpus_dir, tokenizer, cache, 0.1)
    monkeypatch.setattr(data, "write_tokens", lambda *a: pytest.fail("cache not reused"))
    again = split(corpus_dir, tokenizer, cache, 0.1)
    assert np.array_equal(first.train, again.train)
    monkeypatch.undo()
    (corpus_dir / "file_000.py").write_text("changed = True\n")
    changed = split(corpus_dir, tokenizer, cache, 0.1)
    assert len(list((cache / "tokens").iterdir())) == 2
    assert not np.array_equal(first.train, changed.train)
    other = Tokenizer.train(["something else entirely"] * 5, 280)
    split(corpus_dir, other, cache, 0.1)
    assert len(list((cache / "tokens").iterdir())) == 3  # keyed by tokenizer too


def damage(path, how: str, rng: random.Random):
    """Cut the file short (anywhere, or at an element boundary of uint16 tokens) or flip one bit."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    else:
        cut = rng.randrange(1, len(data))
        data = data[: cut - cut % 2 if how == "cut at a token" else cut | 1]
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["cut mid-token", "cut at a token", "flip"])
def test_damaged_token_cache_is_rebuilt_not_read(tmp_path, tokenizer, capsys, how, seed):
    make_docs(tmp_path / "corpus", n=120)  # split by document: train.bin and val.bin
    clean = split(tmp_path / "corpus", tokenizer, tmp_path / "clean", 0.1)
    folder = prepare_tokens(open_corpus(str(tmp_path / "corpus")), tokenizer, tmp_path / "cache", 0.1)
    rng = random.Random(seed)
    damage(rng.choice(sorted(folder.glob("*.bin"))), how, rng)
    capsys.readouterr()
    again = split(tmp_path / "corpus", tokenizer, tmp_path / "cache", 0.1)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(f"note: the cached tokens in {folder} failed its check"), notes
    assert np.array_equal(again.train, clean.train) and np.array_equal(again.val, clean.val)
    assert again.meta == clean.meta  # the same token counts, the same checksums
    split(tmp_path / "corpus", tokenizer, tmp_path / "cache", 0.1)
    assert "note:" not in capsys.readouterr().err  # rebuilt whole: the next run reads it without a note


@pytest.mark.parametrize("how", ["cut mid-token", "flip"])
def test_damaged_tokenizer_cache_is_trained_again(corpus_dir, tmp_path, capsys, how, seed):
    corpus = open_corpus(str(corpus_dir))
    clean = train_or_load_tokenizer(corpus, 300, tmp_path / "clean", max_bytes=10**6)
    train_or_load_tokenizer(corpus, 300, tmp_path / "cache", max_bytes=10**6)
    damage(next((tmp_path / "cache").rglob("tokenizer.json")), how, random.Random(seed))
    capsys.readouterr()
    again = train_or_load_tokenizer(corpus, 300, tmp_path / "cache", max_bytes=10**6)
    assert capsys.readouterr().err.startswith("note: the cached tokenizer in ")
    assert again.fingerprint() == clean.fingerprint()


def test_tokenizer_is_trained_once_per_corpus(corpus_dir, tmp_path, monkeypatch):
    corpus = open_corpus(str(corpus_dir))
    first = train_or_load_tokenizer(corpus, 300, tmp_path, max_bytes=10**6)
    monkeypatch.setattr(Tokenizer, "train", lambda *a: pytest.fail("not reused"))
    assert train_or_load_tokenizer(corpus, 300, tmp_path, max_bytes=10**6).fingerprint() == first.fingerprint()


def test_row_formats_and_globs(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}", "id": i}) for i in range(3)))
    (tmp_path / "b.json").write_text(json.dumps([{"text": "json row"}]))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row", None, ""]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("whole\nfile\n")
    (tmp_path / ".hidden.txt").write_text("skipped")
    docs = list(open_corpus(str(tmp_path)).documents())
    assert docs == ["row 0", "row 1", "row 2", "json row", "parquet row", "whole\nfile\n"]
    assert list(open_corpus(str(tmp_path / "*.jsonl")).documents()) == ["row 0", "row 1", "row 2"]
    assert list(open_corpus(str(tmp_path / "d.txt")).documents()) == ["whole\nfile\n"]


def test_non_utf8_bytes_do_not_crash(tmp_path, tokenizer):
    (tmp_path / "latin1.py").write_bytes("# caf\xe9\nx = 1\n".encode("latin-1") + b"\xff\xfe\x00")
    docs = list(open_corpus(str(tmp_path)).documents())
    assert docs[0].startswith("# caf\ufffd\nx = 1\n")
    assert tokenizer.decode(tokenizer.encode(docs[0])) == docs[0]


def test_missing_text_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(UserError, match="no 'text' field"):
        list(open_corpus(str(tmp_path)).documents())


@pytest.mark.parametrize("spec, message", [
    ("/nonexistent/corpus", "no files found"),
    ("./missing_dir/*.txt", "no files found"),
    ("", "empty"),
    ("not a dataset name", "neither a local path"),
])
def test_bad_data_paths(spec, message):
    with pytest.raises(UserError, match=message):
        open_corpus(spec)


def test_empty_corpus(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="no documents"):
        split(tmp_path, tokenizer, tmp_path / "cache", 0.1)
    with pytest.raises(UserError, match="no documents"):
        train_or_load_tokenizer(open_corpus(str(tmp_path)), 300, tmp_path / "cache", 10**6)
    assert not list((tmp_path / "cache").rglob("*.json")) and not list((tmp_path / "cache").rglob("*.bin"))


def test_unreadable_file(tmp_path, monkeypatch):
    (tmp_path / "secret.txt").write_text("x")
    monkeypatch.setattr(data.os, "access", lambda path, mode: False)  # root can read anything; pretend
    with pytest.raises(UserError, match="permission denied"):
        open_corpus(str(tmp_path))


def test_streaming_batches_are_bounded():
    docs = (f"{i:04d}" * 25 for i in range(10_000))  # a lazy stream of 100-character documents
    sizes = [sum(map(len, b)) for b in batched_by_bytes(docs, max_bytes=1000)]
    assert max(sizes) <= 1000 and sum(sizes) == 1_000_000


def test_default_corpus_is_the_stdlib():
    files = stdlib_sources()
    assert len(files) > 500
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)
    assert any(f.endswith(os.path.join("json", "__init__.py")) for f in files)
