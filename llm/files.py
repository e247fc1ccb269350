"""Files written whole or not at all: a temporary name beside the target, then a rename. And
exclusive locks on files, which the OS releases when their holder dies."""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import socket
import time
from pathlib import Path

from llm.errors import UserError

NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name in path's folder (same file system, so a rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")


def write_bytes(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str):
    write_bytes(path, text.encode())


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


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Lock:
    """An exclusive flock on a file, held until release() or the end of the process: the OS drops
    it when the holder dies, however it dies, so a killed holder never leaves a stale lock. The
    lock belongs to the open file, so the file is never replaced while held (no rename).

    fd is None where the file system refuses locks (some network file systems): nothing is held.
    """

    def __init__(self, fd: int | None, unsupported: str | None = None):
        self.fd, self.unsupported = fd, unsupported

    def write_holder(self):
        """Record who holds the lock (host, pid, since) in the file, for whoever finds it taken."""
        if self.fd is None:
            return
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        with contextlib.suppress(OSError):  # a record we cannot write (a full disk) costs only the holder's name
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # no holder recorded while none holds it
            os.close(self.fd)  # closing the only descriptor of the open file drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock(path: Path, wait: bool) -> Lock | None:
    """An exclusive lock on `path` (created if missing). None if another process holds it and
    wait is False; with wait, blocks until it is free."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        return Lock(None, e.strerror)  # ENOLCK, EOPNOTSUPP, ...: a file system without locks
    return Lock(fd)


def lock_holder(path: Path, patience: float = 1.0) -> str:
    """Who holds the lock on `path`, as its holder recorded it. A holder records itself just after
    it takes the lock, so an empty record is read again for up to `patience` seconds (two launches
    at once find each other within microseconds)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            holder = json.loads(Path(path).read_text())
            return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "holder not recorded yet"
            time.sleep(0.01)
