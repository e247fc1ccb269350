"""The decode step on CPU compiled ahead of time: AOTInductor's C++ over the exported step.

torch.compile's step pays, every token, for Dynamo's guards (the model's structure and every
weight's size, ~370 tensors at 30 layers) and for inductor's Python wrapper (allocating ~550
small buffers and passing ~1,300 pointers to the generated kernels): 1.4-2 ms of a 7-9 ms step at
SmolLM2-135M's shapes (docs/decoding.md). AOTInductor compiles the same kernels with a C++
wrapper and runs them with neither. The weights and the KV cache are not copied into the
compiled package: the runner reads the model's and the cache's own tensors (`user_managed`),
so an eager prefill and the step share one cache.

A package depends only on the exported graph (shapes, dtypes, ops) and the options, so it is
kept in inductor's cache folder under that key (the KEPT_PACKAGES used last): the same model at
the same sizes compiles once per machine. A step serves one model at one set of shapes; a new
cache of the same shapes is pointed to, not compiled again.
"""
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from llm.errors import UserError
from llm.infer.kv_cache import KVCache

KEPT_PACKAGES = 32


class StepModule(nn.Module):
    """decode_one over one model and one cache's buffers, as torch.export takes it. The cache's
    position is an input, not a buffer: AOTInductor folds what buffers alone determine into
    constants, and the position changes every step."""

    def __init__(self, model, cache: KVCache):
        super().__init__()
        self.model, self.n_layer, self.max_len = model, len(cache.k), cache.max_len
        for name, tensor in cache_tensors(cache).items():
            self.register_buffer(name, tensor)

    def forward(self, token, pos, kv_start=None):  # llm.infer.generate.decode_one's computation
        k = [getattr(self, f"k{i}") for i in range(self.n_layer)]
        v = [getattr(self, f"v{i}") for i in range(self.n_layer)]
        cache = KVCache.view(k, v, self.max_len, pos, self.rows)
        return self.model(token, kv_start=kv_start, cache=cache, last_only=True)[:, -1]


def cache_tensors(cache: KVCache) -> dict[str, torch.Tensor]:
    return {**{f"k{i}": t for i, t in enumerate(cache.k)}, **{f"v{i}": t for i, t in enumerate(cache.v)},
            "rows": cache.rows}


def package_key(program, options: dict) -> str:
    """What a compiled package depends on: the graph, its tensors' shapes and dtypes, the options,
    the threads its parallel loops were generated for, and the versions that compile it."""
    tensors = [(name, tuple(t.shape), str(t.dtype)) for name, t in sorted(program.state_dict.items())]
    parts = [program.graph_module.code, repr(tensors), repr(sorted(options.items())),
             str(torch.get_num_threads()), torch.__version__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def compiled_package(program, options: dict) -> Path:
    """The AOTInductor package of an exported program: from the cache folder, or compiled into it
    (in a temporary file moved in whole, so that two processes never read half a package). The
    folder keeps the KEPT_PACKAGES used last (a package is a few MB, one per model, dtype, batch
    and cache length: a sample.py run with a new --max_new_tokens makes one)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    folder = Path(cache_dir()) / "llm_toolkit_aot"
    path = folder / f"{package_key(program, options)}.pt2"
    if path.exists():
        path.touch()  # its modification time says when it was used last
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="partial-", suffix=".pt2")
    os.close(fd)
    try:
        torch._inductor.aoti_compile_and_package(
            program, package_path=tmp, inductor_configs={**options, "aot_inductor.package_constants_in_so": False})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    prune(folder, KEPT_PACKAGES)
    return path


def prune(folder: Path, keep: int):
    """Delete all but the `keep` packages used last (another process may be pruning too)."""
    def last_used(package: Path) -> float:
        try:
            return package.stat().st_mtime
        except FileNotFoundError:
            return 0.0
    for old in sorted(folder.glob("[0-9a-f]*.pt2"), key=last_used)[:-keep]:
        old.unlink(missing_ok=True)


class AheadOfTimeStep:
    """A decode step (model, token, kv_start, cache) -> logits, run by AOTInductor on CPU."""

    def __init__(self, options: dict):
        self.options = options
        self.runner = None
        self.shapes = None  # (model, cache and input shapes) the runner was compiled for
        self.cache = None  # the cache whose tensors the runner reads

    @staticmethod
    def supports(model) -> bool:
        """Not with a layer packed for oneDNN: it is reached through a Python custom op, which
        AOTInductor's C++ cannot call; such models stay on torch.compile."""
        from llm.infer.quantize import PackedLinear

        return not any(isinstance(m, PackedLinear) for m in model.modules())

    def __call__(self, model, token, kv_start, cache):
        inputs = (token, cache.pos) if kv_start is None else (token, cache.pos, kv_start)
        shapes = (model, len(cache.k), cache.k[0].shape, *(t.shape for t in inputs))
        if shapes != self.shapes:  # (a model compares by identity)
            self._compile(model, cache, inputs)
            self.shapes, self.cache = shapes, cache
        elif cache is not self.cache:  # same shapes: read this cache's tensors instead
            self.runner.load_constants(cache_tensors(cache), check_full_update=False, user_managed=True)
            self.cache = cache
        return self.runner(*inputs)

    def _compile(self, model, cache, inputs):
        module = StepModule(model, cache)
        try:
            with warnings.catch_warnings():  # torch's own pytree deprecation, printed at every load
                warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
                program = torch.export.export(module, inputs, strict=False)
                self.runner = torch._inductor.aoti_load_package(str(compiled_package(program, self.options)))
        except Exception as e:  # e.g. no C++ compiler: one line, not inductor's pages
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            raise UserError(f"compiling the decode step ahead of time (AOTInductor) failed "
                            f"({type(e).__name__}: {first_line}); try another --compile backend or none")
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        self.runner.load_constants({name: tensors[name] for name in self.runner.get_constant_fqns()},
                                   check_full_update=True, user_managed=True)
