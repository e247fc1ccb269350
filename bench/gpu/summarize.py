"""The figures of one GPU suite run, read back from its results folder, with the issue's targets.

    python bench/gpu/summarize.py RESULTS_DIR

Reads whatever exists (a step that failed or timed out leaves some files missing or partial) and
never fails because of that: the suite's own summary.txt says which steps passed.
"""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def kernel_checks(r):
    for name in ("check_kernel", "check_kernel_variants"):
        rows = load(r / f"{name}.json")
        if rows:
            bad = [x for x in rows if not x["ok"]]
            worst = max((max(x.get(k, 0) for k in ("out", "dq", "dk", "dv")) for x in rows
                         if x["ok"]), default=None)
            print(f"{name}: {len(rows) - len(bad)}/{len(rows)} ok"
                  + (f", largest error {worst:.1e}" if worst is not None else ""))
            for x in bad:
                print(f"  FAIL {x['case']} {x['dtype']} D={x['head_dim']} {x['options']}: "
                      f"{x['result']}")


def tests(r):
    try:
        suite = ET.parse(r / "pytest.xml").getroot()
    except (OSError, ET.ParseError):
        return
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    a = suite.attrib
    print(f"pytest: {a.get('tests')} tests, {a.get('failures')} failures, {a.get('errors')} "
          f"errors, {a.get('skipped')} skipped in {float(a.get('time', 0)):.0f} s")


def attention(r):
    bench = load(r / "attention_bench.json")
    if bench:
        peak = bench.get("matmul_peak_tflops")
        rows = [x for x in bench["results"] if x["status"] == "ok"]
        print(f"attention ({bench['device']}, {bench['dtype']}"
              + (f", bf16 matmul peak {peak:.0f} TFLOP/s" if peak else "") + "): TFLOP/s")
        impls = list(dict.fromkeys(x["impl"] for x in bench["results"]))
        for mode in ("fwd", "bwd", "fwdbwd"):
            for causal in (True, False):
                for impl in impls:
                    points = [x for x in rows if (x["mode"], x["causal"], x["impl"]) ==
                              (mode, causal, impl)]
                    if points:
                        figures = " ".join(f"{x['seq_len']}:{x['tflops']:.0f}"
                                           + ("*" if x["host_bound"] else "") for x in points)
                        print(f"  {mode:<7}{'causal' if causal else 'full':<7}{impl:<12}{figures}")
        print("  (* host-bound: launch overhead, not the kernel, sets that figure)")
        ours = {(x["mode"], x["causal"], x["seq_len"]): x for x in rows if x["impl"] == "triton"}
        flash = {(x["mode"], x["causal"], x["seq_len"]): x for x in rows
                 if x["impl"] == "sdpa_flash"}
        key = ("fwdbwd", True, 4096)
        if key in ours and key in flash:
            ratio = flash[key]["ms"] / ours[key]["ms"]
            print(f"  target fwd+bwd causal N=4096 >= SDPA flash: {ratio:.2f}x of its speed "
                  f"-> {'met' if ratio >= 1 else 'NOT met'}")
        forward = [x["tflops"] for k, x in ours.items() if k[0] == "fwd"]
        if forward and peak:
            best = max(forward)
            print(f"  target fwd >= 50% of matmul peak: best {best:.0f} TFLOP/s = "
                  f"{best / peak:.0%} -> {'met' if best >= peak / 2 else 'NOT met'}")
    long = load(r / "attention_long.json")
    if long:
        print("long sequence: " + ", ".join(f"{x['impl']} N={x['seq_len']} {x['status']}"
                                            for x in long["results"]))
    for name in ("attention_variants", "attention_decode"):
        data = load(r / f"{name}.json")
        if not data:
            continue
        print(f"{name} (ms, lower is better; GB/s for decode):")
        for x in data["results"]:
            shown = f"{x['ms']:.3f} ms {x['gb_per_s']:.0f} GB/s" if x["ms"] else x["status"]
            print(f"  {x['mode']:<5}N={x['seq_len']:<6}{shown:<24}{x['impl']}"
                  + ("  (host-bound)" if x["host_bound"] else ""))


def training(r):
    runs = sorted(r.glob("train-*.json"))
    if runs:
        print("training (tokens/s, MFU):")
    for path in runs:
        data = load(path) or {}
        mfu = data.get("mfu")
        print(f"  {path.stem[len('train-'):]:<44}{data.get('tokens_per_s', '-'):>12}  "
              f"{'' if mfu is None else f'{mfu:.1%}'}")
    for path in sorted(r.glob("decode*.json")):
        data = load(path) or {}
        for row in data.get("rows", []):
            quantize = row.get("quantize")
            extra = f" quantize {quantize}" if quantize not in (None, "none") else ""
            print(f"sampling {path.stem}: batch {row.get('batch')} compile {row.get('compile')}"
                  f"{extra}: {row.get('tokens_per_s'):,.0f} tokens/s")
        speed = {(row.get("quantize"), row.get("batch"), bool(row.get("compile"))): row.get("tokens_per_s")
                 for row in data.get("rows", [])}
        for (quantize, batch, compiled), graph in speed.items():
            eager = speed.get((quantize, batch, False))
            if compiled and eager:  # issue 25's target: the graphed step >= 5x the eager one at batch 1
                print(f"  compiled step (CUDA graph on a GPU) / eager, batch {batch}: {graph / eager:.1f}x")


def finetune_and_serve(r):
    tuned = load(r / "finetune.json") or {}
    for mode in ("full", "lora"):
        if mode in tuned:
            print(f"fine-tuning {mode}: {tuned[mode]['tokens_per_s']:,.0f} positions/s, "
                  f"peak {tuned[mode]['peak_bytes'] / 2**20:,.0f} MiB")
    for run in (load(r / "serve.json") or {}).get("runs", []):
        for row in run["rows"]:
            print(f"serving {run['name']}: {row['clients']} clients {row['tokens_per_s']:,.0f} tokens/s, "
                  f"{row['failed']} failed, p99 time to first token {row['ttft_p99'] * 1e3:.0f} ms")


def main(r):
    for part in (kernel_checks, tests, attention, training, finetune_and_serve):
        try:
            part(r)
        except (KeyError, TypeError, ValueError) as e:  # a partial file: say so, go on
            print(f"({part.__name__}: cannot read the results: {type(e).__name__}: {e})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/gpu/summarize.py RESULTS_DIR")
    main(Path(sys.argv[1]))
