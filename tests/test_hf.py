"""Hugging Face interop: Llama (3.x RoPE scaling included), Mistral, Qwen2 and Qwen3 directories
load into our model and our runs export to them, computing the same logits and greedy tokens as
transformers' own classes."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import llm
from llm.config import ModelConfig
from llm.errors import UserError
from llm.export import main as export_main
from llm.infer.generate import Sampling, generate
from llm.model.transformer import Transformer
from llm.model.tokenizer import EOT, Tokenizer
from sample import main as sample_main
from tests.helpers import fresh_seed  # module-scoped fixtures cannot use the per-test `seed`
from tests.test_tokenizer import without_eos

ROOT = Path(__file__).resolve().parent.parent
TEXT = "def greet(name):\n    return f'héllo {name} 🐍 你好'\n\nclass Box:\n    pass\n" * 10
TOLERANCE = 1e-4  # fp32 logits


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT], vocab_size=300)


def randomize(model):
    """Every parameter random (the default inits leave norms at 1 and biases at 0, which would hide mistakes)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def hf_llama(tokenizer, **overrides) -> transformers.LlamaForCausalLM:
    settings_ = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                     bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, attn_implementation="eager")
    settings_.update(overrides)
    return randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings_)))


def save_hf(model, tokenizer, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    tokenizer.save(path / "tokenizer.json")
    return path


def our_model(tokenizer, **overrides) -> Transformer:
    settings_ = dict(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64)
    settings_.update(overrides)
    return randomize(Transformer(ModelConfig(**settings_), attention="sdpa"))


def write_run(path: Path, model: Transformer, tokenizer) -> Path:
    """A run directory as train.py's checkpoints look to llm.load (random weights)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(model.config.__dict__))
    tokenizer.save(path / "tokenizer.json")
    return path


def edit_config(path: Path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def random_ids(vocab_size: int, batch=2) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, int(torch.randint(8, 65, ()))))


@torch.no_grad()
def max_logit_diff(ours: Transformer, hf, vocab_size: int) -> float:
    ids = random_ids(vocab_size)
    return (ours(ids) - hf(ids).logits).abs().max().item()


@torch.no_grad()
def assert_same_greedy(ours: Transformer, hf, vocab_size: int, n=32):
    """Batch 1, float64 on both sides (so near-ties cannot flip), HF kept from stopping at end-of-text."""
    ours, hf = ours.double(), hf.double()
    prompt = torch.randint(0, vocab_size, (int(torch.randint(1, 17, ())),)).tolist()
    expected = torch.stack(list(generate(ours, [prompt], n, Sampling(temperature=0))), dim=1)[0].tolist()
    hf.generation_config.eos_token_id = None
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, pad_token_id=0)
    assert out.shape[1] == len(prompt) + n  # did not stop early
    assert out[0, len(prompt):].tolist() == expected


FAMILY_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
# Llama 3.x's scaling on a small head: with head_dim 16 and theta 10000 the wavelengths are 6.3 (kept),
# 20 and 63 (blended), 199 and longer (divided by factor); tests run past position 64, the original context.
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
FAMILY_CASES = {  # name -> (model_type, config overrides, what our config must say)
    "llama3": ("llama", dict(rope_parameters={**LLAMA3, "rope_theta": 10000.0}), dict(rope_scaling=LLAMA3)),
    "llama_linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 5e4}),
                     dict(rope_scaling={"rope_type": "linear", "factor": 3.0})),
    "mistral": ("mistral", dict(sliding_window=16, head_dim=16), dict(sliding_window=16)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True),
                   dict(qkv_bias=True, tie_embeddings=True, sliding_window=None)),
    "qwen2_untied_yarn": ("qwen2", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                         "original_max_position_embeddings": 32}),
                          dict(qkv_bias=True, tie_embeddings=False)),
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=True), dict(qk_norm=True, head_dim=32)),
}


def hf_family(tokenizer, model_type: str, **overrides):
    """A random-weight model of a family, built with transformers' own config and model classes."""
    config_class, model_class = FAMILY_CLASSES[model_type]
    settings_ = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                     bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, attn_implementation="eager")
    return randomize(model_class(config_class(**{**settings_, **overrides})))


def long_ids(vocab_size: int, batch=2) -> torch.Tensor:
    """Past the window and past the original context of the scaled RoPE cases."""
    return torch.randint(0, vocab_size, (batch, int(torch.randint(72, 129, ()))))


def make_family_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Each family's directory; the bf16 and sharded variants are Qwen2's."""
    fresh_seed()
    dirs = {}
    for case, (model_type, overrides, _) in FAMILY_CASES.items():
        dirs[case] = save_hf(hf_family(tokenizer, model_type, **overrides), tokenizer, tmp_path_factory.mktemp(case))
    # As Qwen2.5's files are (and transformers 4.x wrote them): a window named but unused, no layer_types.
    config = json.loads((dirs["qwen2_tied"] / "config.json").read_text())
    del config["layer_types"]
    (dirs["qwen2_tied"] / "config.json").write_text(json.dumps({**config, "sliding_window": 4, "max_window_layers": 1}))
    qwen2 = hf_family(tokenizer, "qwen2").to(torch.bfloat16)
    dirs["qwen2_bf16_sharded"] = save_hf(qwen2, tokenizer, tmp_path_factory.mktemp("sharded"), max_shard_size="40KB")
    return dirs


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    return make_family_dirs(tmp_path_factory, tokenizer)


def reference(path: Path):
    """transformers' own model of a directory, in float32 (bf16 files upcast exactly)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.mark.parametrize("case", [*FAMILY_CASES, "qwen2_bf16_sharded"])
def test_families_load_with_same_logits(case, family_dirs, tokenizer, seed):
    path = family_dirs[case]
    model, tok = llm.load(path)
    expected = FAMILY_CASES.get(case, (None, None, dict(qkv_bias=True)))[2]
    assert {k: getattr(model.config, k) for k in expected} == expected
    assert tok.encode(TEXT) == tokenizer.encode(TEXT)
    if case == "qwen2_bf16_sharded":
        assert len(list(path.glob("model-*.safetensors"))) > 1
    hf = reference(path)
    with torch.no_grad():
        ids = long_ids(tokenizer.vocab_size)
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    print(f"HF -> ours, {case}, {ids.shape[1]} tokens: max |logit diff| = {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_families_greedy_through_sample_py(case, family_dirs, tokenizer, capsys, seed):
    """32 greedy tokens after a 50-token prompt: sample.py's text (float32) is transformers' (float64),
    and token by token through our generate (both float64)."""
    path = family_dirs[case]
    prompt_ids = tokenizer.encode(TEXT)[:50]
    prompt = tokenizer.decode(prompt_ids)
    hf = reference(path).double()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, 50, dtype=torch.long),
                          do_sample=False, max_new_tokens=32, pad_token_id=0)[0, 50:].tolist()
    generated = out[: out.index(tokenizer.eot_id)] if tokenizer.eot_id in out else out  # sample.py stops there
    capsys.readouterr()
    assert sample_main(["--ckpt", str(path), "--prompt", prompt, "--max_new_tokens", "32", "--temperature", "0",
                        "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(prompt_ids + generated) + "\n"
    model, _ = llm.load(path, dtype=torch.float64)
    ours = torch.stack(list(generate(model, [prompt_ids], 32, Sampling(temperature=0))), dim=1)[0].tolist()
    assert ours == out


@pytest.mark.parametrize("case", ["llama3", "qwen2_untied_yarn"])
def test_transformers_4_config_files(case, family_dirs, tmp_path, seed):
    """The same checkpoints as transformers 4.x wrote them: rope_scaling ("type" in older files)
    and a top-level rope_theta instead of rope_parameters: the same model."""
    old = Path(shutil.copytree(family_dirs[case], tmp_path / case))
    config = json.loads((old / "config.json").read_text())
    params = config.pop("rope_parameters")
    theta, kind = params.pop("rope_theta"), params.pop("rope_type")
    config.update(rope_theta=theta, rope_scaling={**params, "type" if kind == "yarn" else "rope_type": kind})
    config.pop("layer_types", None)
    (old / "config.json").write_text(json.dumps(config))
    model, _ = llm.load(old)
    assert model.config == llm.load(family_dirs[case])[0].config
    with torch.no_grad():
        ids = long_ids(model.config.vocab_size)
        assert (model(ids) - reference(family_dirs[case])(ids).logits).abs().max().item() <= TOLERANCE


# ---------------------------------------------------------------- Hugging Face -> ours

IMPORT_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "rope_theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "odd_vocab": dict(vocab_size=1001),
    "head_dim": dict(head_dim=32),  # != hidden_size / num_attention_heads = 16
    "bias": dict(attention_bias=True, mlp_bias=True, num_key_value_heads=1),
}


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_hf_llama_loads_with_same_logits(case, tokenizer, tmp_path, seed):
    hf = hf_llama(tokenizer, **IMPORT_CASES[case])
    model, tok = llm.load(save_hf(hf, tokenizer, tmp_path))
    assert tok.eot_id == tokenizer.eot_id and tok.encode(TEXT) == tokenizer.encode(TEXT)
    diff = max_logit_diff(model, hf, hf.config.vocab_size)
    print(f"HF -> ours, {case}: max |logit diff| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_legacy_rope_theta_and_null_rope_scaling(tokenizer, tmp_path, seed):
    """Older config.json files: top-level rope_theta, rope_scaling null, no rope_parameters."""
    hf = hf_llama(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 2500.0})
    path = save_hf(hf, tokenizer, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["rope_parameters"]
    (path / "config.json").write_text(json.dumps({**config, "rope_theta": 2500.0, "rope_scaling": None}))
    model, _ = llm.load(path)
    assert model.config.rope_theta == 2500.0
    assert max_logit_diff(model, hf, hf.config.vocab_size) <= TOLERANCE


def test_sharded_weights_load(tokenizer, tmp_path, seed):
    hf = hf_llama(tokenizer, tie_word_embeddings=False)
    path = save_hf(hf, tokenizer, tmp_path, max_shard_size="50KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").exists()
    assert not (path / "model.safetensors").exists()
    model, _ = llm.load(path)
    diff = max_logit_diff(model, hf, hf.config.vocab_size)
    print(f"HF -> ours, {len(shards)} shards: max |logit diff| = {diff:.2e}")
    assert diff <= TOLERANCE
    shards[-1].unlink()
    with pytest.raises(UserError, match="does not exist"):
        llm.load(path)


def test_hf_llama_greedy_generation_matches(tokenizer, tmp_path, seed):
    hf = hf_llama(tokenizer)
    model, _ = llm.load(save_hf(hf, tokenizer, tmp_path))
    assert_same_greedy(model, hf, tokenizer.vocab_size)


# ---------------------------------------------------------------- ours -> Hugging Face

EXPORT_CASES = {
    "gqa_tied": dict(tie_embeddings=True),
    "gqa_untied": dict(tie_embeddings=False),
    "bias_untied": dict(bias=True, tie_embeddings=False),
    "mqa_head_dim_theta_vocab": dict(n_kv_head=1, head_dim=32, rope_theta=123456.0, vocab_size=313),
    "llama3": dict(rope_scaling=LLAMA3, block_size=128),
    "mistral": dict(sliding_window=16, block_size=128),
    "qwen2_yarn": dict(qkv_bias=True, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                    "original_max_position_embeddings": 32}, block_size=128),
    "qwen3_window": dict(qk_norm=True, head_dim=32, sliding_window=20, block_size=128),
}
EXPORT_FAMILIES = {"llama3": "llama", "mistral": "mistral", "qwen2_yarn": "qwen2", "qwen3_window": "qwen3"}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_loads_in_transformers_with_same_logits(case, tokenizer, tmp_path, capsys, seed):
    model = our_model(tokenizer, **EXPORT_CASES[case])
    run, out = write_run(tmp_path / "run", model, tokenizer), tmp_path / "hf"
    assert export_main(["--ckpt", str(run), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    with safe_open(out / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not model.config.tie_embeddings)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.dtype == torch.float32 and hf.config.head_dim == model.config.head_dim
    assert hf.config.model_type == EXPORT_FAMILIES.get(case, "llama")
    with torch.no_grad():
        ids = long_ids(model.config.vocab_size) if model.config.block_size > 64 else random_ids(model.config.vocab_size)
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    print(f"ours -> HF, {case}: max |logit diff| = {diff:.2e}")
    assert diff <= TOLERANCE
    reloaded, _ = llm.load(out)  # and back: the very same weights
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    assert reloaded.config == model.config


def test_export_greedy_generation_matches(tokenizer, tmp_path, seed):
    model = our_model(tokenizer, tie_embeddings=False)
    out = tmp_path / "hf"
    assert export_main(["--ckpt", str(write_run(tmp_path / "run", model, tokenizer)), "--out", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert_same_greedy(model, hf, tokenizer.vocab_size)


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    fresh_seed()
    path = tmp_path_factory.mktemp("export")
    assert export_main(["--ckpt", str(write_run(path / "run", our_model(tokenizer), tokenizer)),
                        "--out", str(path / "hf")]) == 0
    return path / "hf"


@pytest.fixture(scope="module")
def hf_tokenizers(exported):
    file = str(exported.parent / "run" / "tokenizer.json")
    return (tokenizers.Tokenizer.from_file(file), transformers.PreTrainedTokenizerFast(tokenizer_file=file),
            transformers.AutoTokenizer.from_pretrained(exported))


def test_exported_tokenizer_settings(hf_tokenizers, tokenizer):
    auto = hf_tokenizers[2]
    assert auto.eos_token == auto.bos_token == EOT and auto.eos_token_id == tokenizer.eot_id
    assert auto.model_max_length == 64


@settings(max_examples=150, deadline=None)
@given(text=st.text())
@example(text=f"a{EOT}b  é 🐍\r\n\t")
def test_tokenizers_agree_on_any_text(tokenizer, hf_tokenizers, text):
    raw, fast, auto = hf_tokenizers
    ids = tokenizer.encode(text)
    assert raw.encode(text).ids == ids
    assert fast.encode(text, add_special_tokens=False) == ids
    assert auto.encode(text, add_special_tokens=False) == ids
    assert tokenizer.decode(ids) == raw.decode(ids, skip_special_tokens=False) == fast.decode(ids) == auto.decode(ids) == text


# ---------------------------------------------------------------- errors

BASE_HF_ERRORS = [  # (config.json changes, files removed, message)
    ({"model_type": "gemma"}, (), "unsupported model_type 'gemma' (supported: llama, mistral, qwen2, qwen3)"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}}, (),
     "config.json rope_parameters: rope_type 'dynamic' is not supported (its frequencies change"),
    ({"rope_parameters": None, "rope_scaling": {"type": "longrope", "factor": 2.0}}, (),
     "config.json rope_scaling: rope_type 'longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, (),
     "rope_parameters: llama3: low_freq_factor must be a positive number, got None"),
    ({"partial_rotary_factor": 0.5}, (), "unsupported partial_rotary_factor 0.5"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, (),
     "a sliding window on some layers only"),
    ({"model_type": "qwen3", "attention_bias": True}, (), "qwen3 with attention_bias=true is unsupported"),
    ({"hidden_act": "gelu"}, (), "unsupported hidden_act 'gelu'"),
    ({"attention_bias": True}, (), "attention_bias=True with mlp_bias=False"),
    ({"num_hidden_layers": 3}, (), "missing model.layers.2."),
    ({"head_dim": 8}, (), "q_proj.weight has shape (64, 64), the config implies (32, 64)"),
    ({"hidden_size": "64"}, (), "hidden_size must be int"),
    ({"eos_token_id": 10**6}, (), "eos_token_id 1000000 is not in tokenizer.json's vocabulary"),
    ({}, ("tokenizer.json",), "has no tokenizer.json"),
    ({}, ("model.safetensors",), "neither model.safetensors nor model.safetensors.index.json"),
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    fresh_seed()
    return save_hf(hf_llama(tokenizer), tokenizer, tmp_path_factory.mktemp("hf"))


@pytest.mark.parametrize("changes, removed, message", BASE_HF_ERRORS, ids=[m for _, _, m in BASE_HF_ERRORS])
def test_unsupported_hf_directories(hf_dir, tmp_path, capsys, changes, removed, message):
    bad = Path(shutil.copytree(hf_dir, tmp_path / "bad"))
    edit_config(bad, **changes)
    for name in removed:
        (bad / name).unlink()
    with pytest.raises(UserError, match=re.escape(message)):
        llm.load(bad)
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--ckpt", str(bad), "--max_new_tokens", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


EXPORT_ERRORS = [
    (dict(ffn="gelu"), "cannot export: ffn='gelu' (Llama needs swiglu)"),
    (dict(norm="layernorm"), "cannot export: norm='layernorm' (Llama needs rmsnorm)"),
    (dict(pos_embedding="learned"), "cannot export: pos_embedding='learned' (Llama needs rope)"),
    (dict(norm_position="post"), "cannot export: norm_position='post' (Llama needs pre-norm)"),
    (dict(n_head=6, head_dim=16), "d_model=64 is not a multiple of n_head=6"),
]


@pytest.mark.parametrize("options, message", EXPORT_ERRORS, ids=[m for _, m in EXPORT_ERRORS])
def test_export_refuses_non_llama_models(tokenizer, tmp_path, capsys, options, message):
    run = write_run(tmp_path / "run", our_model(tokenizer, **options), tokenizer)
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt", str(run), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no temporary directory left


def test_export_overwrite_and_bad_arguments(tokenizer, tmp_path, capsys):
    run, out = write_run(tmp_path / "run", our_model(tokenizer), tokenizer), tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cases = [
        (["--ckpt", str(run), "--out", str(out)], "is not empty (pass --overwrite"),
        (["--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "does not exist"),
        (["--ckpt", str(run), "--out", str(run), "--overwrite"], "contains --ckpt"),
        (["--out", str(out)], "the following arguments are required: --ckpt"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            export_main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert (out / "keep.txt").read_text() == "mine"
    assert export_main(["--ckpt", str(run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # the old export and the build dir are gone
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--help"])
    assert exit_info.value.code == 0 and "--overwrite" in capsys.readouterr().out


def test_export_command_line_error(tokenizer, tmp_path):
    run = write_run(tmp_path / "run", our_model(tokenizer, ffn="gelu"), tokenizer)
    result = subprocess.run([sys.executable, "-m", "llm.export", "--ckpt", str(run), "--out", str(tmp_path / "hf")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: cannot export: ffn='gelu' (Llama needs swiglu)\n"


def test_sample_command_on_hf_directory(hf_dir):
    result = subprocess.run([sys.executable, "sample.py", "--ckpt", str(hf_dir), "--prompt", "x",
                             "--max_new_tokens", "5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("x") and "tokens/s" in result.stderr


# ---------------------------------------------------------------- directories as the Hub has them


def test_llama_without_end_of_sequence_token(tmp_path, capsys, seed):
    """Base models without an EOS load, and generate to max_new_tokens (or a stop string)."""
    tokenizer = without_eos([TEXT])
    hf = hf_llama(tokenizer)
    path = save_hf(hf, tokenizer, tmp_path)
    assert json.loads((path / "config.json").read_text()).get("eos_token_id") is None
    model, tok = llm.load(path)
    assert tok.eot_id is None and max_logit_diff(model, hf, tokenizer.vocab_size) <= TOLERANCE
    assert sample_main(["--ckpt", str(path), "--prompt", "x", "--max_new_tokens", "7", "--seed", str(seed)]) == 0
    assert capsys.readouterr().err.splitlines()[-1].startswith("7 tokens in ")


def test_named_end_of_sequence_token_must_exist(hf_dir, tmp_path):
    bad = Path(shutil.copytree(hf_dir, tmp_path / "bad"))
    edit_config(bad, eos_token_id=None)
    (bad / "generation_config.json").unlink()
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|no such token|>"}))
    message = "eos_token '<|no such token|>' is not in tokenizer.json's vocabulary"
    with pytest.raises(UserError, match=re.escape(message)):
        llm.load(bad)


def all_dtypes(model) -> set:
    return {t.dtype for t in [*model.parameters(), *model.buffers()]}


@pytest.mark.parametrize("mixed", [False, True], ids=["bf16", "mixed"])
def test_low_precision_directory_loads_as_one_dtype(tokenizer, tmp_path, mixed, seed):
    """Hub checkpoints are mostly bf16 (some mix dtypes): fp32 by default on CPU, bf16 when asked."""
    hf = hf_llama(tokenizer).to(torch.bfloat16)
    path = save_hf(hf, tokenizer, tmp_path)
    if mixed:  # norms in fp32, attention in fp16, the rest bf16
        from safetensors.torch import load_file
        weights = load_file(path / "model.safetensors")
        for name, tensor in weights.items():
            weights[name] = tensor.float() if "norm" in name else tensor.half() if "self_attn" in name else tensor
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    model, _ = llm.load(path)
    assert all_dtypes(model) == {torch.float32}
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    assert max_logit_diff(model, hf, tokenizer.vocab_size) <= TOLERANCE  # the stored values, upcast exactly
    model, _ = llm.load(path, dtype=torch.bfloat16)
    assert all_dtypes(model) == {torch.bfloat16}
