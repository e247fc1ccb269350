"""Correctness of the compiled FlashAttention kernel on the GPU against a float64 reference.

    python bench/gpu/check_kernel.py [--n 4096] [--head_dims 64,128] [--dtypes bf16,fp16]
        [--options "tile=64x64x4x3;heavy_first,tile=64x64x4x3"] [--cases TEXT] [--json PATH]

Prints one row per (case, dtype, head dim, options): the relative errors ||x - ref|| /
max(||ref||, 1) of the output and of dQ, dK, dV, and whether each is within the bound
(the tests' bounds: fp16 2e-3, bf16 1e-2); exits 1 if any row fails or raises. The cases:
causal GQA prefill, non-causal MHA, a prefill of Nq = N/4 queries after a cache of 3N/4 keys
with left padding, single-token decode with left padding, decode steps (Nq = 1 and 3) over a
whole fixed-length cache with per-row kv_end whose unused rows hold NaN/inf, a sliding window
of N/8 keys (causal GQA prefill with left padding), and packed variable-length sequences
(flash_attention_varlen; causal GQA, with and without a window; lengths from 1 to N).

Each --options entry (';'-separated) pins a tile, so nothing is autotuned here. Without CUDA it
runs at toy sizes in Triton's interpreter (re-executing itself with TRITON_INTERPRET=1), which
checks the script, not the GPU.
"""
import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, TRITON_INTERPRET="1"))

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from llm.files import write_json  # noqa: E402
from triton_kernels import flash_attention, flash_attention_varlen  # noqa: E402
from triton_kernels.flash import Options  # noqa: E402
from triton_kernels.reference import (attention_reference, attention_reference_varlen,  # noqa: E402
                                      poison_unused_kv, rel_err)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def cases(n):
    """(name, B, H, Hkv, Nq, Nk, causal, kv_start, kv_end, poison, window) at sequence length n;
    B = "varlen": sequences of these lengths (Nq, Nk: lists) packed into one tensor."""
    w = max(n // 8, 1)
    return [
        ("prefill causal GQA", 2, 8, 2, n, n, True, None, None, False, None),
        ("full non-causal MHA", 1, 4, 4, n, n, False, None, None, False, None),
        ("Nq=N/4 after cache, left pad", 2, 8, 2, n // 4, n, True, [0, n // 8 + 3], None, False,
         None),
        ("decode Nq=1, left pad", 4, 8, 1, 1, n, True, [0, 5, n // 2, n - 1], None, False, None),
        ("static cache Nq=1, kv_end", 4, 8, 2, 1, n, True, [0, 3, 0, 0],
         [n, n // 2 + 5, 64, 1], True, None),
        ("static cache Nq=3, kv_end", 4, 8, 2, 3, n, True, [0, 0, 7, 0],
         [n, n - 17, 64, 2], True, None),
        (f"window {w}, left pad", 2, 8, 2, n, n, True, [0, n // 8 + 3], None, False, w),
        ("varlen causal GQA", "varlen", 8, 2, [1, n // 2 + 7, n - 9, 33], None, True, None, None,
         False, None),
        (f"varlen window {w}", "varlen", 8, 2, [n, 17, n // 4 - 1], [n, 40, n // 4 + 5], True,
         None, None, False, w),
    ]


def check(case, dtype, head_dim, options, device):
    _, B, H, Hkv, Nq, Nk, causal, kv_start, kv_end, poison, window = case
    if B == "varlen":
        return check_varlen(case, dtype, head_dim, options, device)
    as_index = lambda x: None if x is None else torch.tensor(x, device=device)  # noqa: E731
    kv_start, kv_end = as_index(kv_start), as_index(kv_end)
    q = torch.randn(B, H, Nq, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, head_dim, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, head_dim, device=device, dtype=dtype)
    clean = (k, v)
    if poison:
        (k, v), clean, _ = poison_unused_kv(k, v, kv_start, kv_end)
    k.requires_grad_()
    v.requires_grad_()
    return errors_and_seconds(
        (q, k, v), clean, device,
        lambda q, k, v: flash_attention(q, k, v, causal=causal, kv_start=kv_start, kv_end=kv_end,
                                        window=window, options=options),
        lambda q, k, v: attention_reference(q, k, v, causal, head_dim ** -0.5, kv_start, kv_end,
                                            window))


def check_varlen(case, dtype, head_dim, options, device):
    _, _, H, Hkv, q_lens, k_lens, causal, _, _, _, window = case
    k_lens = k_lens or q_lens
    cu_q, cu_k = (torch.tensor([0, *lens], device=device).cumsum(0) for lens in (q_lens, k_lens))
    q = torch.randn(sum(q_lens), H, head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(sum(k_lens), Hkv, head_dim, device=device, dtype=dtype,
                        requires_grad=True) for _ in range(2))
    return errors_and_seconds(
        (q, k, v), (k, v), device,
        lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens),
                                               causal=causal, window=window, options=options),
        lambda q, k, v: attention_reference_varlen(q, k, v, cu_q, cu_k, causal,
                                                   head_dim ** -0.5, window))


def errors_and_seconds(inputs, clean, device, attention, attention64):
    """Relative errors of attention's output and gradients against the float64 attention64 (on
    the clean k, v), and the seconds of the forward + backward."""
    q, k, v = inputs
    start = time.perf_counter()
    out = attention(q, k, v)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, *clean))
    ref = attention64(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    errors = {n: rel_err(x, r) if torch.isfinite(x).all() else float("inf")
              for n, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))}
    return errors, seconds


def main(argv=None):
    on_cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096 if on_cuda else 48)
    parser.add_argument("--head_dims", default="64,128" if on_cuda else "32")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--options", default="tile=64x64x4x3",
                        help="';'-separated flash Options, each pinning a tile")
    parser.add_argument("--cases", help="only the cases whose name contains one of these "
                        "','-separated texts")
    parser.add_argument("--json", type=Path, help="write the rows here (rewritten after each)")
    cfg = parser.parse_args(argv)
    try:
        option_sets = [Options.parse(text) for text in cfg.options.split(";")]
        dtypes = [DTYPES[d] for d in cfg.dtypes.split(",")]
        head_dims = [int(d) for d in cfg.head_dims.split(",")]
    except (ValueError, KeyError) as e:
        parser.error(f"bad argument: {e}")
    if cfg.n < 16:
        parser.error("--n must be at least 16")
    wanted = None if cfg.cases is None else cfg.cases.split(",")
    selected = [c for c in cases(cfg.n) if wanted is None or any(w in c[0] for w in wanted)]
    if not selected:
        parser.error(f"no case name contains any of {cfg.cases!r}")
    device = torch.device("cuda" if on_cuda else "cpu")
    warnings.filterwarnings("ignore", message="flash_attention is running in the Triton")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name() if on_cuda else 'cpu (triton interpreter)'}"
          f"   N={cfg.n}   rel. error = ||x - ref|| / max(||ref||, 1) vs float64", flush=True)
    header = f"{'case':<31}{'dtype':<6}{'D':>4}  {'options':<34}{'out':>9}{'dq':>9}{'dk':>9}" \
             f"{'dv':>9}{'s':>7}  result"
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    for options in option_sets:
        for dtype in dtypes:
            for head_dim in head_dims:
                for case in selected:
                    row = dict(case=case[0], dtype=str(dtype).removeprefix("torch."),
                               head_dim=head_dim, options=str(options), n=cfg.n)
                    try:
                        errors, seconds = check(case, dtype, head_dim, options, device)
                        ok = all(e <= TOLERANCE[dtype] for e in errors.values())
                        row.update(errors, seconds=round(seconds, 3), ok=ok,
                                   result="ok" if ok else f"FAIL (bound {TOLERANCE[dtype]:g})")
                        shown = "".join(f"{e:>9.1e}" for e in errors.values()) + f"{seconds:>7.2f}"
                    except Exception as e:  # one broken case must not hide the others
                        row.update(ok=False, result=f"ERROR {type(e).__name__}: "
                                   + (str(e).strip().splitlines() or ["?"])[0][:150])
                        shown = f"{'-':>9}" * 4 + f"{'-':>7}"
                    rows.append(row)
                    print(f"{case[0]:<31}{row['dtype']:<6}{head_dim:>4}  {str(options):<34}"
                          f"{shown}  {row['result']}", flush=True)
                    if cfg.json:
                        cfg.json.parent.mkdir(parents=True, exist_ok=True)
                        write_json(cfg.json, rows)
                    if on_cuda:
                        torch.cuda.empty_cache()
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
