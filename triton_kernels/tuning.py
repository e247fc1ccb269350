"""Tile shapes for the kernels: pinned, read from a shared cache, or measured once.

Triton's own autotuner measures every candidate in every process, so two ranks of one run, or a
run and its resume, can pick different tiles from timing noise and compute different bits. Here a
measured choice is published as a JSON file keyed by (kernel, problem key, device, triton version)
in a cache folder; the first process to publish wins, and every process after it, now or later,
reads and uses that choice instead of its own measurement.

    FLASH_ATTENTION_TUNE_CACHE=DIR   the cache folder (default ~/.cache/llm/flash_tune; "off":
                                     measure in every process and publish nothing)
"""
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
import triton
from triton.errors import TritonError
from triton.testing import do_bench

DEFAULT_CACHE = Path.home() / ".cache" / "llm" / "flash_tune"


class Tile(NamedTuple):
    """A launch configuration: BLOCK_M x BLOCK_N tile, warps, software-pipelining stages."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __str__(self):
        return "x".join(map(str, self))

    @classmethod
    def parse(cls, text):
        """'128x64x8x3' -> Tile(128, 64, 8, 3); ValueError with one clear line otherwise."""
        try:
            tile = cls(*(int(part) for part in text.split("x")))
        except (TypeError, ValueError):
            raise ValueError(f"tile {text!r} is not BLOCK_MxBLOCK_NxWARPSxSTAGES, e.g. 64x64x4x3") \
                from None
        powers = {16, 32, 64, 128, 256}
        if tile.block_m not in powers or tile.block_n not in powers \
                or tile.num_warps not in (1, 2, 4, 8, 16) or not 1 <= tile.num_stages <= 8:
            raise ValueError(f"tile {text!r}: blocks must be 16..256 (powers of two), warps 1..16 "
                             f"(powers of two), stages 1..8")
        return tile


def cache_dir():
    value = os.environ.get("FLASH_ATTENTION_TUNE_CACHE", "")
    if value.lower() == "off":
        return None
    return Path(value) if value else DEFAULT_CACHE


class Tuner:
    """Picks one kernel's tile per problem key among `candidates` (see the module docstring)."""

    def __init__(self, name, candidates):
        self.name = name
        self.candidates = list(candidates)
        self.chosen = {}  # key -> Tile, this process

    def pick(self, key, launch, measure=True):
        """The tile for `key` (a tuple of plain values that fixes the choice); launch(tile) runs
        the kernel once with that tile and may be called repeatedly (the kernels are idempotent).
        With measure=False (during CUDA graph capture), None where no choice exists yet."""
        tile = self.chosen.get(key)
        if tile is None:
            tile = self._cached_or_measured(key, launch, measure)
            if tile is not None:
                self.chosen[key] = tile
        return tile

    def _cached_or_measured(self, key, launch, measure):
        full_key = [self.name, *key, device_name(), triton.__version__]
        folder = cache_dir()
        path = None
        if folder is not None:
            digest = hashlib.sha256(json.dumps(full_key).encode()).hexdigest()[:20]
            path = folder / f"{self.name}-{digest}.json"
            if path.exists():
                return _read_choice(path)
        if not measure:
            return None
        timings = {}
        for tile in self.candidates:
            try:
                timings[str(tile)] = do_bench(lambda t=tile: launch(t), warmup=5, rep=20)
            except TritonError:  # out of shared memory or registers, or a compile error: skip it
                continue
        if not timings:
            raise RuntimeError(f"flash_attention: none of the {self.name} tiles "
                               f"{', '.join(map(str, self.candidates))} runs on this device")
        best = min(timings, key=timings.get)
        if path is None:
            return Tile.parse(best)
        _publish(path, dict(key=full_key, tile=best, timings_ms=timings,
                            by=f"{socket.gethostname()} pid {os.getpid()}"))
        return _read_choice(path)  # ours, or an earlier process's


def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _read_choice(path):
    try:
        return Tile.parse(json.loads(path.read_text())["tile"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"flash_attention: unreadable tuning cache file {path} ({e}); "
                           f"delete it to measure again") from None


def _publish(path, payload):
    """Write `payload` to `path` unless it exists: complete or not at all, first writer wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)  # atomic, and fails if another process published first
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: atomic, but the last writer wins
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
