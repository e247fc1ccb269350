"""GGUF, in and out: our models and every Hugging Face family round-trip through the gguf
package's writer and reader; q8_0 (and the other types we read) within their quantization
bounds; the tokenizer rebuilt from the metadata encodes and decodes as the original; the
commands take .gguf files; and, where llama-cpp-python is installed, llama.cpp itself runs
our export with our logits and greedy tokens."""
import json
import re
from pathlib import Path

import gguf
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

import llm
from llm.config import ModelConfig
from llm.errors import UserError
from llm.eval import main as eval_main
from llm.export import main as export_main
from llm.formats import gguf as gguf_format
from llm.formats import verify as verify_module
from llm.formats.gguf_tokenizer import add_tokenizer
from llm.formats.load import chat_template
from llm.infer.generate import Sampling, generate
from llm.model.tokenizer import EOT, Tokenizer
from llm.model.transformer import Transformer
from sample import main as sample_main
from tests.test_hf import FAMILY_CASES, LLAMA3, TEXT, make_family_dirs, our_model, write_run
from tests.helpers import fresh_seed
from train import main as train_main

QTYPE = gguf.GGMLQuantizationType
ROUND_TRIP_CASES = {
    "tied": dict(),
    "untied_bias": dict(tie_embeddings=False, bias=True),
    "qkv_bias": dict(qkv_bias=True, n_kv_head=1),
    "qk_norm": dict(qk_norm=True, head_dim=32, n_kv_head=4),
    "llama3": dict(rope_scaling=LLAMA3, block_size=128),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "linear_theta_eps": dict(rope_scaling={"rope_type": "linear", "factor": 2.5}, rope_theta=123456.0, norm_eps=1e-6),
    "window": dict(sliding_window=8),
}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT], vocab_size=300)


def export(ckpt: Path, out: Path, *extra) -> Path:
    assert export_main(["--ckpt", str(ckpt), "--out", str(out), *extra]) == 0
    return out


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
def test_ours_to_gguf_and_back_exactly(case, tokenizer, tmp_path, capsys, seed):
    """f32 GGUF -> llm.load: the very same weights, config, tokenizer and chat template."""
    model = our_model(tokenizer, **ROUND_TRIP_CASES[case])
    run = write_run(tmp_path / "run", model, tokenizer)
    (run / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    path = export(run, tmp_path / "model.gguf")
    warned = "note: llama.cpp ignores the sliding window of 8 tokens" in capsys.readouterr().err
    assert warned == (model.config.sliding_window is not None)
    reloaded, tok = llm.load(path)
    assert reloaded.config == model.config
    assert same_weights(reloaded.state_dict(), model.state_dict())
    assert tok.encode(TEXT) == tokenizer.encode(TEXT) and tok.eot_id == tokenizer.eot_id
    assert chat_template(path).source == chat_template(run).source
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "run"]  # no temporary file left


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    return make_family_dirs(tmp_path_factory, tokenizer)


@pytest.mark.parametrize("case", [*FAMILY_CASES, "qwen2_bf16_sharded"])
def test_hf_families_through_gguf(case, family_dirs, tmp_path):
    """Hugging Face directory -> GGUF (f32) -> ours: what loading the directory gives, exactly;
    the architecture llama.cpp needs for the family."""
    path = export(family_dirs[case], tmp_path / "model.gguf")
    direct, tokenizer = llm.load(family_dirs[case])
    through, tok = llm.load(path)
    assert through.config == direct.config
    assert same_weights(through.state_dict(), direct.state_dict())
    assert tok.encode(TEXT) == tokenizer.encode(TEXT)
    arch = gguf_format.reader(path).get_field(gguf.Keys.General.ARCHITECTURE).contents()
    assert arch == {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[
        FAMILY_CASES.get(case, ("qwen2",))[0]]


def block_error_bound(w: torch.Tensor, qtype) -> torch.Tensor:
    """The largest error each 32-weight block may have: half a quantization step (a whole one in
    Q4_0, whose codes reach -8 steps but only +7), plus the float16 rounding of the step (and of
    Q4_1's minimum) times the largest code."""
    blocks = w.reshape(-1, 32)
    if qtype == QTYPE.Q8_0:
        step, codes, rounding = blocks.abs().amax(dim=1) / 127, 127, 0.5
    elif qtype == QTYPE.Q4_0:
        step, codes, rounding = blocks.abs().amax(dim=1) / 8, 8, 1.0
    else:  # Q4_1: 16 levels up from the minimum
        step, codes, rounding = (blocks.amax(dim=1) - blocks.amin(dim=1)) / 15, 16, 0.5
    return (step * (rounding + codes * 2.0**-10) + blocks.abs().amax(dim=1) * 2.0**-10)[:, None].expand_as(blocks)


@pytest.mark.parametrize("qtype", [QTYPE.Q8_0, QTYPE.Q4_0, QTYPE.Q4_1, QTYPE.F16, QTYPE.BF16])
def test_quantized_tensors_read_within_their_bounds(qtype, tokenizer, tmp_path, monkeypatch, seed):
    """Each 2-D weight read back within its block's bound (F16 and BF16: exactly the rounded
    value); 1-D weights exact. Q8_0 is the export's own outtype; the others are written here only to
    be read."""
    model = our_model(tokenizer, tie_embeddings=False)
    outtype = qtype.name.lower()
    monkeypatch.setitem(gguf_format.OUTTYPES, outtype, (qtype, gguf.LlamaFileType.ALL_F32))
    path = tmp_path / "model.gguf"
    gguf_format.write_gguf(model, tokenizer, path, outtype)
    reloaded = gguf_format.load_model(path)
    for name, w in model.state_dict().items():
        got = reloaded.state_dict()[name]
        if w.dim() == 1:
            assert torch.equal(got, w), name
        elif qtype in (QTYPE.F16, QTYPE.BF16):
            assert torch.equal(got, w.to(torch.float16 if qtype == QTYPE.F16 else torch.bfloat16).float()), name
        else:
            error = (got - w).abs().reshape(-1, 32)
            assert (error <= block_error_bound(w, qtype)).all(), name
            assert error.max() > 0, name  # it was quantized


def test_q8_0_export_verifies(tokenizer, tmp_path, capsys, seed):
    """--verify reads the q8_0 file back: logits within the stated q8_0 tolerance (a freshly
    initialized model: random weights of 0.1 are rougher on quantization than trained ones)."""
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=4, d_model=64))
    run = write_run(tmp_path / "run", model, tokenizer)
    export(run, tmp_path / "model.gguf", "--outtype", "q8_0", "--verify")
    out = capsys.readouterr().out
    assert re.search(r"verify \(our gguf reader, q8_0\): max \|Δlogit\| = \S+ .*tolerance 0.05\).*: ok", out), out
    info = {t.name: t.tensor_type for t in gguf_format.reader(tmp_path / "model.gguf").tensors}
    assert info["blk.0.attn_q.weight"] == QTYPE.Q8_0 and info["blk.0.attn_norm.weight"] == QTYPE.F32


# ---------------------------------------------------------------- tokenizers

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def trained(pre_tokenizer, specials, normalizer=None, ignore_merges=False) -> HFTokenizer:
    """A small byte-level BPE set up as the family's tokenizer.json is (its regex copied from there)."""
    hf = HFTokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([TEXT * 3, "12345 numbers 2024 ümlaut ÆØÅ"], trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return hf


def llama3_style() -> Tokenizer:
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    hf = trained(pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                 ["<|begin_of_text|>", "<|end_of_text|>"], ignore_merges=True)
    spec = json.loads(hf.to_str())
    spec["model"]["vocab"]["Ġzzqq"] = len(spec["model"]["vocab"])  # no merges lead there: only ignore_merges finds it
    hf = HFTokenizer.from_str(json.dumps(spec))
    bos = hf.token_to_id("<|begin_of_text|>")
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", bos)])
    return Tokenizer(hf, "<|end_of_text|>")


def qwen2_style() -> Tokenizer:
    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
    hf = trained(pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                 [EOT, "<|im_start|>", "<|im_end|>"], normalizer=normalizers.NFC())
    return Tokenizer(hf, EOT)


def smollm_style() -> Tokenizer:
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return Tokenizer(trained(pre, [EOT]), EOT)


def ours_with_added_tokens() -> Tokenizer:
    tokenizer = Tokenizer.train([TEXT], vocab_size=300)
    tokenizer.hf.add_special_tokens(["<|im_start|>"])
    tokenizer.hf.add_tokens(["<tool>"])  # not special: a user-defined token in GGUF
    return tokenizer


TOKENIZER_KINDS = {"gpt-2": ours_with_added_tokens, "llama-bpe": llama3_style, "qwen2": qwen2_style,
                   "smollm": smollm_style}


def closed(writer: gguf.GGUFWriter, path: Path) -> Path:
    """The file a GGUFWriter has been given, written out."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def written_back(tokenizer: Tokenizer, path: Path, padding: int = 2) -> Path:
    """A GGUF file holding the tokenizer's metadata only, for a model of `padding` more rows than it has tokens."""
    writer = gguf.GGUFWriter(path, "llama")
    add_tokenizer(writer, tokenizer, tokenizer.vocab_size + padding)
    return closed(writer, path)


@pytest.fixture(scope="module")
def tokenizer_pairs(tmp_path_factory):
    """Each kind: (the original, the one rebuilt from a GGUF file holding its metadata)."""
    pairs = {}
    for name, make in TOKENIZER_KINDS.items():
        original = make()
        path = written_back(original, tmp_path_factory.mktemp("tok") / f"{name}.gguf", padding=3)
        assert gguf_format.reader(path).get_field(gguf.Keys.Tokenizer.PRE).contents() == name
        pairs[name] = (original, gguf_format.load_tokenizer(path))
    return pairs


def test_gguf_tokenizer_settings(tokenizer_pairs):
    for name, (original, rebuilt) in tokenizer_pairs.items():
        assert rebuilt.vocab_size == original.vocab_size and rebuilt.eot_id == original.eot_id, name
        assert rebuilt.hf.get_vocab(with_added_tokens=True) == original.hf.get_vocab(with_added_tokens=True), name
        specials = {i: t.content for i, t in original.hf.get_added_tokens_decoder().items() if t.special}
        assert {i: t.content for i, t in rebuilt.hf.get_added_tokens_decoder().items() if t.special} == specials
    llama3 = tokenizer_pairs["llama-bpe"][1]
    assert llama3.encode("hi")[0] == llama3.hf.token_to_id("<|begin_of_text|>")  # the BOS it adds


@settings(max_examples=150, deadline=None)
@given(text=st.text(), ids=st.lists(st.integers(0, 299), max_size=20))
@example(text=f"a{EOT}b <|im_start|>x<tool> é 🐍 12345\r\n\t zzqq ", ids=[0, 1, 2])
@example(text="Ｅ\u0301 ﬁ 2024年 it's I'LL", ids=[])  # NFC (Qwen2) and case-insensitive contractions (Llama 3)
def test_gguf_tokenizer_is_the_original(tokenizer_pairs, text, ids):
    for name, (original, rebuilt) in tokenizer_pairs.items():
        encoded = original.encode(text)
        assert rebuilt.encode(text) == encoded, name
        assert rebuilt.encode_corpus([text]) == original.encode_corpus([text]), name
        assert rebuilt.decode(encoded) == original.decode(encoded), name
        assert rebuilt.decode(ids) == original.decode(ids), name


# ---------------------------------------------------------------- SentencePiece vocabularies

def sentencepiece_vocab(seed: int) -> tuple[list[str], list[float], list[int]]:
    """A made-up SentencePiece vocabulary as GGUF holds one (Llama 2's layout: <unk> <s> </s>, the
    byte tokens, characters, then pieces joined from two others), its scores in a random order."""
    generator = torch.Generator().manual_seed(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    chars = list("▁abcdeéxyz.,1🐍")
    pieces = list(chars)
    while len(pieces) < 200:
        i, j = torch.randint(0, len(pieces), (2,), generator=generator).tolist()
        if pieces[i] + pieces[j] not in pieces and len(pieces[i] + pieces[j]) <= 6:
            pieces.append(pieces[i] + pieces[j])
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + (-torch.randperm(len(pieces), generator=generator).float()).tolist()
    return tokens, scores, types


def llama_cpp_spm(text: str, tokens: list[str], scores: list[float], types: list[int]) -> list[int]:
    """llama.cpp's SentencePiece tokenization (llm_tokenizer_spm), written plainly: spaces as ▁, one
    before a text that is not empty; from its characters, merge the adjacent pair whose joint piece scores highest
    (the leftmost of equals) until none is in the vocabulary; a piece outside it becomes its bytes."""
    if not text:  # (no space either)
        return []
    ids = {t: i for i, t in enumerate(tokens)}
    mergeable = {t: scores[i] for i, t in enumerate(tokens) if types[i] == gguf.TokenType.NORMAL}
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            joint = symbols[i] + symbols[i + 1]
            if joint in mergeable and (best is None or mergeable[joint] > best[0]):
                best = (mergeable[joint], i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [t for symbol in symbols for t in
            ([ids[symbol]] if symbol in ids else [ids[f"<0x{b:02X}>"] for b in symbol.encode()])]


def write_sentencepiece_gguf(path: Path, tokens, scores, types, add_bos: bool | None = False) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    return closed(writer, path)


@pytest.fixture(scope="module")
def sentencepiece_pair(tmp_path_factory):
    seed = fresh_seed()
    vocab = sentencepiece_vocab(seed)
    path = write_sentencepiece_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", *vocab)
    return vocab, gguf_format.load_tokenizer(path), path


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abcdeéxyz.,1 🐍Qé\n")), max_size=40) | st.text(max_size=20))
@example(text="abc abc  xyz. Q🐍é")
def test_gguf_sentencepiece_tokenizes_as_llama_cpp(sentencepiece_pair, text):
    """A SentencePiece vocabulary from GGUF (llama 2's kind) encodes as llama.cpp's algorithm does on
    random text (with scores in a random order), and decodes back to the text."""
    vocab, tokenizer, _ = sentencepiece_pair
    ids = tokenizer.encode(text)
    assert ids == llama_cpp_spm(text, *vocab)
    assert tokenizer.decode(ids) == text.replace("▁", " ")  # (▁ is how the vocabulary writes a space)
    assert tokenizer.eot_id == 2


def test_llama_cpp_tokenizes_our_sentencepiece_gguf_as_we_read_it(sentencepiece_pair):
    """llama.cpp itself (llama-cpp-python; not in CI) on the same GGUF vocabulary, random texts."""
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab, tokenizer, path = sentencepiece_pair
    lm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    alphabet = list("abcdeéxyz.,1 🐍Q\n")
    for _ in range(200):
        text = "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (int(torch.randint(0, 40, ())),)))
        assert lm.tokenize(text.encode(), add_bos=False) == tokenizer.encode(text) == llama_cpp_spm(text, *vocab)


def test_sentencepiece_adds_bos_unless_told_not_to(tmp_path):
    """llama.cpp's default for SentencePiece vocabularies without tokenizer.ggml.add_bos_token (as its
    converter writes Llama 2's): a BOS before the text."""
    vocab = sentencepiece_vocab(fresh_seed())
    unsaid = gguf_format.load_tokenizer(write_sentencepiece_gguf(tmp_path / "a.gguf", *vocab, add_bos=None))
    told = gguf_format.load_tokenizer(write_sentencepiece_gguf(tmp_path / "b.gguf", *vocab, add_bos=False))
    assert unsaid.encode("abc") == [1] + told.encode("abc") and told.encode("abc")[0] != 1


def test_sentencepiece_scores_that_tie_are_refused(tmp_path):
    """As llama.cpp's converter writes a vocabulary it read from tokenizer.json alone: every score -1000."""
    tokens, scores, types = sentencepiece_vocab(fresh_seed())
    path = write_sentencepiece_gguf(tmp_path / "tied.gguf", tokens, [-1000.0] * len(scores), types)
    with pytest.raises(UserError, match="SentencePiece pieces share a score"):
        gguf_format.load_tokenizer(path)


def as_metaspace(tokenizer: Tokenizer) -> Tokenizer:
    """The same vocabulary as transformers' conversions write Llama 2's: spaces by a Metaspace
    pre-tokenizer (the ▁ before the first word only) instead of normalizers."""
    spec = json.loads(tokenizer.hf.to_str())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)), tokenizer.hf.id_to_token(tokenizer.eot_id))


@pytest.fixture(scope="module")
def sentencepiece_written_back(sentencepiece_pair, tmp_path_factory):
    """Each form of the vocabulary read from GGUF: (the tokenizer read back from our GGUF of it, the file)."""
    _, tokenizer, _ = sentencepiece_pair
    folder = tmp_path_factory.mktemp("spm_out")
    return {form: (gguf_format.load_tokenizer(path), path) for form, path in
            (("ours", written_back(tokenizer, folder / "ours.gguf")),
             ("metaspace", written_back(as_metaspace(tokenizer), folder / "metaspace.gguf")))}


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abcdeéxyz.,1 🐍Qé\n")), max_size=40) | st.text(max_size=20))
def test_sentencepiece_vocabulary_goes_back_to_gguf(sentencepiece_pair, sentencepiece_written_back, text):
    """A SentencePiece vocabulary read from GGUF, written to GGUF by us (in both forms of spaces),
    tokenizes as llama.cpp's algorithm does with the original file's scores."""
    vocab, tokenizer, _ = sentencepiece_pair
    for form, (rebuilt, _) in sentencepiece_written_back.items():
        assert rebuilt.encode(text) == tokenizer.encode(text), form
        if not any(special in text for special in ("<s>", "</s>")):  # (text, for the plain algorithm)
            assert rebuilt.encode(text) == llama_cpp_spm(text, *vocab), form
        assert rebuilt.decode(rebuilt.encode(text)) == text.replace("▁", " "), form


def test_sentencepiece_gguf_we_write_holds_the_vocabulary(sentencepiece_pair, sentencepiece_written_back):
    (tokens, _, types), _, _ = sentencepiece_pair
    for form, (_, path) in sentencepiece_written_back.items():
        reader = gguf_format.reader(path)

        def field(key, reader=reader):
            return reader.get_field(key).contents()
        assert field(gguf.Keys.Tokenizer.MODEL) == "llama" and field(gguf.Keys.Tokenizer.ADD_PREFIX) is True
        assert field(gguf.Keys.Tokenizer.LIST) == tokens + ["[PAD459]", "[PAD460]"], form
        assert field(gguf.Keys.Tokenizer.TOKEN_TYPE) == types + [gguf.TokenType.UNUSED] * 2, form
        assert field(gguf.Keys.Tokenizer.UNK_ID) == 0 and field(gguf.Keys.Tokenizer.EOS_ID) == 2


def test_llama_cpp_tokenizes_the_sentencepiece_gguf_we_write(sentencepiece_pair, sentencepiece_written_back):
    """llama.cpp itself (llama-cpp-python; not in CI) on the vocabulary we wrote, random texts."""
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = sentencepiece_pair[0]
    alphabet = list("abcdeéxyz.,1 🐍Q\n")
    for rebuilt, path in sentencepiece_written_back.values():
        lm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        for _ in range(100):
            text = "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (int(torch.randint(0, 40, ())),)))
            assert lm.tokenize(text.encode(), add_bos=False) == rebuilt.encode(text) == llama_cpp_spm(text, *vocab)


def test_byte_fallback_bpe_that_llama_cpp_would_merge_otherwise_is_refused(tmp_path):
    """A trained BPE with byte fallback merges pairs by its training's counts; llama.cpp would merge every
    split of its pieces by their scores, which no scores make agree: refused, nothing written."""
    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3, "ba": 4, "▁": 5}
    hf = HFTokenizer(models.BPE(vocab, [("a", "b")], unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    with pytest.raises(UserError, match=r"does not merge as a SentencePiece vocabulary.*merge 1 differs"):
        written_back(Tokenizer(hf, None), tmp_path / "no.gguf")


# ---------------------------------------------------------------- llama.cpp

LLAMA_CPP_CASES = {
    "llama": dict(tie_embeddings=False),
    "llama_bias_llama3": dict(bias=True, rope_scaling=LLAMA3),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True, head_dim=32),
}


@pytest.mark.parametrize("case", LLAMA_CPP_CASES)
def test_llama_cpp_runs_our_gguf(case, tokenizer, tmp_path, seed):
    """llama.cpp (llama-cpp-python; not in CI) tokenizes as we do and, with float32 caches, computes
    our logits and our 32 greedy tokens after a 60-token prompt."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = our_model(tokenizer, block_size=128, **LLAMA_CPP_CASES[case])
    path = export(write_run(tmp_path / "run", model, tokenizer), tmp_path / "model.gguf")
    lm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1,
                         type_k=gguf.GGMLQuantizationType.F32, type_v=gguf.GGMLQuantizationType.F32)
    try:
        assert lm.tokenize(TEXT.encode(), add_bos=False, special=True) == tokenizer.encode(TEXT)
        prompt = tokenizer.encode(TEXT)[:60]
        lm.eval(prompt)
        theirs = torch.tensor(lm.scores[: len(prompt)])
        with torch.no_grad():
            ours = model(torch.tensor([prompt]))[0]
        diff = (theirs - ours).abs().max().item()
        print(f"llama.cpp, {case}: max |logit diff| = {diff:.2e} (max |logit| {ours.abs().max():.2f})")
        assert diff <= 1e-4 * ours.abs().max().item() + 1e-4
        greedy = []
        for _ in range(32):
            greedy.append(int(lm.scores[lm.n_tokens - 1].argmax()))
            lm.eval(greedy[-1:])
    finally:
        lm.close()
    expected = torch.stack(list(generate(model, [prompt], 32, Sampling(temperature=0))), dim=1)[0].tolist()
    assert greedy == expected


# ---------------------------------------------------------------- commands


def train_args(corpus, cache_dir, out, *extra):
    return ["--config", "tiny", "--data", str(corpus), "--cache_dir", str(cache_dir), "--out_dir", str(out), *extra]


def test_a_trained_run_goes_to_gguf_and_back_through_every_command(corpus, cache_dir, tmp_path, capsys):
    """The default way in (train.py) and every way back: export --verify, sample.py, llm.eval and
    train.py --init_from all take the .gguf file as they take the run."""
    run = tmp_path / "run"
    assert train_main(train_args(corpus, cache_dir, run, "--max_steps", "3")) == 0
    path = export(run, tmp_path / "run.gguf", "--verify")
    assert ": ok" in capsys.readouterr().out

    def command_output(main, argv):
        capsys.readouterr()
        assert main(argv) in (0, None)  # llm.eval's main returns nothing
        return capsys.readouterr().out

    sample = ["--prompt", "def main(", "--temperature", "0", "--max_new_tokens", "24"]
    assert command_output(sample_main, ["--ckpt", str(path), *sample]) == command_output(
        sample_main, ["--ckpt", str(run), *sample])
    evaluate = ["--data", str(corpus), "--max_tokens", "2000"]
    from_gguf = command_output(eval_main, ["--ckpt", str(path), *evaluate]).splitlines()
    from_run = command_output(eval_main, ["--ckpt", str(run), *evaluate]).splitlines()
    assert from_gguf[2:] == from_run[2:]  # the loss lines (the first name the checkpoint)
    assert train_main(train_args(corpus, cache_dir, tmp_path / "again", "--init_from", str(path),
                                 "--max_steps", "1")) == 0
    source, source_tokenizer = llm.load(path)
    again, tokenizer = llm.load(tmp_path / "again")
    assert again.config == source.config and tokenizer.encode(TEXT) == source_tokenizer.encode(TEXT)


@pytest.mark.parametrize("argv, message", [
    (["--out", "{p}/m.gguf", "--outtype", "q4_k"],
     "argument --outtype: invalid choice: 'q4_k' (choose from 'f32', 'f16', 'bf16', 'q8_0')"),
    (["--out", "{p}/hf", "--outtype", "q8_0"], "--outtype q8_0 is for GGUF only (Hugging Face: f32, f16, bf16)"),
    (["--out", "{p}/taken.gguf"], "--out {p}/taken.gguf exists (pass --overwrite to replace it)"),
    (["--out", "{p}/run", "--format", "gguf"], "--out {p}/run is a directory (a GGUF export is one file)"),
])
def test_export_refusals(argv, message, tokenizer, tmp_path, capsys):
    run = write_run(tmp_path / "run", our_model(tokenizer), tokenizer)
    (tmp_path / "taken.gguf").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt", str(run), *[a.format(p=tmp_path) for a in argv]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == f"error: {message.format(p=tmp_path)}\n", err
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken.gguf"]


def test_export_overwrites_a_gguf_file_only_when_asked_and_verified(tokenizer, tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "run", our_model(tokenizer), tokenizer)
    out = tmp_path / "model.gguf"
    out.write_text("previous")
    monkeypatch.setitem(verify_module.TOLERANCES, "f32", -1.0)  # a check nothing passes
    assert export_main(["--ckpt", str(run), "--out", str(out), "--overwrite", "--verify"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and captured.err == f"error: --verify failed: {out} was not written\n"
    assert out.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "run"]
    monkeypatch.undo()
    export(run, out, "--overwrite")
    assert gguf_format.is_gguf(out) and llm.load(out)[0].config == llm.load(run)[0].config


def test_export_refuses_what_gguf_cannot_hold(tokenizer, tmp_path, capsys):
    sentencepiece_style = HFTokenizer(models.BPE({"<s>": 0, "</s>": 1, "a": 2}, [], byte_fallback=True))
    sentencepiece_style.decoder = decoders.ByteFallback()
    unigram = HFTokenizer(models.Unigram([("<s>", 0.0), ("</s>", 0.0)] + [(c, -1.0) for c in "abc▁"], byte_fallback=True))
    cases = [
        (our_model(tokenizer), Tokenizer(sentencepiece_style, "</s>"), "needs spaces written as ▁"),
        (our_model(tokenizer), Tokenizer(unigram, "</s>"), "only BPE tokenizers are written (this one is Unigram)"),
        (our_model(tokenizer, ffn="gelu"), tokenizer, "cannot export: ffn='gelu' (Llama needs swiglu)"),
        (our_model(tokenizer, qk_norm=True, qkv_bias=True), tokenizer, "qk_norm with biases"),
    ]
    for i, (model, tok, message) in enumerate(cases):
        run = write_run(tmp_path / f"run{i}", model, tok)
        with pytest.raises(SystemExit) as exit_info:
            export_main(["--ckpt", str(run), "--out", str(tmp_path / f"m{i}.gguf")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err
        assert not list(tmp_path.glob(f"*m{i}.gguf*"))


def write_metadata(path: Path, arch: str = "llama", **values) -> Path:
    """A GGUF file of metadata only (and token_embd), for the reader's refusals."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in values.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    return closed(writer, path)


@pytest.mark.parametrize("arch, values, message", [
    ("gemma", {gguf.Keys.Tokenizer.MODEL: "gpt2", gguf.Keys.Tokenizer.PRE: "gpt-2", gguf.Keys.Tokenizer.LIST: ["a"]},
     "unsupported architecture 'gemma' (supported: llama, qwen2, qwen3)"),
    ("llama", {gguf.Keys.Tokenizer.MODEL: "bert", gguf.Keys.Tokenizer.LIST: ["<s>", "a"]},
     "unsupported tokenizer.ggml.model 'bert' (supported: byte-level BPE 'gpt2', SentencePiece 'llama')"),
    ("llama", {gguf.Keys.Tokenizer.MODEL: "gpt2", gguf.Keys.Tokenizer.PRE: "deepseek-llm"},
     "unsupported tokenizer.ggml.pre 'deepseek-llm' (supported: gpt-2, llama-bpe, qwen2, smollm)"),
    ("llama", {gguf.Keys.Tokenizer.MODEL: "gpt2", gguf.Keys.Tokenizer.PRE: "gpt-2", gguf.Keys.Tokenizer.LIST: ["a"]},
     "has no llama.attention.head_count"),
])
def test_unsupported_gguf_files(arch, values, message, tmp_path, capsys):
    path = write_metadata(tmp_path / "model.gguf", arch, **values)
    with pytest.raises(UserError, match=re.escape(message)):
        llm.load(path)
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--ckpt", str(path), "--max_new_tokens", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(UserError, match="is a file but not a GGUF file"):
        llm.load(tmp_path / "notes.gguf")
