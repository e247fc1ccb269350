"""GGUF files, in and out: what llama.cpp, ollama and LM Studio run.

    model_config(path), load_tokenizer(path), load_model(path), chat_template(path)   a .gguf file -> ours
    write_gguf(model, tokenizer, out, outtype, chat_template)                        ours -> a .gguf file

Written and read with the `gguf` package, ggml's own: gguf.Keys names every key, and gguf's
TensorNameMap names every tensor from its Hugging Face name, so hf.NAMES stays the one table
of our names. The architecture is the family's (hf.family): `llama` for Llama and Mistral,
`qwen2`, `qwen3`. llama.cpp's `llama` rotates q and k by interleaved channel pairs where we
(and transformers) rotate halves, so their rows are permuted per head on the way out and back
on the way in, as llama.cpp's converter does; `qwen2` and `qwen3` rotate halves as we do.

RoPE scaling: linear and yarn as rope.scaling keys; llama3 as the rope_freqs tensor of
per-frequency divisors (what llama.cpp reads), from which reading recovers the parameters.
Tensors are written F32, F16, BF16 or Q8_0 (gguf.quants; 1-D tensors stay F32 and rows that
are not a multiple of the block fall back to F16, as llama.cpp's converter does), and read in
any type gguf.quants dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the k-quants, ...).
The tokenizer: llm/formats/gguf_tokenizer.py. A sliding window is written as its key, which
llama.cpp's llama and qwen2 architectures ignore: beyond the window, llama.cpp differs from us.
"""
import functools
import math
from pathlib import Path

import gguf
import numpy as np
import torch

from llm.config import ModelConfig
from llm.errors import UserError
from llm.formats.gguf_tokenizer import add_tokenizer, field_value, read_tokenizer
from llm.formats.hf import family, from_hf, to_hf
from llm.formats.weights import build_model, check_weights, expected_weights
from llm.model.chat import ChatTemplate, end_of_turn
from llm.model.rope import check_scaling, inverse_frequencies, llama3_factors, yarn_attention_factor
from llm.model.tokenizer import Tokenizer
from llm.model.transformer import Transformer

ARCH = gguf.MODEL_ARCH
ARCHITECTURES = {"llama": ARCH.LLAMA, "mistral": ARCH.LLAMA, "qwen2": ARCH.QWEN2, "qwen3": ARCH.QWEN3}
READABLE = {gguf.MODEL_ARCH_NAMES[a]: a for a in ARCHITECTURES.values()}
QTYPE = gguf.GGMLQuantizationType
OUTTYPES = {"f32": (QTYPE.F32, gguf.LlamaFileType.ALL_F32), "f16": (QTYPE.F16, gguf.LlamaFileType.MOSTLY_F16),
            "bf16": (QTYPE.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (QTYPE.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
LLM, ATTENTION, ROPE = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
REQUIRED = object()


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return int.from_bytes(f.read(4), "little") == gguf.GGUF_MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------- names and layouts


def gguf_names(config: ModelConfig, arch: ARCH) -> dict[str, str]:
    """Hugging Face name -> GGUF name, for every tensor of the model."""
    names = gguf.get_tensor_name_map(arch, config.n_layer)
    return {hf: names.get_name(hf, try_suffixes=(".weight", ".bias")) for hf in to_hf(expected_weights(config), config)}


def interleave_heads(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Each head's rows from rotate-half order (channel i pairs with i + d/2) to llama.cpp's
    interleaved order (2i pairs with 2i + 1), or back."""
    rows = w.shape[0] // n_heads
    if inverse:
        return w.reshape(n_heads, rows // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return w.reshape(n_heads, 2, rows // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_cpp_layout(hf_name: str, w: torch.Tensor, config: ModelConfig, arch: ARCH, inverse=False) -> torch.Tensor:
    if arch != ARCH.LLAMA:
        return w
    heads = config.n_head if ".q_proj." in hf_name else config.n_kv_head if ".k_proj." in hf_name else None
    return w if heads is None else interleave_heads(w, heads, inverse)


# ---------------------------------------------------------------- export


def add_rope_scaling(writer: gguf.GGUFWriter, config: ModelConfig):
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    if scaling.get("rope_type") == "yarn":
        default_factor = math.isclose(scaling["attention_factor"], yarn_attention_factor(scaling["factor"]))
        if not (scaling["truncate"] and default_factor):
            raise UserError("cannot export to GGUF: YaRN with truncate=false or its own attention_factor "
                            "(llama.cpp computes both from the factor)")
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])


def add_hyperparameters(writer: gguf.GGUFWriter, config: ModelConfig, outtype: str):
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
    add_rope_scaling(writer, config)


def add_tensor(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, outtype: str):
    """One tensor in `outtype`; 1-D ones (norms, biases) in F32, as llama.cpp keeps them."""
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    qtype = OUTTYPES[outtype][0] if data.ndim > 1 else QTYPE.F32
    if qtype == QTYPE.F32:
        return writer.add_tensor(name, data)
    try:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    except gguf.QuantError:  # rows not a multiple of the block
        writer.add_tensor(name, data.astype(np.float16))


def write_gguf(model: Transformer, tokenizer: Tokenizer, out: Path, outtype: str = "f32",
               chat_template: ChatTemplate | None = None, name: str | None = None):
    """The model and tokenizer as one GGUF file at `out` (written in place: the caller renames)."""
    config = model.config
    arch = ARCHITECTURES[family(config)]  # refuses what no family computes
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    if name:
        writer.add_name(name)
    add_hyperparameters(writer, config, outtype)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    if chat_template is not None:
        writer.add_chat_template(chat_template.source)
        stop = end_of_turn(chat_template, tokenizer.special_ids)
        if stop is not None:
            writer.add_eot_token_id(stop)  # llama.cpp ends a reply there
    names = gguf_names(config, arch)
    for hf_name, tensor in to_hf(model.state_dict(), config).items():
        add_tensor(writer, names[hf_name], llama_cpp_layout(hf_name, tensor, config, arch), outtype)
    if config.rope_scaling and config.rope_scaling["rope_type"] == "llama3":
        inv_freq, _ = inverse_frequencies(config.head_dim, config.rope_theta)
        writer.add_tensor(ROPE_FREQS, llama3_factors(inv_freq, config.rope_scaling).float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- import


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise UserError(f"{path} is not a readable GGUF file ({e})")


def reader(path) -> gguf.GGUFReader:
    """The file's reader (memory-mapped), parsed once while the file stays the same."""
    stat = Path(path).stat()
    return _reader(str(path), stat.st_mtime_ns, stat.st_size)


def metadata(r: gguf.GGUFReader, path, key: str, default=REQUIRED, kind=(int, float, str)):
    value = field_value(r, key, None)
    if value is None:
        if default is REQUIRED:
            raise UserError(f"{path} has no {key}")
        return default
    if isinstance(value, list) or not isinstance(value, kind):
        raise UserError(f"{path}: unsupported {key} {value!r} (one value for all layers expected)")
    # GGUF keeps float32: its shortest decimal gives back the number that was written (1e-05, not 9.99999974e-06)
    return float(str(np.float32(value))) if isinstance(value, float) else value


def dequantize(tensor, path) -> torch.Tensor:
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UserError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, which gguf cannot dequantize")
    shape = tuple(reversed([int(d) for d in tensor.shape]))
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)


def short(x: float) -> float:
    """x as a short decimal when it is one up to float32 rounding (8192.0004 -> 8192)."""
    rounded = float(f"{x:.6g}")
    return rounded if math.isclose(rounded, x, rel_tol=1e-5) else x


def llama3_from_factors(factors: torch.Tensor, head_dim: int, theta: float, path) -> dict:
    """Llama 3 scaling parameters giving these per-frequency divisors (GGUF keeps only those).
    The divisors fix two wavelength bounds and a blend linear in 1/wavelength; every
    (low_freq_factor, high_freq_factor, original) with the same bounds gives them, so this one
    has low_freq_factor 1, as Llama 3.x's own configs do."""
    inv_freq, _ = inverse_frequencies(head_dim, theta)
    factors = factors.double()
    factor = factors.max().item()
    blend = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if blend.sum() < 2:
        raise UserError(f"{path}: rope_freqs blends fewer than two frequencies: its Llama 3 scaling is ambiguous")
    weight = (1 / factors[blend] - 1 / factor) / (1 - 1 / factor)  # the blend's weight on the unscaled frequency
    slope, intercept = np.polyfit((inv_freq[blend] / (2 * math.pi)).numpy(), weight.numpy(), 1)
    high = short(1 - 1 / intercept)  # weight = original / (high - 1) / wavelength - 1 / (high - 1)
    scaling = check_scaling({"rope_type": "llama3", "factor": short(factor), "low_freq_factor": 1.0,
                             "high_freq_factor": high, "original_max_position_embeddings": short(slope * (high - 1))})
    if not torch.allclose(llama3_factors(inv_freq, scaling), factors, rtol=1e-5, atol=0):
        raise UserError(f"{path}: rope_freqs are not Llama 3's frequency scaling")
    return scaling


def rope_scaling(r: gguf.GGUFReader, path, arch: str, head_dim: int, theta: float) -> dict | None:
    kind = metadata(r, path, ROPE.SCALING_TYPE.format(arch=arch), "none", str)
    freqs = next((t for t in r.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None and kind == "none":
        return llama3_from_factors(dequantize(freqs, path), head_dim, theta, path)
    if kind == "none":
        return None
    factor = metadata(r, path, ROPE.SCALING_FACTOR.format(arch=arch), kind=(int, float))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    for key in (ROPE.SCALING_YARN_ATTN_FACTOR, ROPE.SCALING_YARN_EXT_FACTOR):
        if kind == "yarn" and metadata(r, path, key.format(arch=arch), 1.0, (int, float)) != 1.0:
            raise UserError(f"{path}: unsupported {key.format(arch=arch)} (YaRN as transformers computes it only)")
    if kind == "yarn" and freqs is None:
        return {"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": metadata(r, path, ROPE.SCALING_ORIG_CTX_LEN.format(arch=arch)),
                "beta_fast": metadata(r, path, ROPE.SCALING_YARN_BETA_FAST.format(arch=arch), 32.0),
                "beta_slow": metadata(r, path, ROPE.SCALING_YARN_BETA_SLOW.format(arch=arch), 1.0)}
    raise UserError(f"{path}: unsupported rope scaling {kind!r}{' with rope_freqs' if freqs is not None else ''}")


def config_of(r: gguf.GGUFReader, path) -> ModelConfig:
    arch = metadata(r, path, gguf.Keys.General.ARCHITECTURE, kind=str)
    if arch not in READABLE:
        raise UserError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(READABLE)})")

    def get(key, default=REQUIRED):
        return metadata(r, path, key.format(arch=arch), default, (int, float))

    names = {t.name: t for t in r.tensors}
    if "token_embd.weight" not in names:
        raise UserError(f"{path} has no token_embd.weight")
    d_model, vocab_size = (int(d) for d in names["token_embd.weight"].shape)
    n_head = get(ATTENTION.HEAD_COUNT)
    head_dim = get(ATTENTION.KEY_LENGTH, d_model // max(n_head, 1))
    for key in (ATTENTION.VALUE_LENGTH, ROPE.DIMENSION_COUNT):
        if get(key, head_dim) != head_dim:
            raise UserError(f"{path}: unsupported {key.format(arch=arch)}={get(key)} (must equal the head size, "
                            f"{head_dim}: no partial rotary)")
    theta = float(get(ROPE.FREQ_BASE, 10000.0))
    bias = "blk.0.attn_output.bias" in names
    return ModelConfig(
        vocab_size=vocab_size, block_size=get(LLM.CONTEXT_LENGTH), n_layer=get(LLM.BLOCK_COUNT), n_head=n_head,
        n_kv_head=get(ATTENTION.HEAD_COUNT_KV, n_head), d_model=d_model, head_dim=head_dim,
        ffn_hidden=get(LLM.FEED_FORWARD_LENGTH), norm="rmsnorm", norm_position="pre",
        norm_eps=float(get(ATTENTION.LAYERNORM_RMS_EPS)), ffn="swiglu", pos_embedding="rope", rope_theta=theta,
        rope_scaling=rope_scaling(r, path, arch, head_dim, theta), bias=bias,
        qkv_bias=not bias and "blk.0.attn_q.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
        tie_embeddings="output.weight" not in names, sliding_window=get(ATTENTION.SLIDING_WINDOW, None),
    )


def model_config(path) -> ModelConfig:
    return config_of(reader(path), path)


def load_tokenizer(path) -> Tokenizer:
    return read_tokenizer(reader(path), str(path))


def load_model(path) -> Transformer:
    """Our Transformer with the file's weights, dequantized to float32 (llm.load casts)."""
    r = reader(path)
    config = config_of(r, path)
    arch = READABLE[metadata(r, path, gguf.Keys.General.ARCHITECTURE, kind=str)]
    names = gguf_names(config, arch)  # Hugging Face -> GGUF
    weights = {t.name: dequantize(t, path) for t in r.tensors if t.name != ROPE_FREQS}
    expected = to_hf(expected_weights(config), config)
    check_weights(weights, {names[hf]: tensor for hf, tensor in expected.items()}, Path(path).name, "its metadata")
    hf_weights = {hf: llama_cpp_layout(hf, weights[names[hf]], config, arch, inverse=True) for hf in expected}
    return build_model(config, from_hf(hf_weights, expected_weights(config)), Path(path).name)


def chat_template(path) -> ChatTemplate | None:
    r = reader(path)
    source = field_value(r, gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    if not source:
        return None
    tokens = field_value(r, gguf.Keys.Tokenizer.LIST, [])
    special = {name: tokens[i] for name, key in (("bos_token", gguf.Keys.Tokenizer.BOS_ID),
                                                   ("eos_token", gguf.Keys.Tokenizer.EOS_ID))
               if (i := field_value(r, key)) is not None and i < len(tokens)}
    return ChatTemplate(source, special)
