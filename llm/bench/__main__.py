"""python -m llm.bench {train,speedrun,sample,decode,finetune,serve,attention} [options]: see llm/bench/__init__.py."""
import sys

from llm.errors import UserError, exit_on_user_error

COMMANDS = ("train", "speedrun", "sample", "decode", "finetune", "serve", "attention")


def main(argv):
    with exit_on_user_error():
        if not argv or argv[0] not in COMMANDS:
            raise UserError(f"usage: python -m llm.bench {{{','.join(COMMANDS)}}} [options]  (--help after the command for more)")
        if argv[0] == "train":
            from llm.bench.train import bench_train as command
        elif argv[0] == "speedrun":
            from llm.bench.speedrun import bench_speedrun as command
        elif argv[0] == "finetune":
            from llm.bench.finetune import bench_finetune as command
        elif argv[0] == "decode":
            from llm.bench.decode import bench_decode as command
        elif argv[0] == "attention":
            from llm.bench.attention import bench_attention as command
        elif argv[0] == "serve":
            from llm.bench.serve import bench_serve as command
        else:
            from llm.bench.sample import bench_sample as command
        command(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
