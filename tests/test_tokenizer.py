"""Tokenizers: ours (byte-level BPE) is lossless on any text; every family streams its text exactly."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from llm.errors import UserError
from llm.model.tokenizer import EOT, StreamDecoder, Tokenizer

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "# 中文注释 and émojis 🐍🚀 in a comment\nprint('héllo wörld')\n",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, vocab_size=400)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_arbitrary_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", ["", " ", "\x00\x01\r\n\t", "🐍" * 7, "日本語のテキスト", "a<|endoftext|>b", "  two  spaces  ",
                                  "\U0010ffff\ufffd", "e\u0301 vs é"])  # combining marks are not normalized away
def test_round_trip_edge_cases(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocabulary_and_separator(tokenizer):
    assert 257 < tokenizer.vocab_size <= 400  # 256 bytes + separator + merges (a small corpus runs out of pairs)
    assert tokenizer.hf.token_to_id(EOT) == tokenizer.eot_id
    assert tokenizer.encode(EOT) == [tokenizer.eot_id]
    # merges were learned: frequent words take fewer tokens than bytes
    assert len(tokenizer.encode("    return a + b\n")) < len("    return a + b\n".encode()) / 2


def test_save_load_same_encoding(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    text = "".join(CORPUS[:3])
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_batch_encoding_matches_single(tokenizer):
    texts = CORPUS[:3] + ["", "x"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_corrupt_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


# ---------------------------------------------------------------- tokenizer families and streaming

FAMILY_CORPUS = CORPUS + ["The quick brown fox jumps over the lazy dog. Hello world again!\n\tx = [1, 2]  # ok?\n"] * 20


def sentencepiece_style(texts, legacy: bool = False) -> Tokenizer:
    """The Llama-2 / Mistral / TinyLlama layout: <unk> <s> </s>, then the 256 byte tokens <0x00> ...
    <0xFF>, then BPE pieces with "▁" for spaces; byte fallback for characters outside the vocabulary;
    BOS added by the template. legacy: the older conversion (a normalizer prepends "▁", the decoder
    replaces, fuses and strips); else a Metaspace pre-tokenizer and Metaspace decoder."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([t.encode("ascii", "ignore").decode() for t in texts], trainer)  # the rest: bytes
    spec = json.loads(tok.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    spec["model"]["vocab"] = vocab
    tok = HFTokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(tok, eos="</s>")


def with_added_tokens(texts) -> Tokenizer:
    """Byte-level BPE with chat-style special tokens and a plain added token (Qwen / Llama-3 style)."""
    tokenizer = Tokenizer.train(texts, vocab_size=400)
    tokenizer.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.hf.add_tokens([AddedToken("<tool>", special=False), AddedToken(" lazy dog", special=False)])
    return tokenizer


FAMILIES = {
    "byte_level": lambda: Tokenizer.train(FAMILY_CORPUS, vocab_size=400),
    "sentencepiece": lambda: sentencepiece_style(FAMILY_CORPUS),
    "sentencepiece_legacy": lambda: sentencepiece_style(FAMILY_CORPUS, legacy=True),
    "added_tokens": lambda: with_added_tokens(FAMILY_CORPUS),
}
# Prompts and completions: words, spaces, newlines, characters outside small vocabularies, specials.
PIECES = ["Hello", " world", " again", "x", " ", "  ", "\n", "\t", "é", "🐍", "中文", "dog", ".", "<s>", "</s>",
          "<|im_end|>", "<tool>", " lazy dog", "<0x41>"]
texts = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return FAMILIES[request.param]()


def streamed(tokenizer, prompt_ids, ids) -> list[str]:
    decoder = StreamDecoder(tokenizer, prompt_ids)
    return [decoder.add(i) for i in ids] + [decoder.finish()]


def assert_follows_prompt(tokenizer, prompt_ids, ids, text):
    """What the completion adds to the prompt when both are decoded together, character for character."""
    full, head = tokenizer.decode(prompt_ids + ids), tokenizer.decode(prompt_ids)
    if full.startswith(head):  # (invalid bytes at the seam can rewrite the prompt's end: nothing to follow)
        assert full == head + text, (head, full, text)


@settings(max_examples=150, deadline=None)
@given(prompt=texts, completion=texts)
def test_streamed_text_is_the_full_decode(family, prompt, completion):
    prompt_ids = family.encode(prompt)
    ids = family.hf.encode(completion, add_special_tokens=False).ids
    pieces = streamed(family, prompt_ids, ids)
    assert_follows_prompt(family, prompt_ids, ids, "".join(pieces))
    assert not any("\ufffd" in p for p in pieces)  # never a split character


@settings(max_examples=150, deadline=None)
@given(prompt=texts, data=st.data())
def test_streamed_text_of_any_tokens_is_the_full_decode(family, prompt, data):
    """What an untrained model emits: any ids, byte tokens that form no character, specials."""
    ids = data.draw(st.lists(st.integers(0, family.vocab_size - 1), max_size=16))
    prompt_ids = family.encode(prompt)
    assert_follows_prompt(family, prompt_ids, ids, "".join(streamed(family, prompt_ids, ids)))


def test_sentencepiece_streaming_keeps_spaces():
    """The reported failure: each token decoded alone loses its leading "▁" space."""
    tokenizer = sentencepiece_style(FAMILY_CORPUS)
    ids = tokenizer.hf.encode(" world again", add_special_tokens=False).ids
    assert tokenizer.hf.id_to_token(ids[0]).startswith("▁") and tokenizer.decode(ids[:1]) == "world"
    assert "".join(streamed(tokenizer, tokenizer.encode("Hello"), ids)) == " world again"
    byte_run = tokenizer.hf.encode(" 🐍", add_special_tokens=False).ids  # "▁" and four byte tokens
    assert sum(i in tokenizer.byte_fallback_ids for i in byte_run) == 4
    assert "".join(streamed(tokenizer, tokenizer.encode("Hello"), byte_run)) == " 🐍"


@pytest.mark.parametrize("name, eos", [("byte_level", EOT), ("sentencepiece", "</s>"), ("added_tokens", EOT)])
def test_end_of_sequence_is_found_in_every_family(tmp_path, name, eos):
    FAMILIES[name]().save(tmp_path / "tokenizer.json")
    assert Tokenizer.from_file(tmp_path).eos == eos


def without_eos(texts) -> Tokenizer:
    """Byte-level BPE with no special token at all, as some base models ship."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(tokenizer, eos=None)


def test_no_end_of_sequence_token(tmp_path):
    without_eos(CORPUS).save(tmp_path / "tokenizer.json")
    assert Tokenizer.from_file(tmp_path).eot_id is None
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 10**6}))  # named, but not in the vocabulary
    with pytest.raises(UserError, match="eos_token_id 1000000 is not in tokenizer.json's vocabulary"):
        Tokenizer.from_file(tmp_path)
