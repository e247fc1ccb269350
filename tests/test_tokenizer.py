"""The byte-level BPE tokenizer: lossless on any text, trained by `tokenizers`."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.errors import UserError
from llm.tokenizer import EOT, Tokenizer

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
