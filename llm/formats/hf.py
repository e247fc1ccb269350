"""Hugging Face directories, in and out (the Llama format).

    model_config(path), load_model(path), load_tokenizer(path)   a Hugging Face directory -> ours
    write_llama(model, tokenizer, out)   the files of a Llama directory that transformers'
                                         AutoModelForCausalLM / AutoTokenizer load

Our Llama-style settings (rmsnorm, pre-norm, swiglu, rope) are the same computation as
transformers' LlamaForCausalLM: RoPE uses the same rotate_half layout, so weights only
change names, and our fused query/key/value projection is their three stacked row-wise.
One table, NAMES, holds that correspondence and serves both directions.

Only plain Llama is supported: no rope scaling (linear, dynamic, yarn, llama3, ...),
SiLU only, and biases either everywhere (attention_bias and mlp_bias) or nowhere.
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
    "layers.{i}.ffn_norm": ("model.layers.{i}.post_attention_layernorm",),
    "layers.{i}.feed_forward.w1": ("model.layers.{i}.mlp.gate_proj",),
    "layers.{i}.feed_forward.w3": ("model.layers.{i}.mlp.up_proj",),
    "layers.{i}.feed_forward.w2": ("model.layers.{i}.mlp.down_proj",),
}
LAYER = re.compile(r"layers\.(\d+)\.(.+)")

# What export requires of a ModelConfig: option -> (the Llama value, why).
LLAMA_OPTIONS = {
    "norm": ("rmsnorm", "Llama needs rmsnorm"),
    "norm_position": ("pre", "Llama needs pre-norm"),
    "ffn": ("swiglu", "Llama needs swiglu"),
    "pos_embedding": ("rope", "Llama needs rope"),
}


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


def rope_theta(config: dict) -> float:
    """The RoPE base, from transformers 5's rope_parameters or older files' rope_theta / rope_scaling."""
    theta = field(config, "rope_theta", float, 10000.0)
    for key in ("rope_scaling", "rope_parameters"):  # rope_parameters, when present, has the last word
        params = config.get(key)
        if params is None:
            continue
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise UserError(f"config.json: unsupported {key} {params!r} (expected one dict for all layers)")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise UserError(f"config.json: unsupported {key} rope_type {kind!r} (only 'default' RoPE, without scaling)")
        theta = field(params, "rope_theta", float, theta, where=f"config.json {key}")
    return theta


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face directory names its model_type in config.json (ours never does)."""
    config = Path(path) / "config.json"
    return config.is_file() and "model_type" in read_json(config)


def model_config(path) -> ModelConfig:
    return config_from_hf(read_json(Path(path) / "config.json"))


def config_from_hf(config: dict) -> ModelConfig:
    """A Hugging Face LlamaConfig (as a dict) -> our ModelConfig; unsupported settings are a UserError."""
    model_type = config.get("model_type")
    if model_type != "llama":
        raise UserError(f"config.json: unsupported model_type {model_type!r} (only 'llama' can be loaded)")
    act = field(config, "hidden_act", str, "silu")
    if act != "silu":
        raise UserError(f"config.json: unsupported hidden_act {act!r} (Llama's SwiGLU needs 'silu')")
    attention_bias, mlp_bias = field(config, "attention_bias", bool, False), field(config, "mlp_bias", bool, False)
    if attention_bias != mlp_bias:
        raise UserError(f"config.json: attention_bias={attention_bias} with mlp_bias={mlp_bias} is unsupported "
                        "(biases must be in every linear layer or in none)")
    d_model, n_head = field(config, "hidden_size", int), field(config, "num_attention_heads", int)
    if n_head <= 0:
        raise UserError(f"config.json: num_attention_heads must be positive, got {n_head}")
    return ModelConfig(
        vocab_size=field(config, "vocab_size", int),
        block_size=field(config, "max_position_embeddings", int, 2048),
        n_layer=field(config, "num_hidden_layers", int),
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
        rope_theta=rope_theta(config),
        bias=attention_bias,
        tie_embeddings=field(config, "tie_word_embeddings", bool, False),
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


# ---------------------------------------------------------------- export


def check_exportable(config: ModelConfig):
    for option, (value, why) in LLAMA_OPTIONS.items():
        if getattr(config, option) != value:
            raise UserError(f"cannot export: {option}={getattr(config, option)!r} ({why})")
    if config.d_model % config.n_head:
        raise UserError(f"cannot export: d_model={config.d_model} is not a multiple of n_head={config.n_head} "
                        "(transformers' LlamaConfig requires it, even with an explicit head_dim)")
    if not (math.isfinite(config.rope_theta) and config.rope_theta > 0):
        raise UserError(f"cannot export: rope_theta={config.rope_theta}")


def hf_config(config: ModelConfig, eot_id: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,  # where transformers 4.x reads it
        "rope_scaling": None,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",  # transformers 4.x
    }


def write_llama(model: Transformer, tokenizer: Tokenizer, out: Path):
    """Write the model (float32) and tokenizer into the folder `out` as a Hugging Face Llama directory."""
    config = model.config
    check_exportable(config)
    eot = tokenizer.eos  # None for a tokenizer without one: written as null, as transformers does
    out = Path(out)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
               for k, v in to_hf(model.state_dict(), config).items()}  # clone: no shared storage in the file
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    write_json(out / "config.json", hf_config(config, tokenizer.eot_id))
    write_json(out / "generation_config.json", {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
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
