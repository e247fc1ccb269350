"""Benchmark attention implementations: naive, torch SDPA and the Triton FlashAttention kernel.

    python -m llm.bench attention [--lengths 512,1024,...] [--batch 4] [--heads 16]
        [--kv_heads 16] [--head_dim 128] [--dtype bf16] [--modes fwd,bwd,fwdbwd]
        [--causal both|true|false] [--q_len N] [--impls naive,sdpa,sdpa_flash,triton]
        [--out DIR] [--name NAME]

Implementations: naive (materialized scores, fp32 softmax, K/V repeated per group), sdpa
(torch.nn.functional.scaled_dot_product_attention, backend chosen by torch), sdpa_flash (SDPA
restricted to its FlashAttention backend; CUDA only) and triton (triton_kernels.flash_attention,
in flash.py). "triton:OPTIONS" runs a kernel variant side by side, OPTIONS as flash.Options with
'+' between items: triton:heavy_first, triton:heavy_first+tile=128x64x8x3, triton:dkdv=32x128x4x2.

Lengths: Nq = Nk = N, or with --q_len a fixed number of queries (decode: --q_len 1) against N
keys; then the mask is non-causal (all N keys visible, as for the last query of a causal mask).
FLOPs: forward 4 * B * H * Nq * Nk * D, halved when causal; backward 2.5x forward; fwd+bwd 3.5x.
GB/s: the bytes of q, k, v and the output over the time (what bounds decode).
Timing: triton.testing.do_bench (median) on CUDA, and the same step replayed from a CUDA graph;
a row is marked host-bound when the plain time exceeds the graph's by more than 10%: there the
launch overhead, not the kernel, sets the figure, so do not quote it as kernel speed. On CPU
time.perf_counter, best of a couple of runs.
Memory: extra MB = torch.cuda.max_memory_allocated during the step, less what was allocated
before it (q, k, v, dO) and less the gradients of q, k, v: the attention's own workspace and
saved state (n/a on CPU, where torch's allocations are not tracked).
A point that runs out of memory is recorded as "OOM", one that fails to compile or launch
(Triton's OutOfResources or CompilationError, a backend that refuses the inputs) as "error: ...";
the sweep goes on either way. Each row is written to the CSV and JSON as soon as it is measured.

Without CUDA the Triton kernel can only run in Triton's interpreter, which must be switched on
before triton is imported; the benchmark then re-runs itself with TRITON_INTERPRET=1. Its
timings measure the interpreter, not the kernel.

Results go to DIR (default bench/results/<device-slug>/) as NAME.csv, .json and .png (NAME
default attention_bench).
"""
import argparse
import csv
import datetime
import gc
import io
import math
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.errors import TritonError
from triton.testing import do_bench, do_bench_cudagraph

from llm.files import write_bytes, write_json, write_text
from triton_kernels.flash import INTERPRETED, SUPPORTED_HEAD_DIMS, Options, flash_attention

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwdbwd")
FLOP_MULTIPLIER = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
CPU_REPEATS = 2
HOST_BOUND_RATIO = 1.10  # plain time / CUDA-graph time above which launch overhead dominates
RESULTS_ROOT = Path(__file__).resolve().parents[2] / "bench" / "results"
INTERPRETER_NOTE = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!! NO GPU: the Triton kernel runs in Triton's CPU INTERPRETER. These timings measure the    !!!
!!! interpreter and the CPU, not the kernel: they MEAN NOTHING for GPU performance.          !!!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


# ----------------------------------------------------------------------------------------------
# Implementations: (q, k, v, causal) -> out; q (B, H, N, D), k/v (B, Hkv, N, D)
# ----------------------------------------------------------------------------------------------


def naive_attention(q, k, v, causal):
    """Materializes the (B, H, Nq, Nk) scores; K/V repeated to H heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        Nq, Nk = q.shape[2], k.shape[2]
        visible = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def sdpa_attention(q, k, v, causal):
    # Causal only with Nq == Nk in this benchmark, so SDPA's top-left causal mask matches ours.
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


def sdpa_flash_attention(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return sdpa_attention(q, k, v, causal)


def triton_attention(q, k, v, causal, options=None):
    return flash_attention(q, k, v, causal=causal, options=options)


IMPLS = {"naive": naive_attention, "sdpa": sdpa_attention, "sdpa_flash": sdpa_flash_attention,
         "triton": triton_attention}


def impl_function(name):
    """The function behind an --impls entry; "triton:OPTIONS" is the kernel with those options
    (the explicit options replace FLASH_ATTENTION_OPTIONS)."""
    base, _, options = name.partition(":")
    if base == "triton" and options:
        parsed = Options.parse(options)
        return lambda q, k, v, causal: triton_attention(q, k, v, causal, parsed)
    return IMPLS[base]


def sdpa_flash_available():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def attention_flops(batch, heads, n_q, n_k, head_dim, causal, mode):
    forward = 4 * batch * heads * n_q * n_k * head_dim * (0.5 if causal else 1.0)
    return forward * FLOP_MULTIPLIER[mode]


def time_ms(fn, grads, on_cuda):
    """Runtime of fn in ms; gradients of `grads` are reset before every run."""
    if on_cuda:
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")
    best = math.inf
    for _ in range(CPU_REPEATS):  # the first run doubles as warmup
        for t in grads:
            t.grad = None
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def graph_time_ms(fn, grads):
    """Runtime of fn replayed from a CUDA graph (no launch overhead), or None if it cannot be
    captured. The plain timing ran first, so tuning and compilation are done by now."""
    try:
        return do_bench_cudagraph(fn, rep=50, grad_to_none=grads, return_mode="median")
    except Exception:  # e.g. an operation that is not capturable; the plain time stands alone
        return None


def error_status(e):
    return f"error: {type(e).__name__}: " + (str(e).strip().splitlines() or ["?"])[0][:120]


def measure(impl, mode, causal, n, cfg, device):
    """One benchmark point as a result row (status 'ok', 'OOM' or 'error: ...')."""
    on_cuda = device.type == "cuda"
    n_q = cfg.q_len or n
    row = dict(impl=impl, mode=mode, causal=causal, seq_len=n, q_len=n_q, batch=cfg.batch,
               heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype=cfg.dtype,
               ms=None, graph_ms=None, host_bound=None, tflops=None, gb_per_s=None,
               extra_mem_mb=None, status="ok")
    dtype = DTYPES[cfg.dtype]
    needs_grad = mode != "fwd"
    q = k = v = do = out = step = None
    try:
        fn = impl_function(impl)

        def make(heads, length):
            return torch.randn(cfg.batch, heads, length, cfg.head_dim, device=device,
                               dtype=dtype, requires_grad=needs_grad)

        q, k, v = make(cfg.heads, n_q), make(cfg.kv_heads, n), make(cfg.kv_heads, n)
        do = torch.randn_like(q) if needs_grad else None
        grads = [q, k, v] if needs_grad else []
        if on_cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if mode == "fwd":
            step = lambda: fn(q, k, v, causal)  # noqa: E731
        elif mode == "bwd":
            out = fn(q, k, v, causal)
            step = lambda: out.backward(do, retain_graph=True)  # noqa: E731
        else:
            step = lambda: fn(q, k, v, causal).backward(do)  # noqa: E731
        ms = time_ms(step, grads, on_cuda)
        if on_cuda:
            grad_bytes = sum(t.numel() * t.element_size() for t in grads)
            row["extra_mem_mb"] = (torch.cuda.max_memory_allocated() - before - grad_bytes) / 2**20
            # Forward only: a backward's capture failed on the H200 (triton 3.6, torch 2.11) and
            # left CUDA's random generator unusable for every later point of the sweep.
            row["graph_ms"] = graph_time_ms(step, grads) if mode == "fwd" else None
            if row["graph_ms"] is not None:
                row["host_bound"] = ms > HOST_BOUND_RATIO * row["graph_ms"]
        row["ms"] = ms
        flops = attention_flops(cfg.batch, cfg.heads, n_q, n, cfg.head_dim, causal, mode)
        row["tflops"] = flops / (ms * 1e-3) / 1e12
        io_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, q))  # q, k, v, output
        row["gb_per_s"] = io_bytes / (ms * 1e-3) / 1e9
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except (TritonError, RuntimeError, ValueError) as e:  # compile, resources, unsupported input
        row["status"] = error_status(e)
    finally:
        q = k = v = out = do = step = None  # noqa: F841  free before the next point
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    return row


def matmul_peak_tflops(device):
    """bf16 8192^3 matmul throughput, the yardstick for forward TFLOP/s."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def write_csv(path, rows):
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, buf.getvalue())


def write_plot(path, rows, cfg, title, peak):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfg.modes), figsize=(6 * len(cfg.modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], cfg.modes):
        for color, impl in enumerate(cfg.impls):
            for causal in cfg.causal_values:
                points = [(r["seq_len"], r["tflops"]) for r in rows if r["impl"] == impl
                          and r["mode"] == mode and r["causal"] == causal and r["status"] == "ok"
                          and not r["host_bound"]]  # host-bound figures are not kernel speed
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o", color=f"C{color}",
                            linestyle="-" if causal else "--",
                            label=f"{impl} ({'causal' if causal else 'non-causal'})")
        if peak is not None and mode == "fwd":
            ax.axhline(peak, color="gray", linestyle=":", label=f"bf16 matmul {peak:.0f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(mode)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def format_table(rows):
    header = (f"{'impl':<32}{'mode':<8}{'causal':<8}{'Nq':>7}{'Nk':>7}{'ms':>11}{'graph ms':>10}"
              f"{'TFLOP/s':>9}{'GB/s':>8}{'extra MB':>10}  status")
    lines = [header, "-" * len(header)]

    def show(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        status = r["status"] + (" (host-bound: not kernel speed)" if r["host_bound"] else "")
        lines.append(f"{r['impl']:<31} {r['mode']:<8}{str(r['causal']):<8}{r['q_len']:>7}"
                     f"{r['seq_len']:>7}{show(r['ms'], '.3f'):>11}{show(r['graph_ms'], '.3f'):>10}"
                     f"{show(r['tflops'], '.3g'):>9}{show(r['gb_per_s'], '.0f'):>8}"
                     f"{show(r['extra_mem_mb'], '.0f'):>10}  {status}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _csv_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv, on_cuda):
    parser = _Parser(prog="python -m llm.bench attention",
                     description="Benchmark naive attention, torch SDPA and the Triton kernel.")
    parser.add_argument("--lengths", help="comma-separated sequence lengths (Nq = Nk)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv_heads", type=int, help="default: --heads (MHA)")
    parser.add_argument("--head_dim", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--modes", default=",".join(MODES), help="subset of fwd,bwd,fwdbwd")
    parser.add_argument("--causal", choices=["both", "true", "false"], default="both")
    parser.add_argument("--q_len", type=int, help="queries per row (decode: 1); default N, "
                        "else the mask is non-causal")
    parser.add_argument("--impls", help="subset of " + ",".join(IMPLS)
                        + ", and triton:OPTIONS variants")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--name", default="attention_bench", help="output file name stem")
    cfg = parser.parse_args(argv)
    return checked(cfg, parser, on_cuda)


def checked(cfg, parser, on_cuda):
    """cfg with its defaults for this device filled in and its lists parsed, or one line and exit 2."""
    # Device-dependent defaults: a real sweep on the GPU, a tiny one in the interpreter.
    gpu_defaults = dict(lengths="512,1024,2048,4096,8192,16384,32768", batch=4, heads=16,
                        head_dim=128, dtype="bf16")
    cpu_defaults = dict(lengths="64,128,256", batch=1, heads=2, head_dim=32, dtype="fp32")
    for name, value in (gpu_defaults if on_cuda else cpu_defaults).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.kv_heads is None:
        cfg.kv_heads = cfg.heads

    try:
        cfg.lengths = [int(x) for x in _csv_list(cfg.lengths)]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {cfg.lengths!r}")
    if not cfg.lengths or min(cfg.lengths) < 1:
        parser.error("--lengths must list positive integers")
    for name in ("batch", "heads", "kv_heads"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.heads % cfg.kv_heads:
        parser.error(f"--heads ({cfg.heads}) must be a multiple of --kv_heads ({cfg.kv_heads})")
    if cfg.head_dim not in SUPPORTED_HEAD_DIMS:
        parser.error(f"--head_dim must be one of {', '.join(map(str, SUPPORTED_HEAD_DIMS))}, "
                     f"got {cfg.head_dim}")
    cfg.modes = _csv_list(cfg.modes)
    bad = [m for m in cfg.modes if m not in MODES]
    if bad or not cfg.modes:
        parser.error(f"--modes must be a subset of {','.join(MODES)}, got {','.join(cfg.modes)!r}")
    available = [i for i in IMPLS if i != "sdpa_flash" or sdpa_flash_available()]
    cfg.impls = _csv_list(cfg.impls) if cfg.impls else available
    bad = [i for i in cfg.impls if i.partition(":")[0] not in available
           or (":" in i and not i.startswith("triton:"))]
    if bad or not cfg.impls:
        parser.error(f"--impls must be a subset of {','.join(available)} on this machine "
                     f"(and triton:OPTIONS), got {','.join(cfg.impls)!r}")
    for impl in cfg.impls:
        if impl.startswith("triton:"):
            try:
                Options.parse(impl.partition(":")[2])
            except ValueError as e:
                parser.error(f"--impls {impl}: {e}")
    if cfg.q_len is not None and cfg.q_len < 1:
        parser.error(f"--q_len must be positive, got {cfg.q_len}")
    if cfg.q_len is not None and cfg.q_len > min(cfg.lengths):
        parser.error(f"--q_len ({cfg.q_len}) must not exceed the shortest length")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", cfg.name):
        parser.error(f"--name must be letters, digits, '_' or '-', got {cfg.name!r}")
    cfg.causal_values = {"both": [True, False], "true": [True], "false": [False]}[cfg.causal]
    if cfg.q_len is not None:
        cfg.causal_values = [False]  # fixed queries see every key (see the module docstring)
    return cfg


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} (triton interpreter)"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def rerun_under_interpreter(argv):
    """Without CUDA the kernel needs Triton's interpreter, chosen when triton is first imported:
    start this benchmark again in a fresh process with TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # set, yet triton was imported without it
        sys.exit("error: triton was imported before TRITON_INTERPRET=1 took effect")
    print("note: no CUDA device; re-running with TRITON_INTERPRET=1 (Triton's CPU interpreter)",
          file=sys.stderr, flush=True)
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "llm.bench", "attention", *argv], env)


def print_header(cfg, name, peak, on_cuda):
    print(f"device: {name}   torch {torch.__version__}   triton {triton.__version__}")
    print(f"B={cfg.batch} H={cfg.heads} Hkv={cfg.kv_heads} D={cfg.head_dim} dtype={cfg.dtype} "
          f"lengths={cfg.lengths}")
    if peak is not None:
        print(f"bf16 matmul peak (8192^3): {peak:.1f} TFLOP/s")
    print("extra MB: " + ("max_memory_allocated during the step, less inputs, dO and gradients"
                          if on_cuda else "n/a (torch CPU allocations are not tracked)"))


def bench_attention(argv=None):
    on_cuda = torch.cuda.is_available()
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv, on_cuda)
    if not on_cuda and not INTERPRETED:
        rerun_under_interpreter(argv)
    device = torch.device("cuda" if on_cuda else "cpu")
    name = device_name(device)
    out_dir = cfg.out or RESULTS_ROOT / slug(name)
    try:  # fail now rather than after the sweep
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot create output folder {out_dir}: {e.strerror}")

    if INTERPRETED:
        print(INTERPRETER_NOTE)  # instead of the kernel's own interpreter warning
        warnings.filterwarnings("ignore", message="flash_attention is running in the Triton")
    peak = matmul_peak_tflops(device) if on_cuda else None
    print_header(cfg, name, peak, on_cuda)

    config = {k: v for k, v in vars(cfg).items() if k not in ("out", "causal_values")}
    title = (f"{name} | {cfg.dtype} B={cfg.batch} H={cfg.heads} Hkv={cfg.kv_heads} "
             f"D={cfg.head_dim} | torch {torch.__version__} triton {triton.__version__}")
    stem = out_dir / cfg.name

    def save(rows, complete):
        payload = dict(device=name, dtype=cfg.dtype, torch=torch.__version__,
                       triton=triton.__version__,
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds"),
                       interpreter=INTERPRETED, complete=complete, config=config,
                       matmul_peak_tflops=peak,
                       flops="fwd 4*B*H*Nq*Nk*D (halved if causal); bwd 2.5x fwd; fwdbwd 3.5x fwd",
                       extra_mem_mb="max_memory_allocated during the step, less the inputs, dO "
                       "and the gradients" if on_cuda else "n/a on CPU",
                       host_bound=f"plain time > {HOST_BOUND_RATIO} x CUDA-graph replay time",
                       options=os.environ.get("FLASH_ATTENTION_OPTIONS", ""), results=rows)
        write_csv(stem.with_suffix(".csv"), rows)
        write_json(stem.with_suffix(".json"), payload)

    rows = []
    print("\n" + format_table([]), flush=True)  # header; rows follow as they are measured
    for causal in cfg.causal_values:
        for mode in cfg.modes:
            for n in cfg.lengths:
                for impl in cfg.impls:
                    row = measure(impl, mode, causal, n, cfg, device)
                    rows.append(row)
                    save(rows, complete=False)  # a killed run keeps every finished row
                    print(format_table([row]).splitlines()[-1], flush=True)
    save(rows, complete=True)
    write_plot(stem.with_suffix(".png"), rows, cfg, title, peak)
    print(f"\nwrote {stem}.{{csv,json,png}}")
    if INTERPRETED:
        print(INTERPRETER_NOTE)


if __name__ == "__main__":
    bench_attention()
