"""Our own format: a run directory of checkpoint folders, as train.py writes them.

    out/
      ckpt-0001000/
        config.json                   ModelConfig: the architecture
        model.safetensors             consolidated fp32 weights
        tokenizer.json
        run.json                      the run's settings (model, train, runtime) and init_from
        state/                        torch.distributed.checkpoint: model + optimizer, sharded by rank
        trainer.json                  step, tokens seen, ...; written last: the completion marker
      checkpoint -> ckpt-0001000      conveniences: the latest checkpoint, and its files at the top
      config.json, model.safetensors, tokenizer.json -> checkpoint/...
      metrics.jsonl, loss.png

The latest checkpoint is the highest-numbered complete ckpt-* folder, found from the folder's
contents alone, so a run directory copied by a tool that follows (or drops) symbolic links
still loads and resumes. Writing them is llm/train/checkpoint.py.
"""
import os
import re
from pathlib import Path

from llm.config import ModelConfig
from llm.errors import UserError
from llm.files import read_json
from llm.formats.weights import build_model, read_safetensors
from llm.model.chat import ChatTemplate, find_template
from llm.model.tokenizer import Tokenizer
from llm.model.transformer import Transformer

CKPT_NAME = re.compile(r"ckpt-(\d+)")
COMPLETE = ("config.json", "model.safetensors", "tokenizer.json", "run.json", "state/.metadata", "trainer.json")


def step_of(ckpt: Path) -> int:
    return int(CKPT_NAME.fullmatch(ckpt.name).group(1))


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first."""
    found = [p for p in Path(run_dir).glob("ckpt-*") if CKPT_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=step_of, reverse=True)


def latest(run_dir: Path) -> Path | None:
    """The highest-numbered complete checkpoint."""
    return next((c for c in checkpoints(run_dir) if all((c / f).exists() for f in COMPLETE)), None)


def holds_run(path: Path) -> bool:
    path = Path(path)
    return (os.path.lexists(path / "checkpoint") or (path / "run.json").exists() or bool(checkpoints(path))
            or (path / "metrics.jsonl").exists())


def model_folder(path: Path) -> Path:
    """A run directory's latest checkpoint, or the folder itself (a checkpoint folder)."""
    return latest(path) or Path(path)


def model_config(path: Path) -> ModelConfig:
    folder = model_folder(path)
    try:
        return ModelConfig.from_dict(read_json(folder / "config.json"))
    except TypeError as e:
        raise UserError(f"{folder / 'config.json'} is not a model config: {e}")


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(model_folder(path) / "tokenizer.json")


def load_model(path: Path) -> Transformer:
    folder = model_folder(path)
    return build_model(model_config(folder), read_safetensors(folder / "model.safetensors"), "model.safetensors")


def chat_template(path: Path) -> ChatTemplate | None:
    return find_template(model_folder(path))
