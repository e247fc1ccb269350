"""Export a run to a Hugging Face Llama directory that transformers loads.

    python -m llm.export --ckpt out --out hf/my-model
    python -m llm.export --ckpt out --out hf/my-model --overwrite     # replace an earlier export

The directory holds config.json, generation_config.json, model.safetensors (float32),
tokenizer.json and tokenizer_config.json, and a fine-tuned run's chat_template.jinja (then
generation_config.json also stops at the template's end-of-turn token); AutoModelForCausalLM.from_pretrained and
AutoTokenizer.from_pretrained read it, and so do llm.load and sample.py. Only
Llama-style models export: norm=rmsnorm, norm_position=pre, ffn=swiglu, pos_embedding=rope.

The export is built in a temporary directory beside --out and renamed into place, so
--out never holds a partial export.
"""
import argparse
import os
import secrets
import shutil
import sys
from pathlib import Path

import torch

from llm.errors import ArgumentParser, UserError, exit_on_user_error
from llm.files import read_json, sync_dir, write_json
from llm.formats.hf import check_exportable, write_llama
from llm.formats.load import chat_template, load
from llm.model.chat import end_of_turn
from llm.formats.run_dir import holds_run


def parse(argv):
    doc = __doc__.split("\n\n")
    p = ArgumentParser(prog="python -m llm.export", description=doc[0], epilog="\n\n".join(doc[1:]),
               formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="what to export: a run directory, a checkpoint folder, or any "
                                                 "directory llm.load reads")
    p.add_argument("--out", required=True, help="the Hugging Face directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    return p.parse_args(argv)


def check_target(ckpt: Path, out: Path, overwrite: bool):
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


def export(ckpt, out, overwrite: bool = False) -> Path:
    """Export run directory `ckpt` to `out`, atomically: build beside it, then rename into place."""
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.exists():
        raise UserError(f"--ckpt {ckpt} does not exist")
    check_target(ckpt, out, overwrite)
    model, tokenizer = load(ckpt, dtype=torch.float32)
    check_exportable(model.config)
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp = out.absolute().parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()  # honours the umask, unlike mkdtemp's 0700
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror or e}")
    old = None
    try:
        write_llama(model, tokenizer, tmp)
        write_chat_template(ckpt, tokenizer, tmp)
        sync_dir(tmp)
        if out.exists():
            old = tmp.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
            os.rename(out, old)  # an empty directory is renamed away too: rename() cannot replace a file with a dir
        os.rename(tmp, out)
    except OSError as e:
        if old is not None and not out.exists():
            os.rename(old, out)  # put the previous export back
            old = None
        raise UserError(f"cannot write --out {out}: {e.strerror or e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def write_chat_template(ckpt: Path, tokenizer, out: Path):
    """The run's chat template beside the export, and its end of turn among the stop tokens."""
    template = chat_template(ckpt)
    if template is None:
        return
    template.save(out)
    stop = end_of_turn(template, tokenizer.special_ids)
    generation = read_json(out / "generation_config.json")
    eos = [i for i in (generation.get("eos_token_id"), stop) if i is not None]
    write_json(out / "generation_config.json", {**generation, "eos_token_id": list(dict.fromkeys(eos))})


def main(argv=None) -> int:
    with exit_on_user_error():
        args = parse(sys.argv[1:] if argv is None else argv)
        out = export(args.ckpt, args.out, args.overwrite)
        print(f"exported {args.ckpt} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
