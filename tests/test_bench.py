"""The benchmarks' own logic (their figures are printed, never asserted): recipes parse and
refuse bad input, time to target is read at the first evaluation that reaches it, and the
sampling benchmark runs end to end."""
import subprocess
import sys

import pytest

from llm.bench.speedrun import RECIPES, parse_recipe, summarize
from llm.errors import UserError


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


def test_unknown_benchmark_is_one_line():
    result = subprocess.run([sys.executable, "-m", "llm.bench", "nosuch"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "usage" in result.stderr
