"""Export a model to a Hugging Face directory (transformers) or a GGUF file (llama.cpp, ollama, LM Studio).

    python -m llm.export --ckpt out --out hf/my-model                   # a Hugging Face directory
    python -m llm.export --ckpt out --out my-model.gguf                 # GGUF (from the suffix, or --format gguf)
    python -m llm.export --ckpt out --out my-model.gguf --outtype q8_0 --verify
    python -m llm.export --ckpt hf/Qwen2.5-0.5B --out qwen.gguf        # any checkpoint llm.load reads
    python -m llm.export --ckpt out --out hf/my-model --overwrite       # replace an earlier export

A Hugging Face directory holds config.json, generation_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json (and chat_template.jinja when the model has a template;
then generation_config.json also stops at the template's end-of-turn token), of the family the
model's settings make it: Llama, Mistral (sliding_window), Qwen2 (qkv_bias) or Qwen3 (qk_norm);
AutoModelForCausalLM and AutoTokenizer read it, and so do llm.load and sample.py. A GGUF file
holds the same model for llama.cpp (architecture llama, qwen2 or qwen3) with its tokenizer
(byte-level BPE) and chat template. Models must be rmsnorm, pre-norm, swiglu and rope.

--verify reads the export back (transformers for a Hugging Face directory, our GGUF reader for
GGUF) and compares it with the source on a fixed prompt: it prints the largest |Δlogit| and how
many of 64 greedy tokens agree, and fails (exit status 1, --out untouched) when the difference
exceeds, as a fraction of the largest |logit|: f32 1e-5 (and all 64 tokens must agree),
f16 5e-3, bf16 2e-2, q8_0 5e-2.

The export is built beside --out under a temporary name and renamed into place (after
--verify passes), so --out never holds a partial export.
"""
import argparse
import os
import secrets
import shutil
import sys
from pathlib import Path

import torch

from llm.errors import ArgumentParser, UserError, exit_on_user_error
from llm.files import sync_dir
from llm.formats import gguf
from llm.formats.gguf_tokenizer import vocabulary
from llm.formats.hf import HF_DTYPES, check_exportable, write_hf
from llm.formats.load import chat_template, load
from llm.formats.run_dir import holds_run
from llm.formats.verify import verify

OUTTYPES = {"hf": tuple(HF_DTYPES), "gguf": tuple(gguf.OUTTYPES)}


class VerifyFailed(Exception):
    pass


def parse(argv):
    doc = __doc__.split("\n\n")
    p = ArgumentParser(prog="python -m llm.export", description=doc[0], epilog="\n\n".join(doc[1:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="what to export: a run directory, a checkpoint folder, or any "
                                                 "checkpoint llm.load reads (Hugging Face directory, GGUF file)")
    p.add_argument("--out", required=True, help="the Hugging Face directory or the .gguf file to create")
    p.add_argument("--format", choices=["hf", "gguf"], help="default: gguf when --out ends in .gguf, else hf")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f32",
                   help="weight type (q8_0: GGUF only; norms and biases stay f32 in GGUF) (default: f32)")
    p.add_argument("--verify", action="store_true", help="read the export back and compare it with the source")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists (and, for a directory, is not empty)")
    args = p.parse_args(argv)
    args.format = args.format or ("gguf" if args.out.endswith(".gguf") else "hf")
    if args.outtype not in OUTTYPES[args.format]:
        raise UserError(f"--outtype {args.outtype} is for GGUF only (Hugging Face: {', '.join(OUTTYPES['hf'])})")
    return args


def check_target(ckpt: Path, out: Path, overwrite: bool, fmt: str):
    if fmt == "gguf":
        if out.is_dir():
            raise UserError(f"--out {out} is a directory (a GGUF export is one file)")
        if out.exists() and out.resolve() == ckpt.resolve():
            raise UserError(f"--out {out} is --ckpt: refusing to replace it")
        if out.exists() and not overwrite:
            raise UserError(f"--out {out} exists (pass --overwrite to replace it)")
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {out} is not empty (pass --overwrite to replace it)")
    source, target = ckpt.resolve(), out.resolve()
    if source == target or target in source.parents:
        raise UserError(f"--out {out} contains --ckpt {ckpt}: refusing to replace it")
    if holds_run(target):
        raise UserError(f"--out {out} holds a training run: refusing to replace it")


def write(model, tokenizer, template, tmp: Path, fmt: str, outtype: str, name: str):
    """The export, complete and on disk, at the temporary path."""
    if fmt == "gguf":
        gguf.write_gguf(model, tokenizer, tmp, outtype, template, name)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        return
    tmp.mkdir()  # honours the umask, unlike mkdtemp's 0700
    write_hf(model, tokenizer, tmp, outtype, template)
    sync_dir(tmp)


def put_in_place(tmp: Path, out: Path):
    """Rename the finished export to `out`; a previous one is replaced only once the new one is there."""
    if tmp.is_file():
        os.replace(tmp, out)
        return
    old = None
    if out.exists():
        old = tmp.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        os.rename(out, old)  # an empty directory is renamed away too: rename() cannot replace a file with a dir
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(ckpt, out, overwrite: bool = False, fmt: str = "hf", outtype: str = "f32", check: bool = False) -> Path:
    """Export `ckpt` to `out`, atomically: build beside it, verify when asked, then rename into place."""
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.exists():
        raise UserError(f"--ckpt {ckpt} does not exist")
    check_target(ckpt, out, overwrite, fmt)
    model, tokenizer = load(ckpt, dtype=torch.float32)
    check_exportable(model.config)
    if fmt == "gguf":
        vocabulary(tokenizer, tokenizer.vocab_size)  # a tokenizer GGUF cannot hold is refused before anything is written
        if model.config.sliding_window is not None:
            print(f"note: llama.cpp ignores the sliding window of {model.config.sliding_window} tokens in this "
                  "architecture: beyond it, its outputs differ from ours", file=sys.stderr)
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror or e}")
    tmp = out.absolute().parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    try:
        write(model, tokenizer, chat_template(ckpt), tmp, fmt, outtype, ckpt.resolve().name)
        if check:
            report = verify(model, tokenizer, tmp, fmt, outtype)
            print(report)
            if not report.ok:
                raise VerifyFailed(f"--verify failed: {out} was not written")
        put_in_place(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write --out {out}: {e.strerror or e}")
    finally:
        remove(tmp)
    return out


def remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def main(argv=None) -> int:
    with exit_on_user_error():
        args = parse(sys.argv[1:] if argv is None else argv)
        try:
            out = export(args.ckpt, args.out, args.overwrite, args.format, args.outtype, args.verify)
        except VerifyFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"exported {args.ckpt} to {out} ({'GGUF' if args.format == 'gguf' else 'Hugging Face'}, {args.outtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
