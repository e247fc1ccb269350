"""The static decode step: one set of shapes from the first token to the last, exact for every option
and backend (against a recomputation of each row alone, without cache or padding), compiled once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from safetensors.torch import save_file
from torch._dynamo.testing import CompileCounter

from llm.infer.generate import CompiledStep, Sampling, decode_one, generate, left_pad
from llm.infer.kv_cache import KVCache
from llm.model.attention import causal_mask, naive_attention, one_query_attention
from llm.model.tokenizer import Tokenizer
from sample import main as sample_main
from tests.helpers import grid_id, option_grid, tiny_model

GRID = list(option_grid())


def static_logits(model, prompts: list[list[int]], new: torch.Tensor) -> torch.Tensor:
    """Prefill, then the one-token step fed the tokens `new` (B, n): logits (B, n + 1, vocab)."""
    device = next(model.parameters()).device
    ids, kv_start = left_pad(prompts, 0, device)
    new = new.to(device)
    cache = KVCache(model.config, len(prompts), ids.size(1) + new.size(1), device, next(model.parameters()).dtype)
    with torch.no_grad():
        steps = [model(ids, kv_start=kv_start, cache=cache, last_only=True)[:, -1]]
        for t in range(new.size(1)):
            buffers = [(b.data_ptr(), b.shape) for b in cache.k + cache.v]
            steps.append(decode_one(model, new[:, t:t + 1], kv_start, cache))
            assert [(b.data_ptr(), b.shape) for b in cache.k + cache.v] == buffers  # written in place, never grown
    assert cache.pos.tolist() == [ids.size(1) + new.size(1)] * len(prompts)
    return torch.stack(steps, dim=1)


def alone_logits(model, prompt: list[int], new: list[int]) -> torch.Tensor:
    """The reference: the row by itself, the whole sequence at once, no cache, no padding."""
    with torch.no_grad():
        return model(torch.tensor([prompt + new], device=next(model.parameters()).device))[0, len(prompt) - 1:]


def random_prompts(lengths) -> list[list[int]]:
    return [torch.randint(0, 97, (n,)).tolist() for n in lengths]


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("options", GRID, ids=[grid_id(o) for o in GRID])
def test_static_step_equals_recomputation(backend, options, seed):
    model = tiny_model(seed, attention=backend, **options)  # float64: differences are bugs, not rounding
    prompts = random_prompts(torch.randint(1, 14, (3,)).tolist())
    new = torch.randint(0, 97, (3, 12))
    logits = static_logits(model, prompts, new)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[row], alone_logits(model, prompt, new[row].tolist()), rtol=1e-9, atol=1e-9)
    greedy = [torch.stack(list(generate(model, prompts, 10, Sampling(temperature=0), use_cache=c)), 1).tolist()
              for c in (True, False)]
    assert greedy[0] == greedy[1]


def test_static_step_through_the_triton_kernel(seed):
    """The same steps through our kernel (interpreted on CPU, compiled on a GPU), padding included, against SDPA."""
    pytest.importorskip("triton")
    model = tiny_model(seed, attention="triton", dtype=torch.float32, n_layer=1, d_model=64, n_head=4, n_kv_head=2)
    prompts, new = random_prompts([2, 7]), torch.randint(0, 97, (2, 4))
    logits = static_logits(model, prompts, new)
    model.set_attention("sdpa")
    torch.testing.assert_close(logits, static_logits(model, prompts, new), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["naive", "sdpa", "triton"])
def test_rows_at_their_own_positions_equal_each_alone(backend, seed):
    """A server's cache: requests come and go, each row prefilled on its own (cache.reset_row) and at its
    own position; stepping all rows together gives each row what it gives alone."""
    if backend == "triton":
        pytest.importorskip("triton")
    options = dict(n_layer=1, d_model=64, n_head=4, n_kv_head=2) if backend == "triton" else {}
    model = tiny_model(seed, attention=backend, dtype=torch.float32 if backend == "triton" else torch.float64,
                       sliding_window=int(torch.randint(3, 9, ())), **options)
    device = next(model.parameters()).device
    cache = KVCache(model.config, 3, 40, device, next(model.parameters()).dtype)
    prompts, new = random_prompts([9, 2, 5]), torch.randint(0, 97, (3, 6)).to(device)
    logits = [[] for _ in prompts]
    with torch.no_grad():
        for row in (1, 0):  # row 1 first, then row 0 joins after two steps; row 2 stays idle
            logits[row].append(model(torch.tensor([prompts[row]], device=device), cache=cache.reset_row(row),
                                     last_only=True)[0, -1])
            if row == 1:
                for t in range(2):
                    logits[1].append(decode_one(model, new[:, t:t + 1], None, cache)[1])
        for t in range(2, 6):
            step = decode_one(model, new[:, t:t + 1], None, cache)
            logits[1].append(step[1])
            logits[0].append(step[0])
    tolerance = dict(rtol=1e-5, atol=1e-5) if backend == "triton" else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.stack(logits[1]), alone_logits(model, prompts[1], new[1].tolist()), **tolerance)
    torch.testing.assert_close(torch.stack(logits[0]), alone_logits(model, prompts[0], new[0, 2:].tolist()),
                               **tolerance)
    assert cache.pos[:2].tolist() == [len(prompts[0]) + 4, len(prompts[1]) + 6]


@pytest.mark.parametrize("groups", [1, 3])
def test_one_query_attention_equals_the_textbook(groups, seed):
    """Decoding's attention as sums (what compiled CPU steps use) against naive attention in float64:
    per-row query slots, left padding and a sliding window, the query heads of a KV head grouped."""
    B, Hkv, D, Tk = 3, 2, 16, 20
    q = torch.randn(B, Hkv * groups, 1, D, dtype=torch.float64)
    k, v = torch.randn(2, B, Hkv, Tk, D, dtype=torch.float64)
    slots = torch.randint(8, Tk, (B, 1))
    kv_start = torch.randint(0, 6, (B,))
    mask = causal_mask(1, Tk, kv_start, "cpu", slots, window=int(torch.randint(3, 9, ())))
    expected = naive_attention(q, k, v, mask)[0]
    got = one_query_attention(q.view(B, Hkv, groups, D), k, v, mask).view(B, Hkv * groups, 1, D)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def greedy(model, prompts, n, decode_step=decode_one) -> list[list[int]]:
    tokens = generate(model, prompts, n, Sampling(temperature=0), decode_step=decode_step)
    return torch.stack(list(tokens), dim=1).tolist()


@pytest.mark.parametrize("options", GRID[::7], ids=[grid_id(o) for o in GRID[::7]])
def test_decode_step_compiles_once(options, seed):
    """64 tokens, two generations of the same sizes: one compilation (no recompiling as the sequence grows)."""
    torch._dynamo.reset()
    model = tiny_model(seed, dtype=torch.float32, block_size=96, **options)
    counter = CompileCounter()
    step = CompiledStep(counter)
    for lengths in ([5, 9], [9, 2]):
        prompts = random_prompts(lengths)
        assert greedy(model, prompts, 64, step) == greedy(model, prompts, 64)
    assert counter.frame_count == 1 and counter.op_count > 0


def test_many_compiled_generations_in_one_process(seed):
    """Dynamo allows 8 compilations per code object: twelve models and batch sizes, each with its
    own CompiledStep, all compile (with fullgraph, the ninth would be a hard error on one shared step)."""
    torch._dynamo.reset()
    for i in range(12):
        model = tiny_model(seed + i, dtype=torch.float32, block_size=32)
        prompts = random_prompts([3] * (1 + i % 4))
        counter = CompileCounter()
        assert greedy(model, prompts, 4, CompiledStep(counter)) == greedy(model, prompts, 4)
        assert counter.frame_count == 1


def test_compile_backend_must_exist(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--ckpt", "/no/such/run", "--compile", "nonsense"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --compile nonsense: not a torch.compile backend (available: ") and "inductor" in err


def tiny_checkpoint(folder):
    """A run directory sample.py loads: a tiny model, its config and a trained tokenizer."""
    tokenizer = Tokenizer.train(["def f(x):\n    return x\n"] * 20, vocab_size=280)
    model = tiny_model(0, dtype=torch.float32, vocab_size=tokenizer.vocab_size)
    save_file(model.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(model.config.__dict__))
    tokenizer.save(folder / "tokenizer.json")


def test_compile_failure_is_one_line(tmp_path, capsys):
    """A backend that fails (as inductor does on a machine without a C++ compiler): one line, exit 2."""

    @torch._dynamo.register_backend(name="fails_for_this_test")
    def fails(graph, example_inputs):
        raise RuntimeError("no compiler here\nsecond line")

    tiny_checkpoint(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--ckpt", str(tmp_path), "--prompt", "x", "--max_new_tokens", "3",
                     "--compile", "fails_for_this_test"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --compile fails_for_this_test failed (RuntimeError: no compiler here)"), err


def test_ahead_of_time_compile_failure_is_one_line(tmp_path, capsys, monkeypatch):
    """Inductor on CPU compiles ahead of time (llm/infer/aot.py); when that fails (no C++ compiler,
    a full disk): one line, exit 2, and no half-written package left behind."""

    def fails(program, package_path, inductor_configs):
        with open(package_path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch._inductor.runtime.cache_dir_utils, "cache_dir", lambda: str(tmp_path / "cache"))
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fails)
    tiny_checkpoint(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--ckpt", str(tmp_path), "--prompt", "x", "--max_new_tokens", "3", "--compile"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: compiling the decode step ahead of time (AOTInductor) failed "
                          "(RuntimeError: no compiler here)"), err
    assert list((tmp_path / "cache" / "llm_toolkit_aot").iterdir()) == []


def test_unusable_compile_cache_folder_is_one_line(tmp_path):
    """TORCHINDUCTOR_CACHE_DIR naming a file: torch fails as it is imported; one line, exit 2."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(blocker)}
    done = subprocess.run([sys.executable, "sample.py", "--ckpt", "/no/such/run", "--compile"], env=env,
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: --compile inductor: torch cannot make its compile cache folder"), done.stderr
