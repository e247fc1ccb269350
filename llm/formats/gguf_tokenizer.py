"""A byte-level BPE tokenizer as GGUF metadata, and back.

GGUF calls byte-level BPE `gpt2`: its tokens by id, their types (normal, control = special,
user-defined = added, unused = padding), the merges, the special ids, whether a BOS is added,
and the name of the pre-tokenizer, which llama.cpp maps to the regex it splits text with.
PRE_TOKENIZERS pairs each name we write or read with the `tokenizers` pieces that split text
exactly so (the regexes are llama.cpp's, in src/llama-vocab.cpp and src/unicode.cpp):

    gpt-2       ByteLevel's own regex: ours (tokenizers' default), GPT-2
    llama-bpe   Llama 3's Split regex, then ByteLevel without its regex
    qwen2       Qwen2's Split regex (digits one by one), after NFC
    smollm      digits one by one, then ByteLevel's regex (SmolLM)

SentencePiece vocabularies (`llama` in GGUF, as Llama 2's, Mistral 7B's, TinyLlama's) are read: llama.cpp
tokenizes them by merging, again and again, the adjacent pair of pieces whose joint piece is in the
vocabulary with the highest score (the leftmost of equals), from the text's characters, spaces
written ▁ and one put before the text; what stays out of the vocabulary becomes its bytes' tokens
(<0x41>). A `tokenizers` BPE whose merges are every such pair, ranked by that score, with byte
fallback, does the same (`sentencepiece_bpe`), where no two such pieces share a score (a vocabulary
written by llama.cpp's converter from a tokenizer.json alone scores every piece -1000: refused, by
`check_scores_rank`). They are not written: exports take byte-level BPE only.
"""
import json

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from llm.errors import UserError
from llm.model.tokenizer import Tokenizer

KEY = gguf.Keys.Tokenizer
TYPE = gguf.TokenType
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# llama.cpp's pre-tokenizer name -> (normalizer, pre-tokenizer) splitting text as it does
PRE_TOKENIZERS = {
    "gpt-2": (lambda: None, lambda: pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "llama-bpe": (lambda: None, lambda: split_then_bytes(LLAMA3_REGEX)),
    "qwen2": (normalizers.NFC, lambda: split_then_bytes(QWEN2_REGEX)),
    "smollm": (lambda: None, lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])),
}


def splitting(spec):
    """A tokenizer.json part without what changes only offsets (trim_offsets), for comparison."""
    if isinstance(spec, dict):
        return {k: splitting(v) for k, v in spec.items() if k != "trim_offsets"}
    if isinstance(spec, list):
        return [splitting(v) for v in spec]
    return spec


def byte_level_bpe(normalizer, pre_tokenizer, vocab=None, merges=None, ignore_merges=False) -> HFTokenizer:
    hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges) if vocab is not None else models.BPE())
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    return hf


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text, or a UserError saying why it has none."""
    spec = json.loads(tokenizer.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        kind = "SentencePiece-style BPE with byte fallback" if model.get("byte_fallback") else model.get("type")
        raise UserError(f"cannot export to GGUF: only byte-level BPE tokenizers are written (this one is {kind})")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"cannot export to GGUF: the tokenizer's decoder is {json.dumps(spec.get('decoder'))}, "
                        "not byte-level")
    found = splitting([spec.get("normalizer"), spec.get("pre_tokenizer")])
    for name, (normalizer, pre) in PRE_TOKENIZERS.items():
        known = json.loads(byte_level_bpe(normalizer(), pre()).to_str())
        if splitting([known["normalizer"], known["pre_tokenizer"]]) == found:
            return name
    raise UserError(f"cannot export to GGUF: the tokenizer splits text with {json.dumps(spec.get('pre_tokenizer'))}, "
                    f"which llama.cpp knows by no name (known: {', '.join(PRE_TOKENIZERS)})")


def added_bos(tokenizer: Tokenizer) -> int | None:
    """The token the tokenizer puts before every text (Llama 3's <|begin_of_text|>), if any."""
    with_special = tokenizer.hf.encode("a").ids
    plain = tokenizer.hf.encode("a", add_special_tokens=False).ids
    return with_special[0] if len(with_special) > len(plain) and with_special[0] != plain[0] else None


def merges_of(tokenizer: Tokenizer) -> list[str]:
    merges = json.loads(tokenizer.hf.to_str())["model"]["merges"]
    return [" ".join(m) if isinstance(m, list) else m for m in merges]


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, n_vocab: int):
    """The tokenizer as GGUF metadata, with n_vocab tokens (the model's rows; ids the tokenizer
    lacks are written as unused padding, as llama.cpp's converter does)."""
    pre = pre_tokenizer_name(tokenizer)
    by_id = {i: t for t, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(TYPE.CONTROL if added[i].special else TYPE.USER_DEFINED)
        else:
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(TYPE.NORMAL if i in by_id else TYPE.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges_of(tokenizer))
    bos = added_bos(tokenizer)
    writer.add_add_bos_token(bos is not None)
    writer.add_add_eos_token(False)
    for add, token in ((writer.add_bos_token_id, tokenizer.eot_id if bos is None else bos),
                       (writer.add_eos_token_id, tokenizer.eot_id), (writer.add_pad_token_id, tokenizer.eot_id)):
        if token is not None:
            add(token)


def field_value(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], space_prefix: bool) -> HFTokenizer:
    """A SentencePiece vocabulary as llama.cpp tokenizes with it (see the module doc)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    normal = [i for i, kind in enumerate(types) if kind == TYPE.NORMAL]
    merges = []
    for i in sorted(normal, key=lambda i: -scores[i]):  # sorted() is stable: equals by id
        piece = tokens[i]
        merges += [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))
                   if piece[:cut] in vocab and piece[cut:] in vocab]
    unknown = next((t for t, kind in zip(tokens, types) if kind == TYPE.UNKNOWN), None)
    hf = HFTokenizer(models.BPE(vocab, merges, unk_token=unknown, byte_fallback=True, fuse_unk=True))
    spaces = [normalizers.Replace(" ", "▁")]
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * space_prefix + spaces)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + [decoders.Strip(" ", 1, 0)] * space_prefix)
    return hf


def check_scores_rank(tokens: list[str], scores: list[float], types: list[int], where: str):
    """Pieces that merges make (normal, of two characters or more) must not share a score: llama.cpp
    takes the leftmost of equals, which no ranking of merges can express. A vocabulary its converter
    read from a tokenizer.json alone has -1000 for every piece."""
    made = [scores[i] for i, t in enumerate(tokens) if types[i] == TYPE.NORMAL and len(t) > 1]
    if len(set(made)) < len(made):
        raise UserError(f"{where}: {len(made) - len(set(made)) + 1:,} SentencePiece pieces share a score "
                        f"(e.g. {made[0]}; llama.cpp's converter writes -1000 for all when it reads tokenizer.json "
                        "alone), so merges cannot be ranked as llama.cpp does: load the Hugging Face directory "
                        "it was made from instead")


def read_tokenizer(reader: gguf.GGUFReader, where: str) -> Tokenizer:
    """The `tokenizers` tokenizer a GGUF file's metadata describes: byte-level BPE (`gpt2`) or
    SentencePiece (`llama`)."""
    kind = field_value(reader, KEY.MODEL)
    if kind not in ("gpt2", "llama"):
        raise UserError(f"{where}: unsupported {KEY.MODEL} {kind!r} (supported: byte-level BPE 'gpt2', "
                        "SentencePiece 'llama')")
    pre = field_value(reader, KEY.PRE, "default")
    if kind == "gpt2" and pre not in PRE_TOKENIZERS:
        raise UserError(f"{where}: unsupported {KEY.PRE} {pre!r} (supported: {', '.join(PRE_TOKENIZERS)})")
    tokens = field_value(reader, KEY.LIST, [])
    types = field_value(reader, KEY.TOKEN_TYPE, [TYPE.NORMAL] * len(tokens))
    while types and types[-1] == TYPE.UNUSED:  # the padding of a model with more rows than tokens
        tokens, types = tokens[:-1], types[:-1]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UserError(f"{where}: {KEY.LIST} holds the same token twice")
    if kind == "llama":
        scores = field_value(reader, KEY.SCORES, [0.0] * len(tokens))
        check_scores_rank(tokens, scores, types, where)
        hf = sentencepiece_bpe(tokens, scores, types, field_value(reader, KEY.ADD_PREFIX, True))
    else:
        merges = [tuple(m.split(" ", 1)) for m in field_value(reader, KEY.MERGES, [])]
        normalizer, pre_tokenizer = PRE_TOKENIZERS[pre]
        hf = byte_level_bpe(normalizer(), pre_tokenizer(), vocab, merges, ignore_merges=pre == "llama-bpe")
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == TYPE.CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, kind in zip(tokens, types) if kind == TYPE.USER_DEFINED])
    bos, eos = field_value(reader, KEY.BOS_ID), field_value(reader, KEY.EOS_ID)
    # a BOS before the text where the file says so (llama.cpp's default: SentencePiece yes, BPE no)
    if field_value(reader, KEY.ADD_BOS, kind == "llama") and bos is not None:
        hf.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                          special_tokens=[(tokens[bos], bos)])
    return Tokenizer(hf, None if eos is None or eos >= len(tokens) else tokens[eos])
