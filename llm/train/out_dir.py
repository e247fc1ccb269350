"""The run directory as a job uses it: checked before anything runs, an old run set aside by
--overwrite only once the new one is ready, and removed after the new run's first checkpoint."""
import os
import shutil
import time
from pathlib import Path

from llm.config import RunConfig
from llm.errors import UserError
from llm.formats.run_dir import holds_run

RUN_FILES = ("checkpoint", "config.json", "model.safetensors", "tokenizer.json", "run.json", "metrics.jsonl", "loss.png")
REPLACED = ".replaced-"  # an old run set aside by --overwrite until the new run's first checkpoint


def check(run: RunConfig) -> Path:
    """out_dir can be written, and holds a run only if this command continues or replaces it.
    Nothing is changed here but creating the folder."""
    out = Path(run.launch.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {out} exists and is not a directory")
    if run.launch.resume == "false" and not run.launch.overwrite and out.is_dir() and holds_run(out):
        raise UserError(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out}: {e.strerror}")
    return out


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
