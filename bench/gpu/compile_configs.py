"""Compile every tile candidate of the FlashAttention kernels for Hopper (sm_90) without a GPU and
list registers, spills and shared memory, so that the tuning lists hold only tiles that fit.

    python bench/gpu/compile_configs.py [--kernels fwd,dkdv,dq] [--head_dims 64,128]
        [--dtypes bf16,fp16,fp32] [--options ""] [--kv_heads 16] [--varlen] [--window W]
        [--extra] [--tiles LIST] [--json PATH]

Each kernel is compiled exactly as flash.py launches it for a causal forward + backward at
B=4, H=16, N=4096, dense or (--varlen) as 4 packed sequences, with or without a sliding window
(the launches are captured from flash.py's own launch path on meta tensors; arguments are
specialized as Triton's launcher does: 16-byte aligned pointers, unit strides as constants).
ptxas (bundled with triton) reports registers and spills; Triton reports the shared memory it
allocates. A tile is kept iff it spills no register and fits in 227 KB of shared memory per
block (H100/H200). Exit status 1 if, with default options, a tile of flash.CANDIDATES is not kept
by the dense kernels at D=64 or 128 in bf16/fp16 (the lists promise that), else 0; varlen
kernels, whose lengths are unknown at compile time, spill a few bytes in some tiles. --extra
also compiles flash.EXTRA_TILES (selectable, not tuned); --tiles compiles only the tiles named.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_configs.py: unset TRITON_INTERPRET (it compiles, it does not interpret)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llm.files import write_json  # noqa: E402
from triton_kernels import flash  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 227 * 1024  # per block, opt-in, on sm_90
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
              torch.int32: "i32"}
B, H, N = 4, 16, 4096


def captured_launches(head_dim, dtype, causal, options, kv_heads=H, varlen=False, window=None):
    """[(kernel name, jit function, positional args, constexprs)] of one forward + backward:
    dense (B, H, N, D) or, with varlen, B sequences of N tokens packed into (B * N, H, D)."""
    calls = []

    def capture(name, kernel, n_tiles, heads, args, constexprs, options, *rest):
        calls.append((name, kernel, args, dict(constexprs, HEAVY_FIRST=options.heavy_first)))

    class NoLaunch:  # the untuned preprocess kernel
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def meta(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    if varlen:
        q, k, v = meta(B * N, H, head_dim), meta(B * N, kv_heads, head_dim), \
            meta(B * N, kv_heads, head_dim)
        cu_seqlens = meta(B + 1, dtype=torch.int32)
        problem = flash._Problem(q, k, causal, head_dim ** -0.5, window, None, None, cu_seqlens,
                                 cu_seqlens, N, N)
    else:
        q, k, v = meta(B, H, N, head_dim), meta(B, kv_heads, N, head_dim), \
            meta(B, kv_heads, N, head_dim)
        problem = flash._Problem(q, k, causal, head_dim ** -0.5, window, None, None, None, None,
                                 N, N)
    with mock.patch.object(flash, "_launch", capture), \
            mock.patch.object(flash, "_attn_bwd_preprocess", NoLaunch()):
        o, lse = flash._forward(q, k, v, problem, options)
        flash._backward(torch.empty_like(o), q, k, v, o, lse, problem, options)
    return calls


def specialize(kernel, args, constexprs):
    """(signature, constexprs, attrs) for triton.compile, as Triton's launcher would derive them
    from these arguments: tensors become 16-byte aligned pointers, ints equal to 1 constants,
    ints divisible by 16 get a divisibility hint, None a constant; tuples (the strides) element
    by element, keyed by their path (argument index, element index)."""
    values = dict(zip(kernel.arg_names, args), **constexprs)
    constants, attrs = {}, {}

    def arg_type(path, value):
        if isinstance(value, tuple):
            return tuple(arg_type((*path, i), x) for i, x in enumerate(value))
        divisible = False
        if value is None or (type(value) is int and value == 1):
            constants[path] = value
            return "constexpr"
        if isinstance(value, torch.Tensor):
            kind, divisible = "*" + TYPE_NAMES[value.dtype], True
        elif isinstance(value, float):
            kind = "fp32"
        elif isinstance(value, int):
            kind = "i32" if -2**31 <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        else:
            raise TypeError(f"{kernel.__name__}: cannot specialize {value!r} at {path}")
        if divisible:
            attrs[path] = [["tt.divisibility", 16]]
        return kind

    signature = {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            constants[(index,)] = constexprs[name]
        else:
            signature[name] = arg_type((index,), values[name])
    return signature, constants, attrs


def ptxas_report(ptx):
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the kernel's PTX
    (Triton compiled it with ptxas already, but keeps only the binary)."""
    ptxas = get_ptxas(TARGET.arch).path  # the one Triton itself uses for this target
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", str(path), "-o", str(path) + ".o"],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                       out).groups())
    return registers, stores, loads


def compile_row(name, kernel, args, constexprs, tile):
    signature, constants, attrs = specialize(
        kernel, args, dict(constexprs, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n))
    row = dict(kernel=name, tile=str(tile), registers=None, spill_stores=None, spill_loads=None,
               shared_kb=None)
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=TARGET,
                                  options=dict(num_warps=tile.num_warps,
                                               num_stages=tile.num_stages))
        row["registers"], row["spill_stores"], row["spill_loads"] = ptxas_report(
            compiled.asm["ptx"])
        row["shared_kb"] = round(compiled.metadata.shared / 1024, 1)
        if row["spill_stores"] or row["spill_loads"]:
            row["verdict"] = "spills"
        elif compiled.metadata.shared > MAX_SHARED:
            row["verdict"] = "shared > 227 KB"
        else:
            row["verdict"] = "keep"
    except Exception as e:  # a compile error is a result here, not a crash
        cause = e.__cause__ or e  # Triton's CompilationError wraps the error with source lines
        row["verdict"] = f"error: {type(cause).__name__}: " + \
            (str(cause).strip().splitlines() or ["?"])[-1][:100]
    row["compile_s"] = round(time.perf_counter() - start, 1)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=",".join(flash.KERNELS))
    parser.add_argument("--head_dims", default="64,128")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--options", default="", help="flash Options, e.g. heavy_first")
    parser.add_argument("--kv_heads", type=int, default=H, help=f"of {H} query heads (GQA)")
    parser.add_argument("--varlen", action="store_true",
                        help=f"the varlen kernels ({B} packed sequences of {N} tokens)")
    parser.add_argument("--window", type=int, help="a sliding window of this many keys")
    parser.add_argument("--extra", action="store_true", help="also flash.EXTRA_TILES")
    parser.add_argument("--tiles", help="compile these tiles instead, e.g. 32x32x4x2,64x32x4x2")
    parser.add_argument("--json", type=Path, help="write the rows here")
    cfg = parser.parse_args(argv)
    kernels = cfg.kernels.split(",")
    if not set(kernels) <= set(flash.KERNELS):
        parser.error(f"--kernels must be a subset of {','.join(flash.KERNELS)}")
    try:
        options = flash.Options.parse(cfg.options)
        dtypes = [DTYPES[d] for d in cfg.dtypes.split(",")]
        head_dims = [int(d) for d in cfg.head_dims.split(",")]
        only = [flash.Tile.parse(t) for t in cfg.tiles.split(",")] if cfg.tiles else None
    except (ValueError, KeyError) as e:
        parser.error(str(e))

    print(f"triton {triton.__version__}, target {TARGET}, causal, B={B} H={H} "
          f"Hkv={cfg.kv_heads} N={N}, {'varlen' if cfg.varlen else 'dense'}, window "
          f"{cfg.window}, options: {options}")
    header = f"{'kernel':<6}{'D':>5} {'dtype':<6}{'tile':<14}{'regs':>6}{'spill st/ld':>13}" \
             f"{'smem KB':>9}{'s':>6}  verdict"
    print(header + "\n" + "-" * len(header), flush=True)
    rows, broken = [], []
    for head_dim in head_dims:
        for dtype in dtypes:
            for name, kernel, args, constexprs in captured_launches(
                    head_dim, dtype, True, options, cfg.kv_heads, cfg.varlen, cfg.window):
                if name not in kernels:
                    continue
                candidates = (flash.CANDIDATES_FP32 if dtype == torch.float32
                              else flash.CANDIDATES)[name]
                tiles = only or candidates + (flash.EXTRA_TILES[name] if cfg.extra else [])
                for tile in tiles:
                    row = dict(compile_row(name, kernel, args, constexprs, tile),
                               head_dim=head_dim, dtype=TYPE_NAMES[dtype],
                               candidate=tile in candidates)
                    rows.append(row)
                    spills = "-" if row["spill_stores"] is None else \
                        f"{row['spill_stores']}/{row['spill_loads']}"
                    registers = "-" if row["registers"] is None else row["registers"]
                    shared = "-" if row["shared_kb"] is None else row["shared_kb"]
                    print(f"{name:<6}{head_dim:>5} {row['dtype']:<6}{row['tile']:<14}"
                          f"{registers:>6}{spills:>13}{shared:>9}"
                          f"{row['compile_s']:>6}  {row['verdict']}"
                          f"{'' if row['candidate'] else '  (extra)'}", flush=True)
                    if row["candidate"] and row["verdict"] != "keep" and head_dim in (64, 128) \
                            and dtype != torch.float32 and options == flash.Options() \
                            and not cfg.varlen:
                        broken.append(f"{name} {tile} D={head_dim} {row['dtype']}: "
                                      f"{row['verdict']}")
    if cfg.json:
        write_json(cfg.json, dict(triton=triton.__version__, target=str(TARGET), options=str(options),
                                  varlen=cfg.varlen, window=cfg.window, rows=rows))
    if broken:
        print("candidates that do not fit (remove them from flash.CANDIDATES):\n  "
              + "\n  ".join(broken))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
