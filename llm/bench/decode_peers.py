"""The same model and prompt decoded by us, by transformers and by llama.cpp (python -m llm.bench decode --peers).

A Hugging Face Llama directory (one of yours, or random weights at SmolLM2-135M's shapes, built
offline with transformers' own classes: random weights read as many bytes as trained ones) is
decoded greedily, batch 1, by:
- ours (llm.load): eager and compiled, fp32 and each --quantize method, as sample.py runs them;
- transformers' generate: eager, and with a static cache and torch.compile'd forward;
- llama.cpp through llama-cpp-python, on GGUF files made by llama.cpp's own converter
  (convert_hf_to_gguf.py: f32, q8_0) and quantizer (llama_model_quantize: Q4_0, Q4_K_M), when
  llama_cpp imports and a llama.cpp source tree is given (--llama_cpp); one line says why not.
Calls alternate, engine after engine, so that the machine's drifts hit all alike. Each call gives
two figures: whole (new tokens / seconds from the prompt to the last token, prefill included) and
steady state (the mean interval between tokens after the first). Weight bytes read per token over
the steady interval give GB/s, against the read bandwidth measured in the same run.
"""
import contextlib
import copy
import os
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.errors import UserError

# SmolLM2-135M's shapes (its config.json); the weights are random.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_HINT = ("a llama.cpp source tree, e.g. vendor/llama.cpp in the llama-cpp-python source package: "
                  "pip download llama-cpp-python --no-deps --no-binary :all:")
# GGUF formats: the converter's --outtype, or a llama_cpp.LLAMA_FTYPE_* for llama.cpp's quantizer (from f32).
PRECISION = {"none": "fp32", "int8": "int8", "int4": "int4"}
GGUF_FORMATS = {"none": [("f32", "f32")], "int8": [("q8_0", "q8_0")],
                "int4": [("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"), ("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M")]}


# --------------------------------------------------------------------------- the model, offline

def llama2_style_tokenizer(vocab_size: int):
    """A SentencePiece-style BPE tokenizer (byte fallback, as Llama 2's tokenizer.json) of exactly
    `vocab_size` tokens: <unk> <s> </s>, the 256 byte tokens, printable characters, then merges of
    pairs of them. Made up, not trained: only its size matters here (llama.cpp's converter reads
    this kind without a registry of known tokenizers, and its vocabulary must match the embedding)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    chars = ["▁"] + [c for c in string.printable if not c.isspace()]
    for c in chars:
        vocab[c] = len(vocab)
    if len(vocab) > vocab_size:
        raise UserError(f"a vocabulary of {vocab_size} is too small for the stand-in tokenizer ({len(vocab)} base tokens)")
    merges, pieces = [], list(chars)
    while len(vocab) < vocab_size:  # pairs of characters, then of those pairs and a character, ...
        left = pieces.pop(0)
        for c in chars:
            if len(vocab) == vocab_size:
                break
            if left + c not in vocab:
                vocab[left + c] = len(vocab)
                merges.append((left, c))
                pieces.append(left + c)
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer


def build_hf_dir(out: Path, shapes: dict, seed: int = 0) -> Path:
    """A Hugging Face Llama directory with random weights at these LlamaConfig shapes, made by
    transformers' own classes, and the stand-in tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**shapes)).save_pretrained(out)
    llama2_style_tokenizer(shapes["vocab_size"]).save(str(out / "tokenizer.json"))
    return out


# --------------------------------------------------------------------------- llama.cpp's files

def llama_cpp_missing(source_tree: str | None) -> str | None:
    """Why the llama.cpp side cannot run, or None."""
    for module, package in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not importable (pip install {package}, or the extra: pip install -e .[peers])"
    if not source_tree:
        return f"no converter: pass --llama_cpp DIR or set LLAMA_CPP_DIR ({CONVERTER_HINT})"
    if not (Path(source_tree) / CONVERTER).is_file():
        return f"{source_tree} has no {CONVERTER} ({CONVERTER_HINT})"
    return None


@contextlib.contextmanager
def quiet_fds():
    """Silence what C code writes to stdout and stderr (llama.cpp's quantizer logs every tensor)."""
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        try:
            for fd in (1, 2):
                os.dup2(null.fileno(), fd)
            yield
        finally:
            for fd, copy_ in zip((1, 2), saved):
                os.dup2(copy_, fd)
                os.close(copy_)


def gguf_files(hf_dir: Path, out: Path, source_tree: str, methods: list[str]) -> dict[str, Path]:
    """GGUF name -> file, made by llama.cpp's converter (f32, q8_0) and quantizer (from the f32 file)."""
    import llama_cpp

    files, f32 = {}, None
    for method in methods:
        for name, how in GGUF_FORMATS[method]:
            path = out / f"model-{name}.gguf"
            if not how.startswith("LLAMA_FTYPE"):
                convert(hf_dir, path, source_tree, how)
                f32 = path if how == "f32" else f32
            else:
                if f32 is None:
                    f32 = convert(hf_dir, out / "model-f32.gguf", source_tree, "f32")
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype, params.nthread = getattr(llama_cpp, how), torch.get_num_threads()
                with quiet_fds():
                    failed = llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params)
                if failed:
                    raise UserError(f"llama.cpp's quantizer failed on {name}")
            files[name] = path
    return files


def convert(hf_dir: Path, path: Path, source_tree: str, outtype: str) -> Path:
    """llama.cpp's own converter, run as its command line."""
    import subprocess
    import sys

    command = [sys.executable, str(Path(source_tree) / CONVERTER), str(hf_dir), "--outtype", outtype, "--outfile", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"llama.cpp's converter failed on {hf_dir} ({outtype}): {last}")
    return path


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the tensors a token reads: all of them (with tied embeddings the output is
    token_embd, read whole) less the embedding when the model has its own output matrix."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    return sum(tensors.values()) - (tensors["token_embd.weight"] if "output.weight" in tensors else 0)


# --------------------------------------------------------------------------- engines

@dataclass
class Engine:
    """One way to decode: `run(prompt, n)` -> (tokens, the time each token was ready)."""
    name: str
    precision: str
    weight_bytes: int
    run: Callable[[list[int], int], tuple[list[int], list[float]]]
    close: Callable[[], None] = lambda: None  # frees what the engine holds outside Python


def ours(model, step) -> Callable:
    from llm.infer.generate import Sampling, generate

    def run(prompt, n):
        tokens, times = [], []
        for token in generate(model, [prompt], n, Sampling(temperature=0), decode_step=step):
            tokens.append(int(token))
            times.append(time.perf_counter())
        return tokens, times
    return run


def transformers_run(hf_dir: Path, compiled: bool) -> Callable:
    """transformers' generate, greedy, every token produced (no stop); compiled: a static cache and
    the forward under torch.compile, as transformers' documentation does it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    extra = {}
    if compiled:
        model.forward = torch.compile(model.forward, fullgraph=True)
        extra = {"cache_implementation": "static"}

    class Clock:  # a streamer: put() gets the prompt, then each new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(prompt, n):
        ids, clock = torch.tensor([prompt]), Clock()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, streamer=clock, **extra)
        return out[0, len(prompt):].tolist(), clock.times[1:]
    return run


def llama_cpp_run(path: Path, context: int) -> tuple[Callable, Callable]:
    """llama.cpp's run and its close: freed before the interpreter exits, not by llama_cpp's
    destructor at exit (which raises there, its module already torn down)."""
    import llama_cpp

    threads = torch.get_num_threads()
    with quiet_fds():  # its log, verbose=False or not
        model = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=context, n_batch=context,
                                verbose=False)

    def run(prompt, n):
        model.reset()  # the whole prompt is evaluated again (no prefix reuse)
        tokens, times = [], []
        for token in model.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            tokens.append(token)
            times.append(time.perf_counter())
            if len(tokens) == n:
                break
        return tokens, times
    return run, model.close


# --------------------------------------------------------------------------- timing

def timed(engine: Engine, prompt: list[int], n: int) -> dict:
    start = time.perf_counter()
    tokens, times = engine.run(prompt, n)
    whole = times[-1] - start
    steady = (times[-1] - times[0]) / (len(times) - 1)
    return {"tokens": tokens, "whole_tokens_per_s": len(tokens) / whole, "steady_ms_per_token": 1e3 * steady}


def alternate(engines: list[Engine], prompt: list[int], n: int, repeats: int,
              read_bandwidth: Callable[[], dict] | None = None) -> list[dict]:
    """Each engine once to warm up (and compile), then `repeats` rounds, engine after engine;
    medians. With read_bandwidth (precision -> GB/s, measured at the start of each round), a row's
    share of it is the median of its rounds' shares. A row of ours also gets its speed against
    llama.cpp's first format of the same precision as the median of the rounds' ratios: the
    engines of one precision run back to back, so a ratio compares two runs a second apart, robust
    to a shared machine's drift between rounds (which medians of each engine alone are not)."""
    first = [timed(e, prompt, n) for e in engines]
    runs, bandwidths = [[] for _ in engines], []
    for _ in range(repeats):
        if read_bandwidth:
            bandwidths.append(read_bandwidth())
        for e, times in zip(engines, runs):
            times.append(timed(e, prompt, n))
    peer = {}  # precision -> llama.cpp's steady ms per round
    for e, times in zip(engines, runs):
        if e.name.startswith("llama.cpp"):
            peer.setdefault(e.precision, [r["steady_ms_per_token"] for r in times])
    rows = []
    for e, times, warm in zip(engines, runs, first):
        per_round = [r["steady_ms_per_token"] for r in times]
        steady = statistics.median(per_round)
        row = {"engine": e.name, "precision": e.precision,
               "whole_tokens_per_s": statistics.median(r["whole_tokens_per_s"] for r in times),
               "steady_ms_per_token": steady, "steady_tokens_per_s": 1e3 / steady, "steady_ms_per_round": per_round,
               "weight_bytes": e.weight_bytes, "weight_gbps": e.weight_bytes / steady / 1e6, "tokens": warm["tokens"]}
        if bandwidths:
            kind = "fp32" if e.precision == "fp32" else "int8"
            row["percent_of_read"] = statistics.median(
                100 * e.weight_bytes / ms / 1e6 / b[kind] for ms, b in zip(per_round, bandwidths))
        if e.name.startswith("ours") and e.precision in peer:
            ratios = [theirs / ms for theirs, ms in zip(peer[e.precision], per_round)]
            row["speed_vs_llama_cpp"], row["speed_vs_llama_cpp_per_round"] = statistics.median(ratios), ratios
        rows.append(row)
    return rows


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


# --------------------------------------------------------------------------- the comparison

def our_engines(hf_dir: Path, methods: list[str], compile_backend: str | None) -> list[Engine]:
    """Ours as sample.py runs them: eager (packed weights) and compiled, per quantization."""
    from llm.infer.quantize import bytes_per_step
    from llm.formats.load import load
    from llm.infer.generate import CompiledStep, decode_one
    from llm.infer.quantize import for_decoding

    base, _ = load(hf_dir, dtype=torch.float32)
    engines = []
    for method in methods:
        precision = PRECISION[method]
        quantize = None if method == "none" else method
        variants = [("eager", None)] + [("compiled", compile_backend)] * bool(compile_backend)
        for how, backend in variants:
            model = for_decoding(copy.deepcopy(base), quantize, backend, batch_size=1)
            step = CompiledStep(backend) if backend else decode_one
            weights = bytes_per_step(model, 1, 0)
            engines.append(Engine(f"ours, {how}", precision, weights, ours(model, step)))
    return engines


def peer_engines(hf_dir: Path, methods: list[str], args, out: Path, fp32_bytes: int) -> tuple[list[Engine], list[str]]:
    """transformers (fp32, eager and compiled) and llama.cpp (each GGUF format of `methods`), and
    one line for a side that could not run."""
    engines, notes = [], []
    if "none" in methods:
        engines.append(Engine("transformers, eager", "fp32", fp32_bytes, transformers_run(hf_dir, False)))
        if args.compile == "inductor":
            engines.append(Engine("transformers, static cache + compile", "fp32", fp32_bytes,
                                  transformers_run(hf_dir, True)))
    missing = llama_cpp_missing(args.llama_cpp)
    if missing:
        return engines, [f"llama.cpp side skipped: {missing}"]
    context = args.prompt_len + args.new_tokens + 8
    for name, path in gguf_files(hf_dir, out, args.llama_cpp, methods).items():
        method = next(m for m, formats in GGUF_FORMATS.items() if name in dict(formats))
        engines.append(Engine(f"llama.cpp, {name}", PRECISION[method], gguf_weight_bytes(path),
                              *llama_cpp_run(path, context)))
    return engines, notes


def compare_peers(args, read_gbps: Callable[[bool], float]) -> dict:
    """The table: every engine on the same model (args.peers) and prompt, alternated."""
    from llm.infer.quantize import bytes_per_step
    from llm.formats.load import load

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("--peers needs transformers (pip install transformers)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.peers == "smollm2-135m":
            print("building a Hugging Face directory at SmolLM2-135M's shapes (random weights) ...", flush=True)
            hf_dir = build_hf_dir(tmp / "hf", SMOLLM2_135M)
        else:
            hf_dir = Path(args.peers)
        base, _ = load(hf_dir, dtype=torch.float32)
        fp32_bytes = bytes_per_step(base, 1, 0)
        c = base.config
        del base
        print(f"{args.peers}: {c.n_layer} layers, d_model {c.d_model}, {c.n_head}/{c.n_kv_head} heads, "
              f"vocab {c.vocab_size}; {fp32_bytes / 1e6:.0f} MB of fp32 weights read per token", flush=True)
        engines = our_engines(hf_dir, args.quantize, args.compile)
        peers, notes = peer_engines(hf_dir, args.quantize, args, tmp, fp32_bytes)
        for note in notes:
            print(note)
        prompt = torch.randint(3, c.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        order = ["fp32", "int8", "int4"]  # one precision's engines back to back: transformers, ours, llama.cpp
        transformers_engines = [e for e in peers if e.name.startswith("transformers")]
        llama_cpp_engines = [e for e in peers if e not in transformers_engines]
        engines = sorted(transformers_engines + engines + llama_cpp_engines, key=lambda e: order.index(e.precision))
        # the read bandwidth at the start of every round: a shared machine's drifts with its neighbours
        bandwidths = []

        def read_bandwidth() -> dict:
            bandwidths.append({"fp32": read_gbps(False), "int8": read_gbps(True)})
            return bandwidths[-1]
        try:
            rows = alternate(engines, prompt, args.new_tokens, args.repeats, read_bandwidth)
        finally:
            for engine in engines:
                engine.close()
    bandwidth = {kind: statistics.median(b[kind] for b in bandwidths) for kind in bandwidths[0]}
    mark_agreement(rows)
    print_table(rows, bandwidth, args)
    return {"model": args.peers, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "read_bandwidth_gbps": bandwidth, "read_bandwidth_per_round": bandwidths, "notes": notes, "rows": rows}


def mark_agreement(rows: list[dict]):
    """Each row's tokens against the fp32 reference (transformers' eager generate, else ours eager)."""
    reference = next((r for r in rows if r["engine"] == "transformers, eager"), None) or \
        next(r for r in rows if r["precision"] == "fp32")
    for row in rows:
        diff = first_difference(row["tokens"], reference["tokens"])
        row["reference"] = reference["engine"]
        row["first_difference"] = diff
        row["identical_tokens"] = diff is None


def print_table(rows: list[dict], bandwidth: dict, args):
    print(f"\nbatch 1, greedy, prompt {args.prompt_len} tokens, {args.new_tokens} new, {torch.get_num_threads()} "
          f"threads; read bandwidth {bandwidth['fp32']:.1f} GB/s (fp32 matrix-vector product, median of the rounds' "
          f"measurements; of read: median of each round's share), {bandwidth['int8']:.1f} (int8); tokens compared "
          f"with {rows[0]['reference']}")
    print(f"{'engine':<38} {'precision':>9} {'whole tok/s':>11} {'steady ms':>9} {'tok/s':>7} {'weights MB':>10} "
          f"{'GB/s':>6} {'of read':>7} {'vs llama.cpp':>12}  tokens")
    for r in rows:
        same = "identical" if r["identical_tokens"] else f"differ from #{r['first_difference']}"
        ratio = f"{r['speed_vs_llama_cpp']:.2f}x" if "speed_vs_llama_cpp" in r else ""
        print(f"{r['engine']:<38} {r['precision']:>9} {r['whole_tokens_per_s']:>11.1f} {r['steady_ms_per_token']:>9.2f} "
              f"{r['steady_tokens_per_s']:>7.1f} {r['weight_bytes'] / 1e6:>10.1f} {r['weight_gbps']:>6.1f} "
              f"{r['percent_of_read']:>6.0f}% {ratio:>12}  {same}", flush=True)
