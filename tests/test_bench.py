"""The benchmarks' own logic (their figures are printed, never asserted): recipes parse and
refuse bad input, time to target is read at the first evaluation that reaches it, and the
sampling benchmark runs end to end."""
import json
import subprocess
import sys

import pytest
import torch

from llm.bench.decode import quantization_quality
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
        ("none", False), ("none", "aot_eager"), ("int8", False), ("int8", "aot_eager")]
    for row in results["rows"]:
        assert row["ms_per_step"] == pytest.approx(1e3 / row["tokens_per_s"])  # batch 1
        assert row["percent_of_read"] == pytest.approx(100 * row["achieved_gbps"] / row["read_bandwidth_gbps"])
    (hf,) = results["transformers"]
    ours = {r["ours"]: r for r in hf["ours"]}
    assert list(ours) == ["eager", "compiled", "int8", "int8 compiled"]
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


def test_unknown_benchmark_is_one_line():
    result = subprocess.run([sys.executable, "-m", "llm.bench", "nosuch"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "usage" in result.stderr
