"""The run directory as a job uses it: claimed (locked and checked) before anything runs, an old
run set aside by --overwrite only once the new one is ready, and removed after the new run's
first checkpoint.

One job per out_dir: the job holds an flock on out_dir/.run.lock (llm/files.py) from before it
touches anything until it ends. A second launch on the same out_dir (a scheduler requeueing a job
whose first instance still runs, a command run twice) stops with one line naming the holder; the
OS releases the lock when the holder dies, so the requeue of a killed job starts at once.
"""
import os
import shutil
import sys
import time
from pathlib import Path

from llm.config import RunConfig
from llm.errors import UserError
from llm.files import Lock, lock, lock_holder
from llm.formats.run_dir import holds_run, latest
from llm.train.checkpoint import Resume

RUN_FILES = ("checkpoint", "config.json", "model.safetensors", "tokenizer.json", "run.json", "metrics.jsonl", "loss.png")
REPLACED = ".replaced-"  # an old run set aside by --overwrite until the new run's first checkpoint
LOCK = ".run.lock"


def claim(run: RunConfig, resume: Resume | None) -> tuple[Path, Lock]:
    """Lock out_dir for this job, then check it (`check`). Nothing is changed here but creating the
    folder and the lock file. The caller releases the lock when the job ends."""
    out = Path(run.launch.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        held = lock(out / LOCK, wait=False)
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out}: {e.strerror}")
    if held is None:
        raise UserError(f"{out} is in use by another run ({lock_holder(out / LOCK)}): wait for it to end or stop it "
                        "(a run that has died holds nothing)")
    try:
        held.write_holder()
        check(run, resume, out)
    except BaseException:
        held.release()
        raise
    if held.unsupported:
        print(f"warning: cannot lock {out / LOCK} ({held.unsupported}): nothing stops a second launch on this "
              "out_dir from running at the same time", file=sys.stderr)
    return out, held


def check(run: RunConfig, resume: Resume | None, out: Path):
    """With the lock held: out_dir can be written, holds a run only if this command continues or
    replaces it, and the checkpoint it continues (read before the lock) is still the latest."""
    try:
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out}: {e.strerror}")
    if run.launch.resume == "false" and not run.launch.overwrite and holds_run(out):
        raise UserError(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
    now = latest(out) if resume is not None else None
    if resume is not None and now != resume.checkpoint:
        raise UserError(f"the run in {out} moved on while this command started (its latest checkpoint is now "
                        f"{now.name if now else 'none'}): run the command again")


def set_aside_old_run(out: Path):
    """--overwrite, with the new run ready: move the old run's files into a hidden folder."""
    if not holds_run(out):
        return
    aside = out / f"{REPLACED}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    names = [*RUN_FILES, *(p.name for p in out.glob("ckpt-*")), *(p.name for p in out.glob(".tmp-ckpt-*"))]
    for name in dict.fromkeys(names):
        if os.path.lexists(out / name):
            os.rename(out / name, aside / name)
    print(f"replacing the run in {out}: the old one is kept in {aside.name} until the first new checkpoint")


def drop_old_runs(out: Path):
    for old in out.glob(f"{REPLACED}*"):
        shutil.rmtree(old, ignore_errors=True)
