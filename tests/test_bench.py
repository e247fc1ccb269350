"""The benchmarks' own logic (their figures are printed, never asserted): recipes parse and
refuse bad input, time to target is read at the first evaluation that reaches it, and the
sampling benchmark runs end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

from llm.bench.decode import quantization_quality
from llm.bench.decode_peers import Engine, alternate, build_hf_dir, llama2_style_tokenizer, llama_cpp_missing
from llm.bench.speedrun import RECIPES, parse_recipe, summarize
from llm.errors import UserError
from tests.helpers import tiny_model


def test_recipes_parse_into_typed_settings():
    assert parse_recipe("baseline") == ("baseline", RECIPES["baseline"])
    name, settings = parse_recipe("fast:optimizer=muon,muon_lr=0.04,max_steps=350,compile=true")
    assert name == "fast"
    assert settings == {"optimizer": "muon", "muon_lr": 0.04, "max_steps": 350, "compile": True}


@pytest.mark.parametrize("text, message", [("nosuch", "unknown recipe"), ("r:lr", "is not key=value"),
                                           ("r:learning_rate=1", "unknown config key"), ("r:lr=fast", "lr")])
def test_bad_recipes_are_one_clear_error(text, message):
    with pytest.raises(UserError, match=message):
        parse_recipe(text)


def test_time_to_target_is_the_first_evaluation_at_or_below_it():
    records = [{"step": 10, "loss": 5.0}]  # training-step records carry no val_loss
    for step, loss, seconds in [(25, 5.1, 20.0), (50, 4.2, 41.0), (75, 3.9, 62.5), (100, 3.95, 80.0)]:
        records.append({"step": step, "val_loss": loss, "val_bpb": loss / 2, "train_seconds": seconds, "tokens": step * 100})
    row = summarize("r", records, target=4.2)
    assert (row["step_to_target"], row["seconds_to_target"], row["tokens_to_target"]) == (50, 41.0, 5000)
    assert (row["final_val_loss"], row["train_seconds"], row["tokens"]) == (3.95, 80.0, 10000)
    missed = summarize("r", records, target=3.0)
    assert missed["seconds_to_target"] is None and missed["step_to_target"] is None


def test_sampling_benchmark_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llm.bench", "sample", "--config", "tiny", "--new_tokens", "4",
                             "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cache speed-up at batch 8" in result.stdout


def test_decode_benchmark_against_transformers(tmp_path):
    """The decode benchmark end to end on the tiny default model (aot_eager: compiled without a C++
    compiler): every variant timed, fp32 tokens identical to transformers', and the bandwidth figures
    consistent with the timings."""
    pytest.importorskip("transformers")
    out = tmp_path / "decode.json"
    command = ["--config", "default", "--batch", "1", "--dtype", "float32", "--new_tokens", "8", "--repeats", "1",
               "--no_latency", "--no_kernels", "--compile", "aot_eager", "--json", str(out)]
    result = subprocess.run([sys.executable, "-m", "llm.bench", "decode", *command],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [(r["quantize"], r["compile"]) for r in results["rows"]] == [
        ("none", False), ("none", "aot_eager"), ("int8", False), ("int8", "aot_eager"), ("int4", False),
        ("int4", "aot_eager")]
    for row in results["rows"]:
        assert row["ms_per_step"] == pytest.approx(1e3 / row["tokens_per_s"])  # batch 1
        assert row["percent_of_read"] == pytest.approx(100 * row["achieved_gbps"] / row["read_bandwidth_gbps"])
    (hf,) = results["transformers"]
    ours = {r["ours"]: r for r in hf["ours"]}
    assert list(ours) == ["eager", "compiled", "int8", "int8 compiled", "int4", "int4 compiled"]
    assert ours["eager"]["identical_tokens"] and ours["compiled"]["identical_tokens"]
    for r in ours.values():
        assert r["ratio"] == pytest.approx(r["tokens_per_s"] / hf["transformers_tokens_per_s"])


def test_int8_quality_report_with_a_compiled_step(seed):
    """The int8 report on a checkpoint also runs the compiled step; under aot_eager it takes the same
    kernels as eager, so it must agree with the float model exactly as long as eager int8 does."""
    model = tiny_model(seed, dtype=torch.float32, block_size=40)
    with torch.inference_mode():
        q = quantization_quality(model, tokens=24, compile_backend="aot_eager")
    assert q["tokens"] == 24 and 0 <= q["teacher_forced_agreement"] <= 1
    assert q["free_running_identical_tokens_compiled"] == q["free_running_identical_tokens"]


def test_int4_quality_report_with_bits_per_byte(seed):
    """int4's report: on text the model predicts, bits per byte of both models; quantizing cannot make a
    random model's predictions of random text much better or worse, and greedy agreement is a fraction."""
    model = tiny_model(seed, dtype=torch.float32, block_size=40, vocab_size=128, d_model=64)
    stream = torch.randint(0, 128, (300,)).numpy()
    with torch.inference_mode():
        q = quantization_quality(model, "int4", tokens=24, held_out=(stream, 600, 32))
    assert q["method"] == "int4" and 0 <= q["teacher_forced_agreement"] <= 1
    uniform = 299 * 7 / 600  # log2(128) bits per predicted token, 2 bytes each
    assert abs(q["bits_per_byte"] - uniform) < 0.05 * uniform
    assert abs(q["bits_per_byte_quantized"] - q["bits_per_byte"]) < 0.01 * uniform


@pytest.mark.parametrize("vocab_size", [400, 4096])
def test_stand_in_tokenizer_has_exactly_the_vocabulary(vocab_size):
    """llama.cpp's converter takes the tokenizer's vocabulary as the embedding's rows: exactly
    vocab_size tokens, ids 0..vocab_size-1, every merge made of tokens that exist; text round-trips."""
    tokenizer = llama2_style_tokenizer(vocab_size)
    vocab = tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(vocab_size))
    text = "Hello, wörld! x = 3.14\n\tdef f(): pass"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_ratio_to_llama_cpp_pairs_each_round(monkeypatch):
    """The speed against llama.cpp is the median of each round's ratio: a machine that slows down
    between rounds (as a shared VM does) moves the medians of the times, not the ratio."""
    import llm.bench.decode_peers as peers

    clock = [0.0]
    monkeypatch.setattr(peers.time, "perf_counter", lambda: clock[0])

    def engine(name, precision, ms_per_call):  # one token interval per call, warm-up first
        calls = iter(ms_per_call)

        def run(prompt, n):
            ms, times = next(calls), []
            for _ in range(n):
                clock[0] += ms / 1e3
                times.append(clock[0])
            return list(range(n)), times
        return Engine(name, precision, 1000, run)

    # rounds 3 and 4 are slow for llama.cpp's run only; the ratio of medians would say 2.5x
    rows = alternate([engine("ours, compiled", "int8", [4, 4, 8, 8, 4, 4]),
                      engine("llama.cpp, q8_0", "int8", [5, 5, 10, 10, 10, 10]),
                      engine("ours, compiled", "fp32", [9] * 6)], [1, 2], 9, repeats=5)
    assert rows[0]["steady_ms_per_token"] == pytest.approx(4) and rows[1]["steady_ms_per_token"] == pytest.approx(10)
    assert rows[0]["speed_vs_llama_cpp"] == pytest.approx(1.25)
    assert "speed_vs_llama_cpp" not in rows[1] and "speed_vs_llama_cpp" not in rows[2]  # no fp32 peer


def test_decode_benchmark_against_peers(tmp_path):
    """--peers end to end on a tiny Hugging Face directory made by transformers' classes: ours (eager and
    compiled with aot_eager, fp32 and int8) and transformers' eager generate, fp32 tokens identical; the
    llama.cpp side when llama_cpp imports and $LLAMA_CPP_DIR holds its converter, else one line saying why."""
    pytest.importorskip("transformers")
    shapes = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=64,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    hf_dir = build_hf_dir(tmp_path / "hf", shapes)
    out = tmp_path / "peers.json"
    command = ["--peers", str(hf_dir), "--quantize", "none,int8", "--compile", "aot_eager", "--prompt_len", "6",
               "--new_tokens", "8", "--repeats", "1", "--json", str(out)]
    result = subprocess.run([sys.executable, "-m", "llm.bench", "decode", *command], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    peers = json.loads(out.read_text())["peers"]
    rows = {(r["engine"], r["precision"]): r for r in peers["rows"]}
    for key in [("transformers, eager", "fp32"), ("ours, eager", "fp32"), ("ours, compiled", "fp32")]:
        assert rows[key]["identical_tokens"] and len(rows[key]["tokens"]) == 8, key
    assert {("ours, eager", "int8"), ("ours, compiled", "int8")} <= set(rows)
    for r in peers["rows"]:
        assert r["steady_tokens_per_s"] == pytest.approx(1e3 / r["steady_ms_per_token"])
        assert r["weight_gbps"] == pytest.approx(r["weight_bytes"] / r["steady_ms_per_token"] / 1e6)
        assert len(r["steady_ms_per_round"]) == 1 and r["percent_of_read"] > 0  # one round, its own bandwidth
    assert len(peers["read_bandwidth_per_round"]) == 1
    missing = llama_cpp_missing(os.environ.get("LLAMA_CPP_DIR"))
    if missing:
        assert peers["notes"] == [f"llama.cpp side skipped: {missing}"] and f"skipped: {missing}" in result.stdout
    else:
        assert rows[("llama.cpp, f32", "fp32")]["identical_tokens"] and ("llama.cpp, q8_0", "int8") in rows
        ours, theirs = rows[("ours, compiled", "int8")], rows[("llama.cpp, q8_0", "int8")]
        assert ours["speed_vs_llama_cpp"] == pytest.approx(theirs["steady_ms_per_token"] / ours["steady_ms_per_token"])


def test_unknown_benchmark_is_one_line():
    result = subprocess.run([sys.executable, "-m", "llm.bench", "nosuch"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "usage" in result.stderr


def test_finetune_example_overwrites_nothing(tmp_path):
    """--make_example into a folder that already holds an example refuses in one line and leaves
    the user's files as they were."""
    (tmp_path / "chats.jsonl").write_text("mine\n")
    result = subprocess.run([sys.executable, "-m", "llm.bench", "finetune", "--make_example", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "already exist" in result.stderr and (tmp_path / "chats.jsonl").read_text() == "mine\n"
    assert not (tmp_path / "base").exists()
    blocked = tmp_path / "chats.jsonl" / "example"  # under a file: cannot be made
    result = subprocess.run([sys.executable, "-m", "llm.bench", "finetune", "--make_example", str(blocked)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "cannot write there" in result.stderr
