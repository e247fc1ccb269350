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
`check_scores_rank`). Written back the other way (`sentencepiece_scores`): a BPE with byte fallback
that writes spaces as ▁ gets, per piece, minus the rank of the first merge that makes it, when its
merges are exactly the ones those scores make (as they are when it came from a GGUF file).
"""
import json
import re
from dataclasses import dataclass

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from llm.errors import UserError
from llm.model.tokenizer import Tokenizer

KEY = gguf.Keys.Tokenizer
TYPE = gguf.TokenType
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte-fallback tokens
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


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for how a byte-level BPE (its tokenizer.json, parsed) splits text, or a
    UserError saying why it has none."""
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


def merge_pairs(spec: dict) -> list[tuple[str, str]]:
    """A tokenizer.json's merges as pairs (written "a b" by older versions of `tokenizers`)."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in spec["model"]["merges"]]


def token_table(tokenizer: Tokenizer, n_vocab: int, kind_of) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types, n_vocab of them (ids the tokenizer lacks are written as
    unused padding, as llama.cpp's converter does). kind_of: a vocabulary token -> its type."""
    by_id = {i: t for t, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(TYPE.CONTROL if added[i].special else TYPE.USER_DEFINED)
        else:
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(kind_of(by_id[i]) if i in by_id else TYPE.UNUSED)
    return tokens, types


def sentencepiece_spaces(spec: dict) -> bool:
    """Whether a byte-fallback BPE puts a ▁ before the text (add_space_prefix), or a UserError when
    it does not write spaces as SentencePiece does: ▁ for each, no other change to the text. Both
    forms are known: ours (normalizers) and transformers' conversions (a Metaspace pre-tokenizer)."""
    found = splitting([spec.get("normalizer"), spec.get("pre_tokenizer")])
    for prefix in (True, False):
        ours = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
        forms = [(ours, None)] + [(None, pre_tokenizers.Metaspace("▁", scheme, split=False))
                                  for scheme in (["first", "always"] if prefix else ["never"])]
        for normalizer, pre in forms:
            hf = HFTokenizer(models.BPE())
            hf.normalizer, hf.pre_tokenizer = normalizer, pre
            known = json.loads(hf.to_str())
            if splitting([known["normalizer"], known["pre_tokenizer"]]) == found:
                return prefix
    raise UserError("cannot export to GGUF: a BPE with byte fallback is written as a SentencePiece vocabulary, "
                    f"which needs spaces written as ▁ and nothing else; this one has normalizer "
                    f"{json.dumps(spec.get('normalizer'))} and pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))}")


def sentencepiece_scores(tokens: list[str], types: list[int], pairs: list[tuple[str, str]], space_prefix: bool,
                         ) -> list[float]:
    """Scores under which llama.cpp merges as these merges do: each piece minus the rank of the first
    merge that makes it (pieces no merge makes below all, apart); a UserError unless the merges are
    exactly what llama.cpp's rule makes of those scores (every split of each piece, ranked by it)."""
    first = {}
    for rank, (a, b) in enumerate(pairs):
        first.setdefault(a + b, rank)

    def score(i: int, piece: str, kind: int) -> float:
        if kind != TYPE.NORMAL:
            return 0.0
        return -1.0 - first[piece] if piece in first else -1.0 - len(pairs) - i  # made by no merge: below all

    scores = [score(i, piece, kind) for i, (piece, kind) in enumerate(zip(tokens, types))]
    rebuilt = merge_pairs(json.loads(sentencepiece_bpe(tokens, scores, types, space_prefix).to_str()))
    if rebuilt != pairs:
        at = next((i for i, (a, b) in enumerate(zip(rebuilt, pairs)) if a != b), min(len(rebuilt), len(pairs)))
        raise UserError("cannot export to GGUF: this BPE with byte fallback does not merge as a SentencePiece "
                        f"vocabulary (llama.cpp merges every split of a piece, ranked by the piece's score): "
                        f"merge {at:,} differs ({' '.join(pairs[at]) if at < len(pairs) else 'none'} here)")
    return scores


@dataclass
class Vocabulary:
    """What GGUF holds of a tokenizer: `gpt2` (byte-level BPE: merges, pre-tokenizer name) or `llama`
    (SentencePiece: scores, whether a ▁ goes before the text, the unknown token)."""
    model: str
    tokens: list[str]
    types: list[int]
    merges: list[str] | None = None
    pre: str | None = None
    scores: list[float] | None = None
    space_prefix: bool | None = None
    unknown: int | None = None


def vocabulary(tokenizer: Tokenizer, n_vocab: int) -> Vocabulary:
    """The tokenizer as GGUF holds it, with n_vocab tokens, or a UserError saying why it cannot:
    byte-level BPE as `gpt2`, a BPE with byte fallback (SentencePiece's kind) as `llama`."""
    spec = json.loads(tokenizer.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix"):
        raise UserError(f"cannot export to GGUF: only BPE tokenizers are written (this one is {model.get('type')})")
    if not model.get("byte_fallback"):
        pre = pre_tokenizer_name(spec)
        tokens, types = token_table(tokenizer, n_vocab, lambda t: TYPE.NORMAL)
        return Vocabulary("gpt2", tokens, types, merges=[" ".join(pair) for pair in merge_pairs(spec)], pre=pre)
    space_prefix = sentencepiece_spaces(spec)
    unknown = model.get("unk_token")
    tokens, types = token_table(tokenizer, n_vocab, lambda t: TYPE.UNKNOWN if t == unknown else
                                TYPE.BYTE if BYTE_TOKEN.fullmatch(t) else TYPE.NORMAL)
    return Vocabulary("llama", tokens, types, scores=sentencepiece_scores(tokens, types, merge_pairs(spec), space_prefix),
                      space_prefix=space_prefix, unknown=tokens.index(unknown) if unknown in tokens else None)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, n_vocab: int):
    """The tokenizer as GGUF metadata, with n_vocab tokens (see `vocabulary`)."""
    v = vocabulary(tokenizer, n_vocab)
    writer.add_tokenizer_model(v.model)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.types)
    if v.model == "gpt2":
        writer.add_tokenizer_pre(v.pre)
        writer.add_token_merges(v.merges)
    else:
        writer.add_token_scores(v.scores)
        writer.add_add_space_prefix(v.space_prefix)
        if v.unknown is not None:
            writer.add_unk_token_id(v.unknown)
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
