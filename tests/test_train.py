"""train.py end to end: smoke run, checkpoints, resume bit-exactness, signals, bad input."""
import json
import os
import re
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
from llm.formats.run_dir import latest
from train import main

ROOT = Path(__file__).resolve().parent.parent


def args(corpus, cache_dir, out, *extra):
    return ["--config", "tiny", "--data", str(corpus), "--cache_dir", str(cache_dir), "--out_dir", str(out), *extra]


def weights(run_dir) -> dict:
    return load_file(Path(run_dir) / "model.safetensors")


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_smoke_run_via_command_line(corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", *args(corpus, cache_dir, out, "--max_steps", "6")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "parameters:" in result.stdout and "n_layer = 2" in result.stdout  # resolved config printed
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "run.json"):
        assert (out / name).exists(), name
    assert (out / "checkpoint" / "state" / ".metadata").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 6]
    assert any("val_loss" in r and "val_ppl" in r for r in records)
    model, tokenizer = llm.load(out)
    logits = model(torch.tensor([tokenizer.encode("def f(x):")]))
    assert logits.shape == (1, len(tokenizer.encode("def f(x):")), model.config.vocab_size)
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 6
    assert all(os.stat(f).st_mode & 0o044 for f in (out / "checkpoint").iterdir() if f.is_file())  # not 0600


@pytest.mark.parametrize("recipe", [["--optimizer", "adamw"], ["--optimizer", "muon", "--schedule", "wsd"]])
def test_loss_decreases(corpus, cache_dir, tmp_path, recipe):
    assert main(args(corpus, cache_dir, tmp_path / "run", "--max_steps", "30", "--log_interval", "1", *recipe)) == 0
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_exact(corpus, cache_dir, tmp_path, optimizer):
    """N steps, then --resume to 2N, equals 2N uninterrupted (with dropout and accumulation in play)."""
    common = ["--dropout", "0.1", "--grad_accum", "2", "--decay_steps", "8", "--ckpt_interval", "100",
              "--optimizer", optimizer]
    assert main(args(corpus, cache_dir, tmp_path / "full", "--max_steps", "8", *common)) == 0
    assert main(args(corpus, cache_dir, tmp_path / "split", "--max_steps", "4", *common)) == 0
    assert main(["--out_dir", str(tmp_path / "split"), "--resume", "--max_steps", "8"]) == 0
    assert_bit_identical(weights(tmp_path / "full"), weights(tmp_path / "split"))
    steps = [json.loads(l)["step"] for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == sorted(set(steps))  # no step logged twice


def test_sigint_checkpoints_and_resumes_exactly(corpus, cache_dir, tmp_path):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "train.py", *args(corpus, cache_dir, out, "--max_steps", "400", "--log_interval", "1",
                                             "--decay_steps", "400", "--ckpt_interval", "1000", "--eval_interval", "1000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    step = json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]
    assert 0 < step < 400
    # finish the interrupted run, and compare with a run that never stopped
    assert main(["--out_dir", str(out), "--resume", "--max_steps", str(step + 3)]) == 0
    reference = tmp_path / "reference"
    assert main(args(corpus, cache_dir, reference, "--max_steps", str(step + 3), "--decay_steps", "400",
                     "--ckpt_interval", "1000", "--eval_interval", "1000")) == 0
    assert_bit_identical(weights(reference), weights(out))


KILLER = """
import sys, torch
from pathlib import Path
from llm.train import checkpoint
from llm.config import resolve
from llm.train.distributed import Dist
from llm.model.transformer import Transformer
from llm.model.tokenizer import Tokenizer
run = resolve("tiny", {{}})
model = Transformer(run.model)
optimizer = torch.optim.AdamW(model.parameters())
tokenizer = Tokenizer.train(["abc def"] * 3, 260)
step = {start}
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)  # the weights say which step they belong to
    checkpoint.save(Path(sys.argv[1]), checkpoint.Progress(step=step, tokens_seen=step), model, optimizer, tokenizer, run, Dist())
"""


def test_checkpoint_killed_midway_leaves_previous_loadable(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def saved_step(ckpt):
        return json.loads((ckpt / "trainer.json").read_text())["step"]

    def latest_step():
        ckpt = latest(run_dir)
        try:
            return 0 if ckpt is None else saved_step(ckpt)
        except FileNotFoundError:  # the writer deleted it as it was read
            return 0

    last = 0
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", KILLER.format(start=last), str(run_dir)], cwd=ROOT,
                                stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and latest_step() <= last:
            time.sleep(0.05)
        time.sleep(0.1 + 0.15 * attempt)  # land somewhere inside a later save
        proc.kill()
        proc.wait()
        model, _ = llm.load(run_dir)  # the latest complete checkpoint, whatever instant the kill hit
        step = saved_step(latest(run_dir))
        assert step > last
        assert all(torch.all(p == step) for p in model.parameters())
        # the `checkpoint` link may still name an earlier one (killed between a rename and the link's
        # update), but what it names is complete and consistent
        linked, _ = llm.load(run_dir / "checkpoint")
        assert saved_step(run_dir / "checkpoint") <= step
        assert all(torch.all(p == saved_step(run_dir / "checkpoint")) for p in linked.parameters())
        last = step


def test_lock_holder_waits_for_a_holder_that_has_not_recorded_itself_yet(tmp_path):
    """Two launches at once: the loser can read the lock file between the winner's flock and its
    record. It reads again for a moment and names the holder; a record that never comes is said so."""
    import threading

    from llm.files import lock, lock_holder

    path = tmp_path / "lock"
    held = lock(path, wait=False)
    assert lock(path, wait=False) is None  # taken
    assert lock_holder(path, patience=0) == "holder not recorded yet"
    threading.Timer(0.2, held.write_holder).start()
    assert lock_holder(path) == lock_holder(path, patience=0)  # waited for the record
    assert f"pid {os.getpid()}" in lock_holder(path, patience=0)
    held.release()


def test_one_run_per_out_dir_and_a_killed_holder_blocks_nothing(corpus, cache_dir, tmp_path):
    """Two identical launches at once: one trains, the other stops with one line naming it (host, pid,
    since) and touching nothing; once the holder is SIGKILLed, the requeued command continues the run."""
    out = tmp_path / "run"

    def command(max_steps):
        return args(corpus, cache_dir, out, "--resume=auto", "--max_steps", str(max_steps), "--decay_steps", "100000",
                    "--ckpt_interval", "1", "--eval_interval", "100000", "--log_interval", "100000")

    launches = []
    for i in range(2):
        with open(tmp_path / f"{i}.out", "w") as o, open(tmp_path / f"{i}.err", "w") as e:
            launches.append(subprocess.Popen([sys.executable, "train.py", *command(100000)], cwd=ROOT,
                                             stdout=o, stderr=e))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and all(p.poll() is None for p in launches):
            time.sleep(0.05)
        stopped = [i for i, p in enumerate(launches) if p.poll() is not None]
        assert len(stopped) == 1, "both launches still run (or both stopped)"
        loser, winner = launches[stopped[0]], launches[1 - stopped[0]]
        printed, err = ((tmp_path / f"{stopped[0]}.{kind}").read_text() for kind in ("out", "err"))
        assert loser.returncode == 2 and printed == ""
        holder = rf"\(host {re.escape(socket.gethostname())}, pid {winner.pid}, since [^)]+\)"
        assert re.fullmatch(rf"error: {re.escape(str(out))} is in use by another run {holder}: [^\n]+\n", err), err
        while time.time() < deadline and latest(out) is None:
            time.sleep(0.05)
        assert winner.poll() is None  # it trains on, checkpointing every step
    finally:
        for p in launches:
            if p.poll() is None:
                p.kill()
            p.wait()
    step = json.loads((latest(out) / "trainer.json").read_text())["step"]
    assert main(command(step + 2)) == 0  # the requeue: the lock died with its holder
    assert json.loads((latest(out) / "trainer.json").read_text())["step"] == step + 2


FILE_SIZE_LIMITED = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""


METRICS_FILE_SIZE_LIMITED = """
import random, resource, sys
from pathlib import Path
from llm.train.metrics import MetricsLog
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
log = MetricsLog(Path(sys.argv[1]), enabled=True)
for step in range(1, 41):
    log.log({"step": step, "loss": random.random(), "tokens": random.randrange(10**9)})
    if step % 10 == 0:
        log.plot()
"""


def test_metrics_on_a_full_disk_are_skipped_with_one_warning(tmp_path):
    """metrics.jsonl and loss.png past a file-size limit: one warning line, the run goes on, the
    records that fit stay readable (a line cut short is left out), no temporary file is left, and a
    resume keeps what it should."""
    limit = int(torch.randint(200, 1200, ()))
    result = subprocess.run([sys.executable, "-c", METRICS_FILE_SIZE_LIMITED, str(tmp_path), str(limit)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()  # the plot or the log, whichever is first to find no room
    assert re.fullmatch(f"warning: cannot write {re.escape(str(tmp_path))}/(metrics.jsonl|loss.png): File too large; "
                        "metrics are skipped while there is no room", line), line
    from llm.train.metrics import MetricsLog
    records = MetricsLog(tmp_path, enabled=True).records()
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and 0 < len(records) < 40
    assert (tmp_path / "metrics.jsonl").stat().st_size <= limit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # the plot did not fit, nor any tmp
    kept = MetricsLog(tmp_path, enabled=True, resume_step=len(records) // 2).records()
    assert kept == records[:len(records) // 2]


def test_a_checkpoint_that_cannot_be_written_is_one_line(corpus, cache_dir, tmp_path):
    """Under a file-size limit (as under a full disk or a quota) the checkpoint write fails: one line naming
    the folder and the bytes needed, exit status 2, the previous checkpoint untouched and loadable, no
    half-written one left; --resume then reaches the end as if nothing had happened."""
    out = tmp_path / "run"
    command = args(corpus, cache_dir, out, "--decay_steps", "4", "--ckpt_interval", "2")
    assert main(command + ["--max_steps", "2"]) == 0
    before = {p: p.read_bytes() for p in latest(out).rglob("*") if p.is_file()}
    limit = max(len(data) for data in before.values()) // 2  # the sharded state does not fit; logs and plots do
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED, str(limit), *command, "--max_steps", "4",
                             "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and not line.startswith("training")]
    assert lines == [lines[-1]] and lines[-1].startswith(f"error: cannot write checkpoint ckpt-0000004 in {out}: "
                                                         "File too large [EFBIG]; it needs about "), result.stderr
    assert "ckpt-0000002" in lines[-1]
    assert latest(out).name == "ckpt-0000002"
    assert {p: p.read_bytes() for p in latest(out).rglob("*") if p.is_file()} == before
    assert not [p for p in out.iterdir() if "tmp" in p.name]
    llm.load(out)
    assert main(command + ["--max_steps", "4", "--resume"]) == 0
    assert main(args(corpus, cache_dir, tmp_path / "straight", "--decay_steps", "4", "--max_steps", "4")) == 0
    assert_bit_identical(weights(tmp_path / "straight"), weights(out))


def test_too_little_space_for_a_checkpoint_is_said_before_training(corpus, cache_dir, tmp_path, capsys, monkeypatch):
    import shutil

    from llm.train.checkpoint import human_bytes

    free = int.from_bytes(os.urandom(2), "little")  # bytes: far less than any checkpoint
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    assert main(args(corpus, cache_dir, tmp_path / "run", "--max_steps", "1")) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "a checkpoint of this run needs about" in warning[0]
    assert f"has {human_bytes(free)} free" in warning[0]


@pytest.mark.parametrize("extra, message", [
    (["--n_layers=3"], "unrecognized arguments: --n_layers=3 (did you mean --n_layer?)"),
    (["--d_model", "30"], "d_model=30 is not divisible by n_head=4"),
    (["--n_kv_head", "3"], "n_head=4 is not divisible by n_kv_head=3"),
    (["--lr", "0"], "lr must be positive"),
    (["--lr=-1e-3"], "lr must be positive"),
    (["--max_steps", "0"], "max_steps must be positive"),
    (["--batch_size", "-2"], "batch_size must be positive"),
    (["--n_layer", "two"], "--n_layer expects int, got 'two'"),
    (["--data", "/no/such/corpus"], "no files found at /no/such/corpus"),
    (["--config", "nope"], "no config named 'nope'"),
    (["--grad_clip=-1"], "grad_clip must be >= 0"),
    (["--warmup_steps", "10", "--decay_steps", "5"], "decay_steps=5 must be at least warmup_steps=10"),
    (["--beta2", "1.5"], "beta2 must be in [0, 1)"),
    (["--weight_decay=-0.1"], "weight_decay must be >= 0"),
    (["--max_bad_steps", "0"], "max_bad_steps must be positive"),
    (["--optimizer", "sgd"], "optimizer='sgd' is not one of adamw, muon"),
    (["--resume"], "holds no complete checkpoint"),
    (["--resume=maybe"], "--resume takes true, false or auto"),
    (["--resume", "--overwrite"], "choose one"),
    (["--attention", "triton", "--head_dim", "24"], "attention=triton: our kernel supports head dims 16, 32, 64, 128 only"),
])
def test_bad_input_one_line(corpus, cache_dir, tmp_path, capsys, extra, message):
    argv = args(corpus, cache_dir, tmp_path / "run") + extra
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_bad_input_from_the_shell(tmp_path):
    """The real command line: one line on stderr, exit status 2, no traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "train.py", "--data", str(empty), "--out_dir", str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: no files found at {empty}\n"


def test_unknown_key_in_config_file(corpus, cache_dir, tmp_path, capsys):
    (tmp_path / "mine.toml").write_text('n_layer = 2\nlearning_rate = 0.1\n')
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "mine.toml"), "--data", str(corpus), "--out_dir", str(tmp_path / "o")])
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err


def test_existing_run_is_never_overwritten(corpus, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, cache_dir, out, "--max_steps", "2")) == 0
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit):
        main(args(corpus, cache_dir, out, "--max_steps", "3"))
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(args(corpus, cache_dir, out, "--max_steps", "3", "--overwrite")) == 0
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 3


def test_init_from_starts_fresh_from_weights(corpus, cache_dir, tmp_path):
    source = tmp_path / "source"
    assert main(args(corpus, cache_dir, source, "--max_steps", "3")) == 0
    out = tmp_path / "finetune"
    assert main(args(corpus, cache_dir, out, "--init_from", str(source), "--max_steps", "1", "--lr", "1e-12",
                     "--warmup_steps", "0", "--weight_decay", "0")) == 0
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 1  # a new schedule
    a, b = weights(source), weights(out)
    for name in a:  # a ~zero learning rate: the weights are the source's
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert (out / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()


def test_init_from_keeps_architecture(corpus, cache_dir, tmp_path, capsys):
    source = tmp_path / "source"
    assert main(args(corpus, cache_dir, source, "--max_steps", "1")) == 0
    with pytest.raises(SystemExit):
        main(args(corpus, cache_dir, tmp_path / "o", "--init_from", str(source), "--n_layer", "3"))
    assert "cannot change n_layer" in capsys.readouterr().err


def test_compiled_model_saves_plain_names(corpus, cache_dir, tmp_path, monkeypatch):
    eager_compile = lambda model, **kw: torch._dynamo.optimize("eager")(model)  # no C++ toolchain needed
    monkeypatch.setattr(torch, "compile", eager_compile)
    out = tmp_path / "compiled"
    assert main(args(corpus, cache_dir, out, "--max_steps", "2", "--compile")) == 0
    names = weights(out).keys()
    assert not any("_orig_mod" in n for n in names)
    llm.load(out)


def test_checkpoint_config_must_match_weights(corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert main(args(corpus, cache_dir, out, "--max_steps", "1")) == 0
    ckpt = latest(out)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "d_model": 128, "ffn_hidden": None}))
    with pytest.raises(llm.errors.UserError, match="config.json does not match model.safetensors"):
        llm.load(out)


def test_truncated_weights(corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert main(args(corpus, cache_dir, out, "--max_steps", "1")) == 0
    path = latest(out) / "model.safetensors"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(llm.errors.UserError, match="not a valid safetensors file"):
        llm.load(out)


# --- what real users feed the toolkit (issue 10) ---------------------------------------------------


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """One plain-text file, tinyshakespeare-sized: the most common first run."""
    from llm.train.data import stdlib_sources

    text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in stdlib_sources()[:60])[:360_000]
    path = tmp_path_factory.mktemp("one_file") / "input.txt"
    path.write_text(text)
    return path


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_one_text_file_trains_and_resumes_with_the_same_command(text_file, cache_dir, tmp_path, capsys):
    command = args(text_file, cache_dir, tmp_path / "run", "--decay_steps", "6")
    assert main(command + ["--max_steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "validation: the last" in out  # one document: split by tokens, both splits hold windows
    assert main(command + ["--max_steps", "6", "--resume"]) == 0  # the command that started it, + --resume
    assert "resuming with changed settings: max_steps 3 -> 6" in capsys.readouterr().out
    assert main(args(text_file, cache_dir, tmp_path / "full", "--decay_steps", "6", "--max_steps", "6")) == 0
    assert_bit_identical(weights(tmp_path / "full"), weights(tmp_path / "run"))


def test_resume_auto_starts_then_continues(corpus, cache_dir, tmp_path):
    """A requeue script needs no logic: the same command starts the run and continues it."""
    command = args(corpus, cache_dir, tmp_path / "run", "--resume=auto", "--decay_steps", "4")
    assert main(command + ["--max_steps", "2"]) == 0
    assert main(command + ["--max_steps", "4"]) == 0
    assert main(args(corpus, cache_dir, tmp_path / "full", "--decay_steps", "4", "--max_steps", "4")) == 0
    assert_bit_identical(weights(tmp_path / "full"), weights(tmp_path / "run"))
    assert [r["step"] for r in metrics(tmp_path / "run") if "val_loss" in r] == [2, 4]


def test_training_settings_change_on_resume_and_take_effect(corpus, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, cache_dir, out, "--max_steps", "2")) == 0
    assert main(args(corpus, cache_dir, out, "--max_steps", "3", "--resume", "--weight_decay", "0.05",
                     "--beta1", "0.8", "--beta2", "0.9", "--lr", "1e-3")) == 0
    printed = capsys.readouterr().out
    for change in ("weight_decay 0.1 -> 0.05", "beta1 0.9 -> 0.8", "beta2 0.95 -> 0.9", "lr 0.003 -> 0.001"):
        assert change in printed
    saved = json.loads((latest(out) / "run.json").read_text())["train"]
    assert (saved["weight_decay"], saved["beta1"], saved["lr"]) == (0.05, 0.8, 1e-3)
    # the optimizer used them: its saved state carries the new values, not the restored old ones
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    state = {}
    dcp.state_dict_loader._load_state_dict(state, dcp.FileSystemReader(latest(out) / "state"),
                                           planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    groups = state["optim"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.05, 0.0} and {tuple(g["betas"]) for g in groups} == {(0.8, 0.9)}


@pytest.mark.parametrize("change, message", [
    (["--n_layer", "3"], "cannot change n_layer (2 -> 3)"),
    (["--ffn", "gelu"], "cannot change ffn (swiglu -> gelu)"),
    (["--seed", "7"], "keeps the run's data: cannot change seed"),
    (["--val_fraction", "0.2"], "keeps the run's data: cannot change val_fraction"),
])
def test_resume_refuses_architecture_and_data_changes(corpus, cache_dir, tmp_path, capsys, change, message):
    out = tmp_path / "run"
    assert main(args(corpus, cache_dir, out, "--max_steps", "1")) == 0
    before = weights(out)
    with pytest.raises(SystemExit):
        main(args(corpus, cache_dir, out, "--max_steps", "2", "--resume", *change))
    assert message in capsys.readouterr().err
    assert_bit_identical(before, weights(out))


def test_init_from_run_resumes_like_any_other(corpus, cache_dir, tmp_path):
    source = tmp_path / "source"
    assert main(args(corpus, cache_dir, source, "--max_steps", "2")) == 0
    command = args(corpus, cache_dir, tmp_path / "tuned", "--init_from", str(source), "--decay_steps", "4")
    assert main(command + ["--max_steps", "2"]) == 0
    assert json.loads((tmp_path / "tuned" / "run.json").read_text())["init_from"] == str(source)
    assert main(command + ["--max_steps", "4", "--resume"]) == 0
    assert json.loads((latest(tmp_path / "tuned") / "trainer.json").read_text())["step"] == 4
    assert main(command[:-4] + ["--out_dir", str(tmp_path / "direct"), "--init_from", str(source),
                                "--decay_steps", "4", "--max_steps", "4"]) == 0
    assert_bit_identical(weights(tmp_path / "direct"), weights(tmp_path / "tuned"))


def test_run_copied_without_links_resumes(corpus, cache_dir, tmp_path):
    """cp -rL, cloud sync, shutil.copytree's defaults: links become plain files and folders."""
    import shutil

    out = tmp_path / "run"
    assert main(args(corpus, cache_dir, out, "--max_steps", "2", "--decay_steps", "4")) == 0
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert not (copy / "checkpoint").is_symlink() and (copy / "checkpoint").is_dir()
    llm.load(copy)
    assert main(["--out_dir", str(copy), "--resume", "--max_steps", "4"]) == 0
    assert (copy / "checkpoint").is_symlink() and (copy / "model.safetensors").is_symlink()
    assert main(args(corpus, cache_dir, out, "--max_steps", "4", "--resume")) == 0
    assert_bit_identical(weights(out), weights(copy))


def test_overwrite_with_bad_input_keeps_the_old_run(corpus, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, cache_dir, out, "--max_steps", "2")) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    capsys.readouterr()
    for bad in (["--data", str(empty)], ["--data", str(tmp_path / "missing")], ["--block_size", "10000000"],
                ["--vocab_size", "100"]):
        with pytest.raises(SystemExit):
            main(args(corpus, cache_dir, out, "--max_steps", "2", "--overwrite", *bad))
        assert capsys.readouterr().err.rsplit("\r", 1)[-1].startswith("error: ")  # progress bars clear themselves
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(args(corpus, cache_dir, out, "--max_steps", "1", "--overwrite")) == 0
    assert [p.name for p in out.iterdir() if p.name.startswith(".replaced")] == []  # dropped after the new checkpoint
    assert json.loads((latest(out) / "trainer.json").read_text())["step"] == 1


@pytest.fixture
def poisoned_steps(monkeypatch):
    """Make the training loss NaN at chosen (1-based) training forward passes of each new model."""
    from llm.model.transformer import Transformer

    bad = set()
    forward = Transformer.forward

    def poisoned(self, idx, targets=None, **kwargs):
        out = forward(self, idx, targets, **kwargs)
        if targets is not None and self.training:
            self.poison_count = getattr(self, "poison_count", 0) + 1
            if self.poison_count in bad:
                out = out * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    return bad


def test_a_nan_step_is_skipped_and_counted(corpus, cache_dir, tmp_path, poisoned_steps):
    common = ["--decay_steps", "10", "--log_interval", "1"]
    assert main(args(corpus, cache_dir, tmp_path / "two", "--max_steps", "2", *common)) == 0
    poisoned_steps.add(3)
    assert main(args(corpus, cache_dir, tmp_path / "three", "--max_steps", "3", *common)) == 0
    assert_bit_identical(weights(tmp_path / "two"), weights(tmp_path / "three"))  # step 3 changed nothing
    records = metrics(tmp_path / "three")
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 0, 1]
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "three").values())


def test_consecutive_bad_steps_stop_the_run_and_keep_the_checkpoint(corpus, cache_dir, tmp_path, capsys, poisoned_steps):
    out = tmp_path / "run"
    poisoned_steps.update(range(3, 100))
    with pytest.raises(SystemExit) as exit_info:
        main(args(corpus, cache_dir, out, "--max_steps", "20", "--ckpt_interval", "2", "--max_bad_steps", "3"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "3 steps in a row had a non-finite loss or gradient norm (up to step 5)" in err and "Traceback" not in err
    ckpt = latest(out)
    assert ckpt.name == "ckpt-0000004"  # step 4 (skipped, weights still good) was the last save
    assert all(torch.isfinite(w).all() for w in weights(out).values())


@pytest.mark.parametrize("first", ["float32", "bfloat16"])
def test_resumed_run_keeps_the_dtype_auto_would_decide_again(corpus, cache_dir, tmp_path, capsys, first):
    """--dtype auto may measure (llm/runtime.py); a resumed run does not measure again but keeps the
    dtype it trained in, whichever that was and whatever this machine would pick now."""
    out = tmp_path / "run"
    assert main(args(corpus, cache_dir, out, "--max_steps", "2", "--dtype", first)) == 0
    capsys.readouterr()
    assert main(args(corpus, cache_dir, out, "--max_steps", "4", "--dtype", "auto", "--resume")) == 0
    printed = capsys.readouterr().out
    assert f"dtype: {first} (auto: the dtype this run has trained in)" in printed
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["dtype"] == first
