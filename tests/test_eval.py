"""Bits per byte and `python -m llm.eval`: bytes counted exactly for each tokenizer family, a
model with a known loss gives the known figures, every token is predicted once, Hugging Face
directories evaluate as transformers computes, bad input is one line."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from llm.eval import bits_per_byte, evaluate_tokens, main, tokenize_text, target_bytes, windows
from llm.model.tokenizer import Tokenizer
from tests.helpers import tiny_model

ROOT = Path(__file__).resolve().parent.parent
TEXT = "def greet(name):\n    return f'héllo {name} 🐍 你好'\n\nclass Box:\n    pass\n" * 10
SPECIALS = ["<unk>", "<s>", "</s>"]
DOCUMENTS = ["def f(x):\n    return x * 2  # héllo\n", "print('🐍 你好, wörld')\n" * 3, "class Box:\n    pass\n\n"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine each parallel region waits
    for a descheduled thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sentencepiece_style(legacy: bool) -> Tokenizer:
    """BPE with byte fallback, "▁" for spaces and a BOS template, as Llama 2 and Mistral ship:
    legacy (Llama 2's first tokenizer.json) prepends "▁" in the normalizer, otherwise a Metaspace
    pre-tokenizer prepends it unless the text starts with a space."""
    def configure(tok):
        if legacy:
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        return tok

    learner = configure(HFTokenizer(models.BPE()))
    learner.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=120, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    # SentencePiece's layout: specials, the 256 byte tokens, then the learned pieces
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = configure(HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(tok, eos="</s>")


FAMILIES = {
    "byte-level": lambda: Tokenizer.train([TEXT], vocab_size=300),
    "metaspace": lambda: sentencepiece_style(legacy=False),
    "legacy-sentencepiece": lambda: sentencepiece_style(legacy=True),
}
TOKENIZERS = {name: build() for name, build in FAMILIES.items()}


def text_bytes(family: str, text: str) -> int:
    """What target_bytes must count for a document: its UTF-8 bytes, less the leading space that a
    Metaspace tokenizer cannot tell from the one it prepends (its decoder drops it too)."""
    return len(text.encode()) - (family == "metaspace" and text.startswith(" "))


def texts(family: str):
    # "▁" is a space to SentencePiece-style tokenizers: text holding one does not round-trip
    if family == "byte-level":
        return st.text()
    return st.text(st.characters(exclude_categories=("Cs",), exclude_characters="▁"))


# --- counting bytes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_target_bytes_count_the_text(family, data):
    tokenizer = TOKENIZERS[family]
    text = data.draw(texts(family))
    ids = tokenizer.encode_corpus([text])[0]
    row = [tokenizer.eot_id] + ids  # as in the token stream: the document follows an EOS
    assert target_bytes(tokenizer, [row]) == text_bytes(family, text)
    assert target_bytes(tokenizer, [row]) == len(tokenizer.hf.decode(ids, skip_special_tokens=True).encode())


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_windows_split_anywhere_add_up_to_the_text(family, data):
    """Windows cut characters apart (byte tokens of one character land in two windows): their
    byte counts still add up to the text's."""
    tokenizer = TOKENIZERS[family]
    documents = data.draw(st.lists(texts(family), min_size=1, max_size=4))
    stream = [tokenizer.eot_id]
    for ids in tokenizer.encode_corpus(documents):
        stream += ids + [tokenizer.eot_id]
    block_size = data.draw(st.integers(1, len(stream)))
    expected = sum(text_bytes(family, d) for d in documents)
    assert target_bytes(tokenizer, windows(np.array(stream), block_size)) == expected


def test_bits_per_byte():
    assert bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)


# --- the command line ---------------------------------------------------------------------------------------

def write_run(path: Path, model, tokenizer: Tokenizer) -> Path:
    """A checkpoint directory as train.py writes it."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(model.config.__dict__))
    tokenizer.save(path / "tokenizer.json")
    return path


def write_documents(path: Path, documents: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(documents):
        (path / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    return path


def parse(out: str) -> dict:
    number = lambda key: re.search(rf"{key}: ([\d,.]+)", out).group(1).replace(",", "")
    return {"tokens": int(number("tokens")), "bytes": int(number("bytes")), "loss": float(number("loss")),
            "perplexity": float(number("perplexity")), "bpb": float(number("bits per byte"))}


def run_main(argv, capsys) -> dict:
    main([str(a) for a in argv])
    return parse(capsys.readouterr().out)


@pytest.mark.parametrize("family", ["byte-level", "metaspace"])
def test_uniform_model_has_the_known_bits_per_byte(family, tmp_path, capsys, seed):
    """Zero output weights: every prediction is uniform, loss = ln V per token, bits per byte =
    ln V · tokens / (ln 2 · bytes), with tokens and bytes counted here independently."""
    tokenizer = TOKENIZERS[family]
    model = tiny_model(seed, dtype=torch.float32, vocab_size=tokenizer.vocab_size, block_size=32, tie_embeddings=False)
    torch.nn.init.zeros_(model.output.weight)
    run = write_run(tmp_path / "run", model, tokenizer)
    data = write_documents(tmp_path / "data", DOCUMENTS)
    result = run_main(["--ckpt", run, "--data", data, "--block_size", 16, "--batch_size", 3], capsys)

    tokens = sum(len(ids) + 1 for ids in tokenizer.encode_corpus(DOCUMENTS))  # each document, then EOS
    n_bytes = sum(len(d.encode()) for d in DOCUMENTS)
    vocab = tokenizer.vocab_size
    assert (result["tokens"], result["bytes"]) == (tokens, n_bytes)
    assert result["loss"] == pytest.approx(math.log(vocab), abs=1e-6)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert result["bpb"] == pytest.approx(math.log(vocab) * tokens / (math.log(2) * n_bytes), abs=1e-6)


def per_token_model(seed, tokenizer):
    """A model whose prediction depends on the current token only (attention's output projection
    zeroed, no position embedding): its loss over a stream does not depend on how it is windowed."""
    model = tiny_model(seed, dtype=torch.float32, vocab_size=tokenizer.vocab_size, block_size=32)
    for block in model.layers:
        torch.nn.init.zeros_(block.attention.wo.weight)
    return model


@pytest.mark.parametrize("block_size, batch_size, max_tokens", [(7, 3, None), (1, 5, None), (32, 2, None), (5, 2, 23)])
def test_every_token_is_predicted_once(block_size, batch_size, max_tokens, tmp_path, seed):
    tokenizer = TOKENIZERS["byte-level"]
    model = per_token_model(seed, tokenizer)
    data = write_documents(tmp_path / "data", DOCUMENTS)
    stream, documents = tokenize_text(str(data), tokenizer, max_tokens)
    expected, starts = [tokenizer.eot_id], []
    for ids in tokenizer.encode_corpus(DOCUMENTS):
        starts.append(len(expected))
        expected += ids + [tokenizer.eot_id]
    expected = expected[: None if max_tokens is None else max_tokens + 1]
    assert stream.tolist() == expected
    assert documents == sum(start < len(expected) for start in starts)  # those at least partly evaluated

    nats, count = evaluate_tokens(model, stream, block_size, batch_size)
    with torch.no_grad():  # each token alone, as a batch of one-token sequences
        tokens = torch.tensor(expected)
        direct = F.cross_entropy(model(tokens[:-1, None])[:, 0], tokens[1:], reduction="sum").item()
    assert count == len(expected) - 1
    assert nats == pytest.approx(direct, rel=1e-6)


def test_command_on_a_run_directory(tmp_path, seed):
    """`python -m llm.eval` end to end, on the per-token model: the loss printed is the direct one."""
    tokenizer = TOKENIZERS["byte-level"]
    model = per_token_model(seed, tokenizer)
    run = write_run(tmp_path / "run", model, tokenizer)
    data = write_documents(tmp_path / "data", DOCUMENTS)
    result = subprocess.run([sys.executable, "-m", "llm.eval", "--ckpt", str(run), "--data", str(data / "*.txt"),
                             "--block_size", "9", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    tokens = torch.tensor(tokenize_text(str(data), tokenizer)[0])
    with torch.no_grad():
        loss = F.cross_entropy(model(tokens[:-1, None])[:, 0], tokens[1:]).item()
    printed = parse(result.stdout)
    assert printed["loss"] == pytest.approx(loss, abs=2e-6)
    assert printed["tokens"] == len(tokens) - 1
    assert "3 documents" in result.stdout


def test_hugging_face_llama_directory(tmp_path, capsys, seed):
    """A transformers LlamaForCausalLM directory: the loss is the one transformers computes."""
    tokenizer = TOKENIZERS["byte-level"]
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, eos_token_id=tokenizer.eot_id,
                                      bos_token_id=tokenizer.eot_id)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.1)  # confident, varied predictions rather than near-uniform ones
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf" / "tokenizer.json")
    data = write_documents(tmp_path / "data", DOCUMENTS[:2])
    result = run_main(["--ckpt", tmp_path / "hf", "--data", data], capsys)  # one window: the stream fits in 128

    stream, _ = tokenize_text(str(data), tokenizer)
    assert len(stream) <= 129
    with torch.no_grad():
        tokens = torch.tensor(stream)[None]
        expected = F.cross_entropy(hf(tokens[:, :-1]).logits[0], tokens[0, 1:]).item()
    assert result["tokens"] == len(stream) - 1
    assert result["loss"] == pytest.approx(expected, abs=1e-5)  # logits agree to ~3e-6 (tests/test_hf.py)


# --- bad input -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tokenizer = TOKENIZERS["byte-level"]
    path = tmp_path_factory.mktemp("eval")
    write_run(path / "run", tiny_model(0, dtype=torch.float32, vocab_size=tokenizer.vocab_size, block_size=32),
              tokenizer)
    write_documents(path / "data", DOCUMENTS)
    (path / "empty").mkdir()
    (path / "empty" / "a.txt").write_text("")
    return path


GOOD = ["--ckpt", "{p}/run", "--data", "{p}/data"]


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "{p}/missing", "--data", "{p}/data"], "checkpoint {p}/missing does not exist or is not a directory"),
    (["--ckpt", "{p}/data", "--data", "{p}/data"], "{p}/data holds no checkpoint (no config.json"),
    (["--ckpt", "{p}/run", "--data", "{p}/nothing-here"], "no files found at {p}/nothing-here"),
    (["--ckpt", "{p}/run", "--data", "{p}/empty"], "{p}/empty holds no text"),
    (GOOD + ["--block_size", "0"], "argument --block_size: expects a positive integer, got '0'"),
    (GOOD + ["--batch_size", "x"], "argument --batch_size: expects a positive integer, got 'x'"),
    (GOOD + ["--max_tokens", "-5"], "argument --max_tokens: expects a positive integer, got '-5'"),
    (GOOD + ["--block_size", "33"], "--block_size 33 exceeds the model's context of 32"),
    (GOOD + ["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (GOOD + ["--device", "nonsense"], "--device nonsense:"),
    (["--ckpt", "{p}/run"], "the following arguments are required: --data"),
])
def test_bad_input_is_one_line(small_run, args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main([a.format(p=small_run) for a in args])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {message.format(p=small_run)}"), err
