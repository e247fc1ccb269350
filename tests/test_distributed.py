"""FSDP under torchrun on CPU (gloo, 2 processes): same training as one process, resharding resume,
and two torchrun "nodes" on one machine.

Tolerance: fp32, losses within 1e-5 relative and weights within 1e-5 relative / 1e-6 absolute.
(Gradient reduction sums in a different order than accumulation in one process may; on this
machine the two runs come out bit-identical.)
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llm
from train import main

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(cmd, timeout=300):
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def assert_same_weights(a, b, rtol=1e-5, atol=1e-6):
    wa, wb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def runs(corpus, cache_dir, tmp_path_factory):
    """6 steps on 2 processes and on 1 process (same global batch), each then resumed on the other to 12."""
    base = tmp_path_factory.mktemp("fsdp")
    common = ["train.py", "--config", "tiny", "--data", str(corpus), "--cache_dir", str(cache_dir),
              "--log_interval", "1", "--decay_steps", "12", "--batch_size", "4"]
    two, one = base / "two", base / "one"
    run(TORCHRUN + common + ["--out_dir", str(two), "--max_steps", "6", "--grad_accum", "1"])
    run([sys.executable] + common + ["--out_dir", str(one), "--max_steps", "6", "--grad_accum", "2"])
    snapshot = {name: losses(path) for name, path in (("two", two), ("one", one))}
    weights6 = {name: load_file(path / "model.safetensors") for name, path in (("two", two), ("one", one))}
    run([sys.executable, "train.py", "--out_dir", str(two), "--resume", "--max_steps", "12", "--grad_accum", "2"])
    run(TORCHRUN + ["train.py", "--out_dir", str(one), "--resume", "--max_steps", "12", "--grad_accum", "1"])
    return {"two": two, "one": one, "losses6": snapshot, "weights6": weights6}


def test_two_processes_train_like_one(runs):
    two, one = runs["losses6"]["two"], runs["losses6"]["one"]
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    for name in runs["weights6"]["one"]:
        torch.testing.assert_close(runs["weights6"]["two"][name], runs["weights6"]["one"][name], rtol=1e-5, atol=1e-6)


def test_resume_across_world_sizes(runs):
    """2 -> 1 and 1 -> 2 processes: both continue the same trajectory."""
    state = json.loads((runs["two"] / "checkpoint" / "trainer.json").read_text())
    assert (state["step"], state["tokens_seen"], state["world_size"]) == (12, 12 * 8 * 64, 1)
    assert json.loads((runs["one"] / "checkpoint" / "trainer.json").read_text())["world_size"] == 2
    a, b = losses(runs["two"]), losses(runs["one"])
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step
    assert_same_weights(runs["two"], runs["one"])


def test_consolidated_weights_load_without_torchrun(runs):
    model, tokenizer = llm.load(runs["one"])  # written by a 2-process run
    ids = torch.tensor([tokenizer.encode("def main():")])
    assert model(ids).shape == (1, ids.size(1), model.config.vocab_size)
    assert (runs["one"] / "checkpoint" / "state" / "__1_0.distcp").exists()  # rank 1 wrote its own shard


def test_activation_checkpointing_changes_nothing_but_memory(seed):
    from llm.train.distributed import Dist, parallelize
    from tests.helpers import tiny_model

    x = torch.randint(0, 97, (2, 17))
    grads = []
    for checkpointing in (False, True):
        model = parallelize(tiny_model(seed).train(), Dist(), None, activation_checkpointing=checkpointing)
        model(x[:, :-1], x[:, 1:]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert list(model.state_dict()) == list(tiny_model(seed).state_dict())  # no wrapper prefixes in saved names
    assert len(grads[0]) == len(grads[1])
    for (na, a), (nb, b) in zip(grads[0].items(), grads[1].items()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=na)


def test_sigterm_to_torchrun_saves_a_checkpoint(corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(TORCHRUN + ["train.py", "--config", "tiny", "--data", str(corpus), "--cache_dir", str(cache_dir),
                                        "--out_dir", str(out), "--max_steps", "100000", "--log_interval", "1",
                                        "--ckpt_interval", "100000"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "checkpoint saved" in stderr
    step = json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]
    assert 0 < step < 100000 and json.loads((out / "checkpoint" / "trainer.json").read_text())["world_size"] == 2
    llm.load(out)


def test_an_error_on_a_rank_ends_the_job_with_one_line(tmp_path):
    result = subprocess.run(TORCHRUN + ["train.py", "--config", "tiny", "--data", str(tmp_path / "missing"),
                                        "--out_dir", str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"error: no files found at {tmp_path / 'missing'}" in result.stderr
    assert "[rank1]: Traceback" not in result.stderr  # the other rank stops cleanly too, no hang


def test_one_text_file_under_torchrun_with_the_same_command_resumed(cache_dir, tmp_path):
    """Two processes, one plain-text file (one document: split by tokens), then the same command + --resume."""
    from llm.train.data import stdlib_sources

    text = tmp_path / "input.txt"
    text.write_text("".join(open(f, encoding="utf-8", errors="replace").read() for f in stdlib_sources()[:40])[:200_000])
    command = TORCHRUN + ["train.py", "--config", "tiny", "--data", str(text), "--cache_dir", str(cache_dir),
                          "--out_dir", str(tmp_path / "run"), "--decay_steps", "4", "--batch_size", "4"]
    run(command + ["--max_steps", "2"])
    result = run(command + ["--max_steps", "4", "--resume"])
    assert "resuming from" in result.stdout
    assert json.loads((llm.formats.run_dir.latest(tmp_path / "run") / "trainer.json").read_text())["step"] == 4
    assert sorted(losses(tmp_path / "run")) == [2, 4]  # the last step of each command is logged


def test_muon_state_is_sharded_and_reshards(corpus, cache_dir, tmp_path):
    """Muon under FSDP: 2 processes train like 1, and its sharded state resumes on 1 process."""
    common = ["train.py", "--config", "tiny", "--data", str(corpus), "--cache_dir", str(cache_dir), "--log_interval", "1",
              "--decay_steps", "6", "--batch_size", "4", "--optimizer", "muon"]
    run(TORCHRUN + common + ["--out_dir", str(tmp_path / "two"), "--max_steps", "3", "--grad_accum", "1"])
    assert (tmp_path / "two" / "checkpoint" / "state" / "__1_0.distcp").exists()
    run([sys.executable] + common + ["--out_dir", str(tmp_path / "two"), "--max_steps", "6", "--grad_accum", "2", "--resume"])
    run([sys.executable] + common + ["--out_dir", str(tmp_path / "one"), "--max_steps", "6", "--grad_accum", "2"])
    a, b = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step
    assert_same_weights(tmp_path / "two", tmp_path / "one")


@pytest.mark.parametrize("rank", [None, "1"])
def test_a_torchrun_worker_exits_without_interpreter_teardown(rank):
    """Exit status and flushed output always; atexit (and with it gloo's teardown) only outside torchrun."""
    program = ("import atexit, sys; from llm.train.distributed import exit_process\n"
               "atexit.register(lambda: print('teardown'))\n"
               "print('last words', end=''); print('on stderr', file=sys.stderr, end=''); exit_process(3)")
    env = {k: v for k, v in os.environ.items() if k != "RANK"} | ({"RANK": rank} if rank else {})
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout.startswith("last words") and result.stderr == "on stderr"
    assert ("teardown" in result.stdout) == (rank is None)


# Imported before the job starts, then launches train.py when told to (the trigger file): so that the
# second launch asks for out_dir's lock within a few steps of the job, not after seconds of imports.
SECOND_LAUNCH = """
import os, runpy, sys, time
import llm.train.trainer
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_share_out_dir_and_cache_stop_together_and_resume_on_other_shapes(corpus, tmp_path):
    """Two torchrun "nodes" (--nnodes=2, c10d rendezvous on 127.0.0.1, one process each) sharing out_dir and
    cache_dir: the corpus is tokenized once; a second launch on out_dir is refused; SIGTERM to one node's
    launcher saves one checkpoint and stops both; the run resumes on one node (--nnodes=1) of 2 processes,
    then in one process; every step equals one process with accumulation."""
    out, cache, trigger = tmp_path / "run", tmp_path / "cache", tmp_path / "go"
    common = ["--config", "tiny", "--data", str(corpus), "--cache_dir", str(cache), "--batch_size", "4",
              "--log_interval", "1", "--decay_steps", "200", "--ckpt_interval", "100000", "--eval_interval", "100000"]
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes, second = [], None
    try:
        for node in range(2):
            node_cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={tmp_path.name}",
                        f"--rdzv_conf=is_host={int(node == 0)},join_timeout=120", "--local_addr=127.0.0.1",
                        "train.py", *common, "--out_dir", str(out), "--max_steps", "100000"]
            with open(tmp_path / f"node{node}.out", "w") as o, open(tmp_path / f"node{node}.err", "w") as e:
                nodes.append(subprocess.Popen(node_cmd, cwd=ROOT, env=env, stdout=o, stderr=e, start_new_session=True))
        second = subprocess.Popen([sys.executable, "-c", SECOND_LAUNCH, str(trigger), *common, "--out_dir", str(out),
                                   "--resume=auto", "--max_steps", "10"],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            assert all(n.poll() is None for n in nodes), "a node stopped before training"
            time.sleep(0.1)
        trigger.touch()
        _, second_err = second.communicate(timeout=120)
        nodes[1].send_signal(signal.SIGTERM)  # the launcher of the node that does not host the rendezvous
        for n in nodes:
            n.wait(timeout=120)
        for n in nodes:  # every worker is gone with its launcher
            with pytest.raises(ProcessLookupError):
                os.killpg(n.pid, 0)
    finally:  # nothing left running, whatever failed
        for n in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(n.pid, signal.SIGKILL)
            n.wait()
        if second is not None and second.poll() is None:
            second.kill()
            second.wait()
    printed = {kind: (tmp_path / f"node0.{kind}").read_text() + (tmp_path / f"node1.{kind}").read_text()
               for kind in ("out", "err")}
    assert second.returncode == 2
    assert second_err.startswith(f"error: {out} is in use by another run (host {socket.gethostname()}, pid ")
    assert second_err.count("\n") == 1
    assert printed["out"].count("trained a tokenizer") == 1 and printed["out"].count("tokenized ") == 1
    assert all(n.returncode != 0 for n in nodes)
    saved = [p.name for p in out.iterdir() if p.name.startswith(("ckpt-", ".tmp-ckpt-"))]
    step = json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]
    assert saved == [f"ckpt-{step:07d}"] and printed["err"].count(f"stopped at step {step}; checkpoint saved") == 1
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["world_size"] == 2

    run(TORCHRUN + ["--nnodes=1", "train.py", "--out_dir", str(out), "--resume", "--max_steps", str(step + 2)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: on a busy machine two threads of a tiny model mostly wait
    try:
        assert main(["--out_dir", str(out), "--resume", "--max_steps", str(step + 4), "--grad_accum", "2"]) == 0
        one = [*common, "--out_dir", str(tmp_path / "one"), "--max_steps", str(step + 4), "--grad_accum", "2"]
        assert main(one) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = losses(out), losses(tmp_path / "one")
    assert sorted(a) == sorted(b) == list(range(1, step + 5))
    for i in a:
        assert a[i] == pytest.approx(b[i], rel=1e-5), i
    # As many steps as ran before the SIGTERM (20-80 here, more on a slower machine): the order of the
    # sums drifts by ~1e-7 at 20 steps and grows; one step or one batch more or less is ~1e-3.
    assert_same_weights(out, tmp_path / "one", rtol=1e-4, atol=2e-5)
