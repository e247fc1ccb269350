"""The model: causality, RoPE, backend agreement, initialization, learning."""
import math
import re

import pytest
import torch

from llm.config import ModelConfig
from llm.errors import UserError
from llm.infer.kv_cache import KVCache
from llm.model.transformer import Transformer
from llm.model.rope import apply_rope, rope_cache
from tests.helpers import KERNEL_DEVICE, grid_id, option_grid, tiny_model

GRID = list(option_grid())


CAUSALITY_CASES = [(b, o) for b in ("naive", "sdpa") for o in GRID] + [("triton", o) for o in GRID[::7]]


@pytest.mark.parametrize("backend, options", CAUSALITY_CASES, ids=[f"{b}-{grid_id(o)}" for b, o in CAUSALITY_CASES])
def test_causality(backend, options, seed):
    """Changing tokens after position t never changes the logits at positions <= t."""
    if backend == "triton":
        pytest.importorskip("triton")
    # the kernel takes fp16/bf16/fp32 and head dims of at least 16
    kernel = dict(dtype=torch.float32, d_model=64) if backend == "triton" else {}
    model = tiny_model(seed, attention=backend, **kernel, **options)
    device = next(model.parameters()).device
    x = torch.randint(0, 97, (2, 24)).to(device)
    t = int(torch.randint(0, 23, ()))
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 97, (2, 23 - t)).to(device)
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1]) or torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-12, rtol=0)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the future does matter after t


@pytest.mark.parametrize("options", GRID, ids=[grid_id(o) for o in GRID])
def test_naive_and_sdpa_agree(options, seed):
    """Same weights, the two backends: equal logits, loss and gradients (float64)."""
    results = []
    for backend in ("naive", "sdpa"):
        model = tiny_model(seed, attention=backend, **options)
        x = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(seed))
        logits = model(x)
        loss = model(x, x.roll(-1, dims=1))
        loss.backward()
        results.append((logits.detach(), loss.detach(), [p.grad for p in model.parameters()]))
    (la, ca, ga), (lb, cb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ca, cb, rtol=1e-10, atol=1e-10)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_sliding_window_sees_exactly_its_window(backend, seed):
    """Query i attends to keys i - window < j <= i, computed here key by key in float64."""
    from llm.model.attention import attention

    B, H, Hkv, T, D = 2, 4, 2, 13, 8
    window = int(torch.randint(1, T + 2, ()))
    q, k, v = torch.randn(B, H, T, D, dtype=torch.float64), *torch.randn(2, B, Hkv, T, D, dtype=torch.float64)
    expected = torch.empty_like(q)
    for i in range(T):
        keys = list(range(max(0, i - window + 1), i + 1))
        kk, vv = k[:, :, keys].repeat_interleave(H // Hkv, 1), v[:, :, keys].repeat_interleave(H // Hkv, 1)
        weights = ((q[:, :, i : i + 1] @ kk.transpose(-1, -2)) / math.sqrt(D)).softmax(-1)
        expected[:, :, i] = (weights @ vv)[:, :, 0]
    torch.testing.assert_close(attention(q, k, v, backend, window=window), expected, rtol=1e-12, atol=1e-12)


def test_rope_depends_only_on_offset(seed):
    """After rotation, q·k is a function of the position offset m - n alone."""
    head_dim = 32
    cos, sin = rope_cache(512, head_dim, theta=10000.0)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, -1), cos[m].double(), sin[m].double())
        kn = apply_rope(k.view(1, 1, 1, -1), cos[n].double(), sin[n].double())
        return (qm * kn).sum().item()

    m = int(torch.randint(0, 200, ()))
    offset = int(torch.randint(1, 50, ()))
    reference = score(m + offset, m)
    for shift in (1, 37, 250):
        assert math.isclose(score(m + offset + shift, m + shift), reference, rel_tol=1e-4, abs_tol=1e-4)
    assert not math.isclose(score(m + offset + 1, m), reference, rel_tol=1e-3)  # other offsets differ
    assert math.isclose(score(5, 5), (q * k).sum().item(), rel_tol=1e-4)  # offset 0: rotation preserves q·k


def test_rope_backward_is_the_formulas_gradient(seed):
    """The hand-written backward (rotation by the opposite angle) against autograd of
    x·cos + rotate_half(x)·sin, in float64, for per-position and per-row tables."""
    g = torch.Generator().manual_seed(seed)
    cos, sin = rope_cache(32, 8, 10000.0)
    for positions in (torch.arange(5, 12), torch.randint(0, 32, (2, 7), generator=g)):
        c, s = cos.double()[positions], sin.double()[positions]
        if positions.dim() == 2:
            c, s = c[:, None], s[:, None]
        x = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=g, requires_grad=True)
        upstream = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=g)
        (grad,) = torch.autograd.grad((apply_rope(x, c, s) * upstream).sum(), x)
        x1, x2 = x.chunk(2, dim=-1)
        formula = x * c + torch.cat([-x2, x1], dim=-1) * s
        (expected,) = torch.autograd.grad((formula * upstream).sum(), x)
        torch.testing.assert_close(apply_rope(x, c, s), formula)
        torch.testing.assert_close(grad, expected)


def test_rope_is_rotate_half():
    """x·cos + rotate_half(x)·sin with the Hugging Face Llama frequencies, written out by hand."""
    head_dim, pos, theta = 8, 3, 500.0
    cos, sin = rope_cache(8, head_dim, theta)
    x = torch.arange(1.0, head_dim + 1)
    got = apply_rope(x.view(1, 1, 1, -1), cos[pos], sin[pos]).flatten()
    half = head_dim // 2
    for i in range(half):
        angle = pos / theta ** (2 * i / head_dim)
        a, b = x[i].item(), x[i + half].item()
        assert math.isclose(got[i].item(), a * math.cos(angle) - b * math.sin(angle), rel_tol=1e-5)
        assert math.isclose(got[i + half].item(), b * math.cos(angle) + a * math.sin(angle), rel_tol=1e-5)


def random_scaling(kind: str, g: torch.Generator) -> dict:
    """Parameters of one rope_type, drawn so that every branch of its formula is taken somewhere."""
    def uniform(low, high):
        return low + (high - low) * torch.rand((), generator=g, dtype=torch.float64).item()

    original = int(torch.randint(16, 4096, (), generator=g))
    if kind == "linear":
        return {"rope_type": "linear", "factor": uniform(1.0, 16.0)}
    if kind == "llama3":
        low = uniform(0.5, 2.0)
        return {"rope_type": "llama3", "factor": uniform(2.0, 32.0), "low_freq_factor": low,
                "high_freq_factor": low + uniform(0.5, 6.0), "original_max_position_embeddings": original}
    extra = [{}, {"beta_fast": uniform(8, 64), "beta_slow": uniform(0.5, 2)}, {"truncate": False},
             {"mscale": uniform(0.5, 2), "mscale_all_dim": uniform(0.5, 2)}, {"attention_factor": uniform(0.5, 2)}]
    return {"rope_type": "yarn", "factor": uniform(1.5, 40.0), "original_max_position_embeddings": original,
            **extra[int(torch.randint(0, len(extra), (), generator=g))]}


@pytest.mark.parametrize("kind", ["linear", "llama3", "yarn"])
def test_rope_scaling_is_transformers(kind, seed):
    """The scaled frequencies and the scale on cos/sin, against transformers' own rope functions
    (ROPE_INIT_FUNCTIONS, fp32) for random parameters, head sizes and bases."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llm.model.rope import check_scaling, inverse_frequencies

    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        head_dim = 2 * int(torch.randint(4, 80, (), generator=g))
        theta = [10000.0, 500000.0, 1e6, 123.0][int(torch.randint(0, 4, (), generator=g))]
        scaling = random_scaling(kind, g)
        hf = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=8192,
                         rope_parameters={**scaling, "rope_theta": theta})
        expected, expected_scale = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
        inv_freq, scale = inverse_frequencies(head_dim, theta, check_scaling(scaling))
        torch.testing.assert_close(inv_freq.float(), expected, rtol=1e-5, atol=0, msg=f"{scaling}, {head_dim}, {theta}")
        assert math.isclose(scale, expected_scale, rel_tol=1e-12), scaling
    unscaled, _ = inverse_frequencies(64, 10000.0)
    assert not torch.allclose(inverse_frequencies(64, 10000.0, check_scaling(scaling))[0], unscaled)


def test_qk_norm_normalizes_each_head(seed):
    """With qk_norm, scaling one head's query or key rows by any positive number changes nothing
    (RMSNorm is scale-free, head by head, up to its epsilon); without it, the same change moves the output."""
    ids = torch.randint(0, 97, (2, 16))
    for qk_norm in (True, False):
        model = tiny_model(seed, qk_norm=qk_norm, norm_eps=1e-12)
        expected = model(ids)
        wqkv = model.layers[0].attention.wqkv.weight
        head_dim, n_head = model.config.head_dim, model.config.n_head
        with torch.no_grad():
            wqkv[head_dim:2 * head_dim] *= 7.5  # query head 1
            wqkv[(n_head + 1) * head_dim:(n_head + 2) * head_dim] *= 0.2  # key head 1
        changed = (model(ids) - expected).abs().max().item()
        assert (changed < 1e-9) if qk_norm else (changed > 1e-3), (qk_norm, changed)


def test_qkv_bias_is_on_the_qkv_projection_only():
    model = tiny_model(qkv_bias=True)
    with_bias = {name for name, _ in model.named_parameters() if name.endswith(".bias")}
    assert with_bias == {f"layers.{i}.attention.wqkv.bias" for i in range(model.config.n_layer)}
    assert model.layers[0].attention.wqkv.bias.shape == ((4 + 2 * 2) * 8,)
    both = {name for name, _ in tiny_model(qkv_bias=True, bias=True).named_parameters() if name.endswith(".bias")}
    assert both == {name for name, _ in tiny_model(bias=True).named_parameters() if name.endswith(".bias")}


def test_configs_without_the_family_switches_load():
    """A config.json saved before qkv_bias, qk_norm and rope_scaling existed means what it meant."""
    saved = {"vocab_size": 97, "block_size": 48, "n_layer": 2, "n_head": 4, "d_model": 32}
    config = ModelConfig.from_dict(saved)
    assert (config.qkv_bias, config.qk_norm, config.rope_scaling) == (False, False, None)
    cos, _ = rope_cache(48, 8, 10000.0)
    assert torch.equal(Transformer(config).rope_cos, cos)


def test_gpt2_initialization():
    config = ModelConfig(vocab_size=1024, block_size=64, n_layer=8, n_head=8, d_model=512)
    torch.manual_seed(0)
    model = Transformer(config)
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 0.001
    assert abs(model.layers[0].attention.wqkv.weight.std().item() - 0.02) < 0.001
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    assert abs(model.layers[3].attention.wo.weight.std().item() - residual) < 0.05 * residual
    assert abs(model.layers[3].feed_forward.w2.weight.std().item() - residual) < 0.05 * residual
    assert torch.equal(model.layers[0].attention_norm.weight, torch.ones(512))


def test_parameter_count_and_tying():
    tied = tiny_model(tie_embeddings=True)
    untied = tiny_model(tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == 97 * 32
    assert "output.weight" not in tied.state_dict()
    d, layers, kv = 32, 2, 2
    head_dim = d // 4
    per_layer = d * (4 + 2 * kv) * head_dim + 4 * head_dim * d + 3 * d * tied.config.ffn_hidden + 2 * d
    assert tied.num_params() == 97 * d + layers * per_layer + d


def test_kv_cache_matches_full_forward(seed):
    model = tiny_model(seed, n_kv_head=1)
    x = torch.randint(0, 97, (2, 30))
    full = model(x)
    cache = KVCache(model.config, 2, 30, "cpu", torch.float64)
    assert len(cache.k) == 2 and cache.k[0].shape == (2, 1, 30, 8)  # GQA width: one KV head, not one per query head
    pieces = [model(x[:, a:b], cache=cache) for a, b in ((0, 11), (11, 12), (12, 20), (20, 30))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)


def test_overfits_one_batch(seed):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, d_model=64), attention="sdpa")
    x = torch.randint(0, 64, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05, loss.item()


def test_label_smoothing_raises_the_floor(seed):
    model = tiny_model(seed)
    x = torch.randint(0, 97, (2, 16))
    plain = model(x, x)
    smoothed = model(x, x, label_smoothing=0.1)
    logits = model(x).flatten(0, 1)
    expected = 0.9 * plain + 0.1 * (-logits.log_softmax(-1).mean(-1)).mean()
    torch.testing.assert_close(smoothed, expected)


@pytest.mark.parametrize("bad, message", [
    (dict(d_model=30, n_head=4), "not divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "not divisible by n_kv_head"),
    (dict(norm="batchnorm"), "norm='batchnorm'"),
    (dict(n_layer=0), "n_layer must be positive"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_type 'dynamic' is not supported"),
    (dict(rope_scaling={"rope_type": "longrope"}), "rope_type 'longrope' is not supported"),
    (dict(rope_scaling={"rope_type": "ntk", "factor": 2.0}), "rope_type 'ntk' is not one of linear, llama3, yarn"),
    (dict(rope_scaling={"rope_type": "linear"}), "linear: factor must be a positive number, got None"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2, "beta": 1}), "linear: unsupported parameter(s) beta"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
                        "original_max_position_embeddings": 64}), "high_freq_factor must exceed low_freq_factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2}, pos_embedding="learned"),
     "rope_scaling needs pos_embedding=rope"),
])
def test_invalid_model_configs(bad, message):
    with pytest.raises(UserError, match=re.escape(message) if "(" in message else message):
        ModelConfig(**{"d_model": 32, "n_head": 4, **bad})


@pytest.mark.parametrize("attention, dropout, head_dim, message", [
    ("triton", 0.1, 16, "no attention dropout"),
    ("triton", 0.0, 80, "head dims 16, 32, 64, 128 only (this model's is 80)"),
    ("flash", 0.0, 16, "attention='flash' is not one of"),
])
def test_impossible_backends_are_refused_when_built(attention, dropout, head_dim, message):
    with pytest.raises(UserError, match=re.escape(message)):
        Transformer(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=32, head_dim=head_dim),
                    attention, dropout)


def test_triton_backend_matches_sdpa(seed):
    """A tiny model's loss and gradients through our kernel (interpreted on CPU, compiled on a GPU) equal SDPA's."""
    pytest.importorskip("triton")
    results = []
    for backend in ("sdpa", "triton"):
        model = tiny_model(seed, dtype=torch.float32, attention=backend, n_layer=1, d_model=64, n_head=4, n_kv_head=2,
                           device=KERNEL_DEVICE)
        x = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(seed)).to(KERNEL_DEVICE)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("pos_embedding, table", [("rope", "rope_cos"), ("sinusoidal", "sinusoidal")])
def test_position_tables_follow_the_weights(pos_embedding, table):
    """init_buffers puts the tables where the weights are: the decode benchmark builds on the meta
    device, gives the weights memory on the GPU (to_empty), then builds the tables (once made on
    the CPU: the first step on a GPU failed). The meta device stands in for the GPU here."""
    model = tiny_model(0, pos_embedding=pos_embedding).to_empty(device="meta")
    model.init_buffers()
    assert getattr(model, table).device.type == "meta"
