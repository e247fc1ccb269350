"""The GPU suite's tooling, checked on the CPU so that GPU time is never spent on a script error:
bench/gpu_suite.sh --dry-run end to end, llm/bench/attention.py's recording of failures and of
partial sweeps, and bench/gpu/compile_configs.py's sm_90 compile of one tile."""
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra):
    """The environment without the interpreter switch conftest.py set for this process."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    return dict(env, PYTHON=sys.executable, **extra)


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite itself runs instead")
def test_dry_run(tmp_path):
    """Every step runs and records its status; the steps that need only this repository pass and
    write their files; the exit status says whether any step failed."""
    out = tmp_path / "results"
    result = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--out", str(out)],
                            cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True,
                            timeout=600)
    summary = (out / "summary.txt").read_text().splitlines()
    status = {line.split()[0]: line.split()[2] for line in summary}
    assert set(status) == {"0", "1a", "1b", "2", "3a", "3b", "3c", "3d", "4a", "5a", "6a", "6b", "6c"}, summary
    for step, state in status.items():
        assert state == "ok", (step, result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-2000:]
    assert "summary (" in result.stdout

    assert "torch" in (out / "versions.txt").read_text()
    rows = json.loads((out / "check_kernel.json").read_text())
    assert rows and all(r["ok"] and r["out"] < 1e-2 for r in rows)
    assert {r["case"] for r in rows} == {"static cache Nq=3, kv_end", "window 4, left pad",
                                         "varlen causal GQA", "varlen window 4"}
    variants = json.loads((out / "check_kernel_variants.json").read_text())
    assert [(r["options"], r["ok"]) for r in variants] == [("heavy_first,tile=16x32x4x1", True)]
    junit = ET.parse(out / "pytest.xml").getroot()
    suite = junit.find("testsuite") if junit.tag == "testsuites" else junit
    assert int(suite.get("tests")) > 0 and suite.get("failures") == "0"
    for name in ("attention_bench", "attention_long", "attention_variants", "attention_decode"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data["complete"] and data["results"], name
        assert all(r["status"] == "ok" and r["ms"] > 0 for r in data["results"]), name
        assert (out / f"{name}.csv").exists() and (out / f"{name}.png").exists()
    assert {"full", "lora"} <= set(json.loads((out / "finetune.json").read_text()))
    served = json.loads((out / "serve.json").read_text())["runs"][0]["rows"]
    assert [(r["clients"], r["failed"]) for r in served] == [(1, 0), (4, 0)]
    commands = (out / "commands.txt").read_text()
    assert "check_kernel.py" in commands and "llm.bench train" in commands
    assert "attention_variants" in (out / "figures.txt").read_text()


def test_suite_rejects_unknown_arguments():
    result = subprocess.run(["bash", "bench/gpu_suite.sh", "--fast"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "gpu_suite.sh: unknown argument --fast (see --help)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_suite_refuses_only_steps_it_lacks(tmp_path):
    """--only with no step of that number (a typo) is one line and exit 2, not a silent empty run."""
    result = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--only", "9", "--out", str(tmp_path)],
                            cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "gpu_suite.sh: --only 9 names no step (steps 0-6, or ids such as 4e: see summary.txt of a run)"]


@pytest.fixture
def bench(monkeypatch):
    from llm.bench import attention as bench
    if not bench.INTERPRETED:
        pytest.skip("the benchmark re-runs itself under the interpreter without CUDA")
    return bench


def test_bench_records_a_failure_and_goes_on(bench, tmp_path, monkeypatch):
    """One implementation that fails to compile or runs out of memory is a row, not a crash."""
    from triton.runtime.errors import OutOfResources

    def out_of_resources(q, k, v, causal):
        raise OutOfResources(300_000, 232_448, "shared memory")

    def out_of_memory(q, k, v, causal):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setitem(bench.IMPLS, "naive", out_of_resources)
    monkeypatch.setitem(bench.IMPLS, "sdpa", out_of_memory)
    bench.bench_attention(["--lengths", "16", "--modes", "fwd", "--causal", "true", "--impls",
                "naive,sdpa,triton", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "attention_bench.json").read_text())
    status = {r["impl"]: r["status"] for r in data["results"]}
    assert status["naive"].startswith("error: OutOfResources:")
    assert status["sdpa"] == "OOM" and status["triton"] == "ok"
    assert data["complete"]


def test_bench_writes_each_row_as_measured(bench, tmp_path, monkeypatch):
    """A sweep killed halfway leaves every finished row on disk."""
    measure = bench.measure
    calls = []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as when the step's timeout stops the process
        return measure(*args)

    monkeypatch.setattr(bench, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.bench_attention(["--lengths", "16,32", "--modes", "fwd", "--causal", "true", "--impls",
                    "sdpa", "--out", str(tmp_path), "--name", "partial"])
    data = json.loads((tmp_path / "partial.json").read_text())
    assert not data["complete"] and [r["seq_len"] for r in data["results"]] == [16]
    assert (tmp_path / "partial.csv").read_text().count("\n") == 2  # header + one row


def test_compile_configs_for_sm90(tmp_path):
    """One tile of the forward kernel compiles for sm_90 on this CPU-only machine, and ptxas
    reports its registers, spills and shared memory."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    table = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, "bench/gpu/compile_configs.py", "--kernels", "fwd", "--head_dims", "64",
         "--dtypes", "bf16", "--tiles", "64x64x4x3", "--json", str(table)],
        cwd=REPO_ROOT, env=clean_env(TRITON_DEFAULT_FP_FUSION="1"), capture_output=True,
        text=True, timeout=300)
    if "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip("triton's bundled ptxas is not available on this platform")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (row,) = json.loads(table.read_text())["rows"]
    assert row["verdict"] == "keep" and 0 < row["registers"] <= 255
    assert row["spill_stores"] == 0 and 0 < row["shared_kb"] <= 227
