"""Pretrain a decoder-only language model.

    python train.py                                   # the default config on the stdlib's Python sources
    python train.py --config configs/tiny --data corpus/ --out_dir out --max_steps 100 [--key=value ...]
    python train.py --out_dir out --resume            # continue a run (or: the command that started it + --resume)
    python train.py --config ... --resume=auto        # start, or continue after a requeue: one command for both
    torchrun --nproc_per_node=8 train.py --config configs/gpt2-small --data ...   # FSDP

Every setting in llm/config.py is a flag; `python train.py --help` lists them.
"""
import sys

from llm.config import LaunchConfig, parse_args
from llm.train.distributed import exit_process
from llm.errors import exit_on_user_error
from llm.train.launch import configure
from llm.train.trainer import train


def main(argv: list[str]) -> int:
    with exit_on_user_error():
        name, overrides = parse_args(argv, description=__doc__.splitlines()[0])
        resume = LaunchConfig(resume=overrides.get("resume", "false")).resume
        if name is None and resume != "true" and not overrides.get("init_from"):
            name = "default"  # a new run (or --resume=auto): the default config
        return train(*configure(name, overrides))


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except SystemExit as e:  # bad input or Ctrl-C, already said in one line
        status = e.code
    exit_process(status)
