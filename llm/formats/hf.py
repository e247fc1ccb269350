"""Hugging Face directories, in and out: the Llama, Mistral, Qwen2 and Qwen3 families.

    model_config(path), load_model(path), load_tokenizer(path)   a Hugging Face directory -> ours
    write_hf(model, tokenizer, out)   the files of a directory that transformers'
                                      AutoModelForCausalLM / AutoTokenizer load

The four families are settings of our one model (rmsnorm, pre-norm, swiglu, rope), each with
its switches (FAMILIES): Llama's RoPE scaling (linear, llama3, yarn), Mistral's sliding window,
Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorm. RoPE uses the same rotate_half layout as
transformers, so weights only change names, and our fused query/key/value projection is their
three stacked row-wise. One table, NAMES, holds that correspondence and serves both directions.

Refused by name: other model types, activations other than SiLU, biases on some Llama linears
only, per-layer sliding windows (Qwen's max_window_layers), partial rotary, dynamic/longrope RoPE.
Loading needs safetensors weights (one file, or shards with an index) and tokenizer.json;
an end-of-sequence token is optional.
"""
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from llm.files import read_json, write_json
from llm.formats.weights import build_model, check_weights, expected_weights, read_safetensors
from llm.config import ModelConfig
from llm.errors import UserError
from llm.model.chat import ChatTemplate, end_of_turn, find_template
from llm.model.rope import check_scaling
from llm.model.transformer import Transformer
from llm.model.tokenizer import Tokenizer

# Our module -> the Hugging Face modules it is made of (stacked along dim 0 when several).
# Parameters follow their module: "layers.3.attention.wqkv.bias" -> the q/k/v_proj biases of layer 3.
NAMES = {
    "tok_embeddings": ("model.embed_tokens",),
    "norm": ("model.norm",),
    "output": ("lm_head",),
    "layers.{i}.attention_norm": ("model.layers.{i}.input_layernorm",),
    "layers.{i}.attention.wqkv": ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                                  "model.layers.{i}.self_attn.v_proj"),
    "layers.{i}.attention.wo": ("model.layers.{i}.self_attn.o_proj",),
    "layers.{i}.attention.q_norm": ("model.layers.{i}.self_attn.q_norm",),
    "layers.{i}.attention.k_norm": ("model.layers.{i}.self_attn.k_norm",),
    "layers.{i}.ffn_norm": ("model.layers.{i}.post_attention_layernorm",),
    "layers.{i}.feed_forward.w1": ("model.layers.{i}.mlp.gate_proj",),
    "layers.{i}.feed_forward.w3": ("model.layers.{i}.mlp.up_proj",),
    "layers.{i}.feed_forward.w2": ("model.layers.{i}.mlp.down_proj",),
}
LAYER = re.compile(r"layers\.(\d+)\.(.+)")

# What export requires of a ModelConfig: option -> (the value all four families have, why).
LLAMA_OPTIONS = {
    "norm": ("rmsnorm", "Llama needs rmsnorm"),
    "norm_position": ("pre", "Llama needs pre-norm"),
    "ffn": ("swiglu", "Llama needs swiglu"),
    "pos_embedding": ("rope", "Llama needs rope"),
}
# model_type -> the transformers class that reads it.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}


def hf_names(name: str) -> tuple[str, ...]:
    """Our parameter name -> the Hugging Face parameter names it is stacked from."""
    module, param = name.rsplit(".", 1)
    layer = LAYER.fullmatch(module)
    key, i = (f"layers.{{i}}.{layer.group(2)}", layer.group(1)) if layer else (module, None)
    if key not in NAMES:
        raise ValueError(f"{name} has no Llama counterpart")
    return tuple(f"{theirs.format(i=i)}.{param}" for theirs in NAMES[key])


def split_sizes(config: ModelConfig, name: str) -> list[int]:
    """Row sizes of the Hugging Face parts of one of our parameters."""
    if ".attention.wqkv." in name:
        return [config.n_head * config.head_dim, config.n_kv_head * config.head_dim, config.n_kv_head * config.head_dim]
    return [-1]


def to_hf(state_dict: dict, config: ModelConfig) -> dict:
    """Our state dict -> Hugging Face Llama names (views; the fused q/k/v split row-wise)."""
    out = {}
    for name, tensor in state_dict.items():
        names = hf_names(name)
        parts = tensor.split(split_sizes(config, name), dim=0) if len(names) > 1 else (tensor,)
        out.update(zip(names, parts))
    return out


def from_hf(weights: dict, names) -> dict:
    """Hugging Face Llama tensors -> our state dict, for our parameter `names`."""
    out = {}
    for name in names:
        parts = [weights[n] for n in hf_names(name)]
        out[name] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    return out


# ---------------------------------------------------------------- import


REQUIRED = object()


def field(config: dict, key: str, kind: type, default=REQUIRED, where: str = "config.json"):
    """config[key] checked to be of `kind` (float accepts int), or the default when absent or null."""
    value = config.get(key)
    if value is None:
        if default is REQUIRED:
            raise UserError(f"{where} has no {key!r}")
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
        isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise UserError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """The RoPE base and scaling, read as transformers 5 reads them: rope_scaling (older files)
    when set, else rope_parameters; rope_theta at the top level unless the dict has one."""
    theta = field(config, "rope_theta", float, 10000.0)
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = config.get(key)
    if params is None:
        return theta, None
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise UserError(f"config.json: unsupported {key} {params!r} (expected one dict for all layers)")
    params = dict(params)
    theta = field(params, "rope_theta", float, theta, where=f"config.json {key}")
    params.pop("rope_theta", None)
    partial = params.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UserError(f"config.json: unsupported partial_rotary_factor {partial!r} (RoPE on every channel only)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind in ("llama3", "yarn") and "original_max_position_embeddings" in config:  # the top level wins (Phi-3 style)
        params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    if kind in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    try:
        return theta, check_scaling(params)
    except UserError as e:
        raise UserError(f"config.json {key}: {str(e).removeprefix('rope_scaling ')}")


def qwen_window(config: dict, n_layer: int) -> int | None:
    """Qwen2/Qwen3's sliding window, as transformers decides it per layer (layer_types, or from
    use_sliding_window and max_window_layers): used when every layer slides, refused when only some do."""
    window = field(config, "sliding_window", int, None) if field(config, "use_sliding_window", bool, False) else None
    first = field(config, "max_window_layers", int, n_layer)
    kinds = config.get("layer_types") or ["sliding_attention" if window is not None and i >= first else "full_attention"
                                          for i in range(n_layer)]
    if set(kinds) == {"full_attention"}:
        return None
    if set(kinds) == {"sliding_attention"} and window is not None:
        return window
    raise UserError(f"config.json: a sliding window on some layers only (layer_types {sorted(set(kinds))}, "
                    f"max_window_layers={first}, sliding_window={window}) is unsupported")


def family_switches(model_type: str, config: dict, n_layer: int) -> dict:
    """What sets a family apart from plain Llama, as ModelConfig switches."""
    if model_type in ("qwen2", "qwen3"):
        if model_type == "qwen3" and field(config, "attention_bias", bool, False):
            raise UserError("config.json: qwen3 with attention_bias=true is unsupported (biases on q, k, v and o "
                            "but not the MLP)")
        return dict(qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
                    sliding_window=qwen_window(config, n_layer))
    attention_bias, mlp_bias = field(config, "attention_bias", bool, False), field(config, "mlp_bias", bool, False)
    if attention_bias != mlp_bias:
        raise UserError(f"config.json: attention_bias={attention_bias} with mlp_bias={mlp_bias} is unsupported "
                        "(biases must be in every linear layer or in none)")
    window = field(config, "sliding_window", int, None) if model_type == "mistral" else None
    return dict(bias=attention_bias, sliding_window=window)


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face directory names its model_type in config.json (ours never does)."""
    config = Path(path) / "config.json"
    return config.is_file() and "model_type" in read_json(config)


def model_config(path) -> ModelConfig:
    return config_from_hf(read_json(Path(path) / "config.json"))


def config_from_hf(config: dict) -> ModelConfig:
    """A Hugging Face config (as a dict) of one of FAMILIES -> our ModelConfig; unsupported settings are a UserError."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"config.json: unsupported model_type {model_type!r} (supported: {', '.join(FAMILIES)})")
    act = field(config, "hidden_act", str, "silu")
    if act != "silu":
        raise UserError(f"config.json: unsupported hidden_act {act!r} (SwiGLU needs 'silu')")
    d_model, n_head = field(config, "hidden_size", int), field(config, "num_attention_heads", int)
    if n_head <= 0:
        raise UserError(f"config.json: num_attention_heads must be positive, got {n_head}")
    n_layer = field(config, "num_hidden_layers", int)
    theta, scaling = rope_settings(config)
    return ModelConfig(
        vocab_size=field(config, "vocab_size", int),
        block_size=field(config, "max_position_embeddings", int, 2048),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=field(config, "num_key_value_heads", int, n_head),
        d_model=d_model,
        head_dim=field(config, "head_dim", int, d_model // n_head),
        ffn_hidden=field(config, "intermediate_size", int),
        norm="rmsnorm",
        norm_position="pre",
        norm_eps=field(config, "rms_norm_eps", float, 1e-6),
        ffn="swiglu",
        pos_embedding="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=field(config, "tie_word_embeddings", bool, False),
        **family_switches(model_type, config, n_layer),
    )


def read_weights(path: Path) -> tuple[dict, str]:
    """The tensors of model.safetensors, or of the shards named by model.safetensors.index.json, and which it was."""
    if (path / "model.safetensors").exists():
        return read_safetensors(path / "model.safetensors"), "model.safetensors"
    index = path / "model.safetensors.index.json"
    if not index.exists():
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pth")]
        hint = f" ({other[0]} is not supported: convert it to safetensors)" if other else ""
        raise UserError(f"{path} has neither model.safetensors nor model.safetensors.index.json{hint}")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise UserError(f"{index} has no weight_map of tensor names to files")
    weights = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise UserError(f"{index} names a shard outside the directory: {shard!r}")
        weights.update(read_safetensors(path / shard))
    return weights, f"the shards of {index.name}"


def load_tokenizer(path) -> Tokenizer:
    """tokenizer.json, with the end-of-sequence token as transformers finds it (config.json,
    generation_config.json, tokenizer_config.json), or None: base models without one generate
    to the length limit."""
    if not (Path(path) / "tokenizer.json").exists():
        raise UserError(f"{path} has no tokenizer.json (only the tokenizers-library format is supported)")
    return Tokenizer.from_file(Path(path) / "tokenizer.json")


def load_model(path) -> Transformer:
    """Our Transformer with the directory's weights, in the dtype the files hold (llm.load casts)."""
    path = Path(path)
    config = model_config(path)
    weights, source = read_weights(path)
    if config.tie_embeddings:
        weights.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    ours = expected_weights(config)
    check_weights(weights, to_hf(ours, config), source)  # errors name their tensors
    return build_model(config, from_hf(weights, ours), source)


def chat_template(path) -> ChatTemplate | None:
    return find_template(Path(path))


# ---------------------------------------------------------------- export


def family(config: ModelConfig) -> str:
    """The transformers model_type that computes what `config` does, or a UserError saying why none does."""
    for option, (value, why) in LLAMA_OPTIONS.items():
        if getattr(config, option) != value:
            raise UserError(f"cannot export: {option}={getattr(config, option)!r} ({why})")
    if config.d_model % config.n_head:
        raise UserError(f"cannot export: d_model={config.d_model} is not a multiple of n_head={config.n_head} "
                        "(transformers' configs require it, even with an explicit head_dim)")
    if not (math.isfinite(config.rope_theta) and config.rope_theta > 0):
        raise UserError(f"cannot export: rope_theta={config.rope_theta}")
    if config.qk_norm:
        if config.bias or config.qkv_bias:
            raise UserError("cannot export: qk_norm with biases (Qwen3, the family with q/k norms, has none)")
        return "qwen3"
    if config.qkv_bias and not config.bias:
        return "qwen2"
    if config.sliding_window is not None:
        if config.bias:
            raise UserError("cannot export: sliding_window with bias (Mistral, the family with a window, "
                            "has no biases)")
        return "mistral"
    return "llama"


def check_exportable(config: ModelConfig):
    family(config)


def hf_config(config: ModelConfig, eot_id: int | None, dtype: str = "float32") -> dict:
    model_type = family(config)
    scaling = dict(config.rope_scaling) if config.rope_scaling else None
    out = {
        "architectures": [FAMILIES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,  # where transformers 4.x reads it
        "rope_scaling": scaling,  # and its scaling
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # transformers 4.x
    }
    if model_type == "llama":
        out.update(attention_bias=config.bias, mlp_bias=config.bias, pretraining_tp=1)
    if model_type == "mistral":
        out.update(sliding_window=config.sliding_window)
    if model_type in ("qwen2", "qwen3"):  # a window on every layer: sliding from layer 0 on
        window = config.sliding_window
        out.update(use_sliding_window=window is not None, sliding_window=window,
                   max_window_layers=0 if window is not None else config.n_layer)
    if model_type == "qwen3":
        out.update(attention_bias=False)
    return out


HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def write_hf(model: Transformer, tokenizer: Tokenizer, out: Path, outtype: str = "f32",
             template: ChatTemplate | None = None):
    """Write the model (in `outtype`: f32, f16 or bf16) and tokenizer into the folder `out` as a
    Hugging Face directory of the family its switches make it (see family)."""
    config = model.config
    check_exportable(config)
    eot = tokenizer.eos  # None for a tokenizer without one: written as null, as transformers does
    out = Path(out)
    dtype = HF_DTYPES[outtype]
    weights = {k: v.detach().to("cpu", dtype).contiguous().clone()
               for k, v in to_hf(model.state_dict(), config).items()}  # clone: no shared storage in the file
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    dtype_name = str(dtype).removeprefix("torch.")
    write_json(out / "config.json", hf_config(config, tokenizer.eot_id, dtype_name))
    # A chat model also stops at its template's end of turn (<|im_end|>, ...), as transformers' generate reads it.
    stop = end_of_turn(template, tokenizer.special_ids) if template is not None else None
    eos = list(dict.fromkeys(i for i in (tokenizer.eot_id, stop) if i is not None))
    write_json(out / "generation_config.json", {"bos_token_id": tokenizer.eot_id,
                                                "eos_token_id": eos[0] if len(eos) == 1 else eos,
                                                "pad_token_id": tokenizer.eot_id})
    tokenizer.hf.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "pad_token": eot,
        "model_max_length": config.block_size,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    })
    if template is not None:
        template.save(out)
