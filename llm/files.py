"""Files written whole or not at all: a temporary name beside the target, then a rename."""
import json
import os
import secrets
from pathlib import Path

from llm.errors import UserError


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name in path's folder (same file system, so a rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")


def write_text(path, text: str):
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path) -> dict:
    """A JSON object from a file, or a UserError naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}")
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value


def sync_dir(path: Path):
    """Flush a folder's files to disk (readable by all, as plain files are) before it becomes
    visible under its final name."""
    for f in Path(path).rglob("*"):
        if f.is_file():
            os.chmod(f, 0o644)  # some writers (temporary files) leave 0600
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
