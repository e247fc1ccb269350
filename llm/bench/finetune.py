"""python -m llm.bench finetune: memory and tokens/s of full fine-tuning against LoRA, and an example.

    python -m llm.bench finetune --make_example ex       # ex/base (a Llama directory) and ex/chats.jsonl
    python -m llm.bench finetune --init_from ex/base --data ex/chats.jsonl [--steps 40] [--lora_rank 8] [--key=value ...]

Each mode runs train.py --task sft in its own process on the same settings (any train.py setting
may be given): full fine-tuning, then LoRA. Reported: the process's peak resident memory (CPU) or
peak allocated CUDA memory, and positions per second (batch × block_size per step, padding
included) over the second half of the steps.

--make_example writes a small Hugging Face Llama directory built with transformers' own classes
(random weights; a tokenizer trained on the conversations, its <|im_start|>/<|im_end|> reserved)
and 64 conversations as JSONL: a fine-tuning example that needs no download.
"""
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from llm.bench import machine
from llm.files import write_json
from llm.errors import ArgumentParser, UserError

ROOT = Path(__file__).resolve().parent.parent.parent
NAMES = ("ada", "ben", "cleo", "dan", "eve", "finn", "gus", "hana", "ike", "jo", "kai", "lea", "max", "nia", "otto", "pia")
THINGS = ("color", "city", "pet", "tree")
ANSWERS = {"color": ("red", "blue", "green", "teal"), "city": ("Oslo", "Lima", "Kyoto", "Accra"),
           "pet": ("a cat", "a dog", "a crow", "a newt"), "tree": ("an oak", "a pine", "a birch", "a palm")}


def example_conversations(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": [{"role": "system", "content": "Answer in one short sentence."},
                          {"role": "user", "content": f"What is {name}'s favourite {thing}?"},
                          {"role": "assistant", "content": f"{name.title()}'s favourite {thing} is "
                                                           f"{rng.choice(ANSWERS[thing])}."}]}
            for name in NAMES for thing in THINGS]


def make_example(folder: Path):
    import torch
    import transformers

    from llm.model.tokenizer import Tokenizer

    if taken := [str(folder / name) for name in ("chats.jsonl", "base") if (folder / name).exists()]:
        raise UserError(f"--make_example {folder}: {' and '.join(taken)} already exist (nothing is overwritten)")
    rows = example_conversations()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".example-") as work:  # moved in whole, or not at all
            work = Path(work)
            (work / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            text = " ".join(m["content"] for r in rows for m in r["messages"]) * 10
            tokenizer = Tokenizer.train([text], vocab_size=512)
            config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=384,
                                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=128, bos_token_id=tokenizer.eot_id,
                                              eos_token_id=tokenizer.eot_id, tie_word_embeddings=True)
            torch.manual_seed(0)
            transformers.LlamaForCausalLM(config).save_pretrained(work / "base")
            tokenizer.save(work / "base" / "tokenizer.json")
            (work / "base").rename(folder / "base")
            (work / "chats.jsonl").rename(folder / "chats.jsonl")
    except OSError as e:
        raise UserError(f"--make_example {folder}: cannot write there: {e.strerror or e}")
    print(f"wrote {folder / 'base'} (a Llama directory) and {folder / 'chats.jsonl'} ({len(rows)} conversations)")


def run_mode(settings: list[str], steps: int, out: Path) -> dict:
    """train.py in a child process; its peak memory and the positions/s of its last log line."""
    argv = [sys.executable, "train.py", "--task", "sft", *settings, "--out_dir", str(out), "--max_steps", str(steps),
            "--log_interval", str(steps // 2), "--eval_interval", str(10**9), "--ckpt_interval", str(10**9)]
    code = ("import resource, runpy, sys, torch; sys.argv = sys.argv[1:]\n"
            "try: runpy.run_path('train.py', run_name='__main__')\n"
            "finally:\n"
            "  peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            "  print(f'PEAK_BYTES {peak}', file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, *argv[1:]], cwd=ROOT, capture_output=True, text=True)
    peak = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("PEAK_BYTES")]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    if result.returncode != 0 or not speeds or not peak:
        tail = [line for line in result.stderr.splitlines() if line.startswith("error")] or result.stderr.splitlines()[-1:]
        raise UserError(f"train.py failed: {tail[0] if tail else 'no output'}")
    trainable = next((line for line in result.stdout.splitlines() if line.startswith("LoRA:")), "")
    return {"tokens_per_s": speeds[-1], "peak_bytes": int(peak[0]), "note": trainable}


def bench_finetune(argv):
    p = ArgumentParser(prog="python -m llm.bench finetune", description=__doc__.split("\n\n")[0],
                       epilog="Any train.py setting is accepted too (--key=value).")
    p.add_argument("--make_example", type=Path, metavar="DIR", help="write the example model and data into DIR, and stop")
    p.add_argument("--steps", type=int, default=40, help="steps per mode; the second half is timed (default 40)")
    p.add_argument("--lora_rank", type=int, default=8, help="the LoRA mode's rank (default 8)")
    p.add_argument("--json", type=Path, help="also write the figures here as JSON")
    known, rest = p.parse_known_args(argv)
    if known.make_example:
        return make_example(known.make_example)
    if known.steps < 4:
        raise UserError("--steps must be at least 4")
    if not any(a.startswith("--init_from") for a in rest) or not any(a.startswith("--data") for a in rest):
        raise UserError("give --init_from DIR and --data FILE (or --make_example DIR first)")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for mode, extra in (("full", []), ("lora", ["--lora_rank", str(known.lora_rank)])):
            results[mode] = run_mode(rest + extra, known.steps, Path(work) / mode)
            r = results[mode]
            print(f"{mode:5s} {r['tokens_per_s']:10,.0f} positions/s  peak memory {r['peak_bytes'] / 2**20:8,.0f} MiB"
                  + (f"  ({r['note']})" if r["note"] else ""), flush=True)
    print(f"on {machine()}; {known.steps} steps per mode, the second half timed")
    if known.json:
        write_json(known.json, {"device": machine(), "steps": known.steps, "settings": rest, **results})
