"""Sampling: the cache is exact, batching is exact, filters keep the right tokens, streaming is clean."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import llm
from llm.generate import Sampling, TextStream, complete, filter_logits, generate, sample
from llm.tokenizer import Tokenizer
from llm.viz import attention_map
from sample import main as sample_main
from tests.helpers import grid_id, option_grid, tiny_model

ROOT = Path(__file__).resolve().parent.parent
GRID = list(option_grid())[::3]  # 8 combinations covering every switch value
TEXT = "def greet(name):\n    return f'héllo {name} 🐍 你好'\n\nclass Box:\n    pass\n" * 10


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT], vocab_size=300)  # small: many multi-byte characters split across tokens


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A checkpoint directory as train.py writes it (random weights)."""
    path = tmp_path_factory.mktemp("run")
    model = tiny_model(1, dtype=torch.float32, vocab_size=tokenizer.vocab_size, block_size=64)
    save_file(model.state_dict(), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(model.config.__dict__))
    tokenizer.save(path / "tokenizer.json")
    return path


def greedy(model, prompts, n, use_cache=True):
    return torch.stack(list(generate(model, prompts, n, Sampling(temperature=0), use_cache=use_cache)), dim=1).tolist()


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("options", GRID, ids=[grid_id(o) for o in GRID])
def test_cache_equals_recomputation(backend, options, seed):
    model = tiny_model(seed, attention=backend, **options)
    prompt = torch.randint(0, 97, (int(torch.randint(1, 12, ())),)).tolist()
    assert greedy(model, [prompt], 24) == greedy(model, [prompt], 24, use_cache=False)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("options", GRID, ids=[grid_id(o) for o in GRID])
def test_batch_of_different_lengths_equals_one_by_one(backend, options, seed):
    model = tiny_model(seed, attention=backend, **options)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (1, 9, 4, 13)]
    batched = greedy(model, prompts, 16)
    assert batched == [greedy(model, [p], 16)[0] for p in prompts]
    assert batched == greedy(model, prompts, 16, use_cache=False)


def test_triton_backend_generates_like_sdpa(seed):
    """Prefill (q_len < kv_len with padding) and decode through our kernel, interpreted on CPU."""
    pytest.importorskip("triton")
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 7)]
    outputs = [greedy(tiny_model(seed, attention=b, dtype=torch.float32, n_layer=1, d_model=64), prompts, 6)
               for b in ("sdpa", "triton")]
    assert outputs[0] == outputs[1]


def test_top_k_keeps_exactly_the_k_largest(seed):
    logits = torch.randn(4, 50, dtype=torch.float64)
    k = int(torch.randint(1, 50, ()))
    kept = filter_logits(logits, top_k=k).isfinite()
    assert torch.equal(kept.sum(-1), torch.full((4,), k))
    for row in range(4):
        assert set(kept[row].nonzero().flatten().tolist()) == set(logits[row].topk(k).indices.tolist())


def test_top_p_keeps_the_smallest_nucleus(seed):
    logits = torch.randn(6, 40, dtype=torch.float64) * 2
    p = float(torch.empty(()).uniform_(0.05, 0.95))
    kept = filter_logits(logits, top_p=p).isfinite()
    probs = logits.softmax(-1)
    for row in range(6):
        order = probs[row].argsort(descending=True).tolist()
        n, total = 0, 0.0
        while total < p:  # brute force: take the most likely tokens until their mass reaches p
            total += probs[row, order[n]].item()
            n += 1
        assert set(kept[row].nonzero().flatten().tolist()) == set(order[:n])


def test_sampling_follows_the_distribution(seed):
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0]])
    g = torch.Generator().manual_seed(seed)
    draws = Counter(sample(probs.log().expand(20000, -1), Sampling(temperature=1.0), g).tolist())
    for token, p in enumerate(probs[0].tolist()):
        assert abs(draws[token] / 20000 - p) < 0.015
    assert Counter(sample(probs.log(), Sampling(temperature=1.0, top_k=1), g).tolist()) == {0: 1}


def test_seed_reproduces_samples(run_dir, seed):
    model, tokenizer = llm.load(run_dir)
    kwargs = dict(sampling=Sampling(temperature=1.0, top_k=50, top_p=0.9), seed=seed)
    a = complete(model, tokenizer, ["def ", "class "], 20, **kwargs)
    assert a == complete(model, tokenizer, ["def ", "class "], 20, **kwargs)
    assert a != complete(model, tokenizer, ["def ", "class "], 20, **{**kwargs, "seed": seed + 1})


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab é€🐍你好\n")), max_size=40))
def test_streaming_never_splits_a_character(tokenizer, text):
    stream = TextStream(tokenizer)
    pieces = [stream.add(t) for t in tokenizer.encode(text)] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_streaming_splits_characters_in_this_tokenizer(tokenizer):
    """The property above is not vacuous: single tokens here do end inside characters."""
    assert any("\ufffd" in tokenizer.decode([t]) for t in tokenizer.encode("🐍你好"))


def test_stop_strings_are_never_shown(tokenizer):
    stream = TextStream(tokenizer, stop=("\n\nclass",))
    pieces = [stream.add(t) for t in tokenizer.encode(TEXT[:80])] + [stream.finish()]
    shown = "".join(pieces)
    assert stream.stopped and shown == TEXT[: TEXT.index("\n\nclass")] == stream.text


def test_complete_stops_at_end_of_text(run_dir):
    model, tokenizer = llm.load(run_dir)
    reference = complete(model, tokenizer, ["x"], 10, Sampling(temperature=0))[0]
    assert tokenizer.eot_id == 0 and reference["ids"]
    with torch.no_grad():  # all logits equal: greedy picks the first token, <|endoftext|>
        model.norm.weight.zero_()
    for on_text in (None, lambda row, text: None):  # with and without per-step streaming
        result = complete(model, tokenizer, ["x"], 10, Sampling(temperature=0), on_text=on_text)[0]
        assert result["ids"] == [] and result["text"] == ""


def test_empty_prompt_starts_from_end_of_text(run_dir):
    model, tokenizer = llm.load(run_dir)
    result = complete(model, tokenizer, [""], 5, Sampling(temperature=0))[0]
    assert result["prompt_ids"] == [tokenizer.eot_id]
    first = greedy(model, [[tokenizer.eot_id]], 1)[0][0]
    assert result["ids"][:1] == ([first] if first != tokenizer.eot_id else [])


def test_context_overflow_errors_or_truncates(run_dir):
    model, tokenizer = llm.load(run_dir)
    long_prompt = "def f():\n" * 40
    with pytest.raises(ValueError, match="exceeds the context"):
        complete(model, tokenizer, [long_prompt], 20)
    result = complete(model, tokenizer, [long_prompt], 20, Sampling(temperature=0), truncate=True)[0]
    assert len(result["prompt_ids"]) + 20 == model.config.block_size
    assert result["prompt_ids"] == tokenizer.encode(long_prompt)[-44:]


def test_attention_map(run_dir, tmp_path):
    model, tokenizer = llm.load(run_dir)
    ids = tokenizer.encode("def greet(name): return name")
    probs = attention_map(model, ids, layer=-1, head=1)
    assert probs.shape == (len(ids), len(ids))
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(ids)))
    assert torch.all(probs.triu(1) == 0)  # causal
    with pytest.raises(llm.errors.UserError, match="2 layers and 4 heads"):
        attention_map(model, ids, layer=5, head=0)


def test_sample_command_streams_and_reports_speed(run_dir, tmp_path):
    png = tmp_path / "attention.png"
    result = subprocess.run(
        [sys.executable, "sample.py", "--ckpt", str(run_dir), "--prompt", "def ", "--max_new_tokens", "12",
         "--seed", "3", "--attention_png", str(png), "--attention_layer", "1", "--attention_head", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ")
    assert "tokens/s" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_batch_and_stdin(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("import "))
    assert sample_main(["--ckpt", str(run_dir), "--prompt", "-", "--prompt", "x", "--num_samples", "2",
                        "--max_new_tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("import ") == 2 and out.count("-" * 40) == 4


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-0.5"], "temperature must be >= 0"),
    (["--top_p", "0"], "top_p must be in (0, 1]"),
    (["--top_p", "1.5"], "top_p must be in (0, 1]"),
    (["--top_k=-1"], "top_k must be >= 0"),
    (["--max_new_tokens=-3"], "max_new_tokens must be >= 0"),
    (["--max_new_tokens", "500"], "pass --truncate_prompt"),
    (["--prompt_file", "/no/such/file"], "cannot read prompt file"),
    (["--attention_png", "/tmp/x.png", "--attention_layer", "9"], "2 layers"),
])
def test_sample_bad_input(run_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--ckpt", str(run_dir), "--max_new_tokens", "3", *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_sample_bad_checkpoints(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((run_dir / name).read_bytes())
    weights = (run_dir / "model.safetensors").read_bytes()
    cases = {
        tmp_path / "missing": "does not exist",
        broken: "not a valid safetensors file",
    }
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    for name in ("tokenizer.json", "model.safetensors"):
        (mismatch / name).write_bytes((run_dir / name).read_bytes())
    config = json.loads((run_dir / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    cases[mismatch] = "does not match"
    for path, message in cases.items():
        with pytest.raises(SystemExit):
            sample_main(["--ckpt", str(path)])
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_compiled_decode_step_generates_the_same(run_dir):
    """The --compile path (a compiled module as decode step), with dynamo's eager backend for speed."""
    model, tokenizer = llm.load(run_dir)
    compiled = torch.compile(model, backend="eager", dynamic=True)
    plain = complete(model, tokenizer, ["def ", "x"], 12, Sampling(temperature=0))
    assert complete(model, tokenizer, ["def ", "x"], 12, Sampling(temperature=0), decode_step=compiled) == plain
