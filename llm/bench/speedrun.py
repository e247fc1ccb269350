"""python -m llm.bench speedrun: wall-clock time and tokens until validation loss reaches a target.

    python -m llm.bench speedrun --target 3.91                         # baseline vs the config's recipe
    python -m llm.bench speedrun --target 3.91 --recipe baseline --recipe "muon:optimizer=muon,muon_lr=0.02"

Each recipe is a set of settings on top of --config (and the common --key=value overrides); it
trains with train.py's loop, evaluating every --eval_interval steps on the same fixed validation
windows (the same number of windows whatever the batch size), and its time to target is the
training time (evaluation and checkpoints left out) at the first evaluation at or below the
target. Recipes run one after another in this process, on the same prepared data; the table
gives each one's time and tokens to target, final loss, and its speed-up over the first recipe.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from llm.bench import machine
from llm.config import parse_args, parse_value, check_key
from llm.files import write_json
from llm.errors import ArgumentParser, UserError

# Today's recipe (AdamW, warmup + cosine, fp32): what the default config trained with before.
RECIPES = {
    "baseline": {"optimizer": "adamw", "schedule": "cosine", "lr": 2e-3, "warmup_steps": 50, "max_steps": 500,
                 "batch_size": 16, "min_lr_ratio": 0.1, "weight_decay": 0.1, "dtype": "float32"},
    "config": {},  # the config file as it is
}
VALIDATION_WINDOWS = 160  # as the default config: eval_iters 10 x batch_size 16
ROOT = Path(__file__).resolve().parents[2]


def parse_recipe(text: str) -> tuple[str, dict]:
    """"name" (a known recipe) or "name:key=value,key=value"."""
    name, _, body = text.partition(":")
    if not body:
        if name not in RECIPES:
            raise UserError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)}; or name:key=value,...)")
        return name, dict(RECIPES[name])
    settings = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"recipe {name!r}: {item!r} is not key=value")
        check_key(key.strip(), f"recipe {name!r}")
        settings[key.strip()] = parse_value(key.strip(), value.strip())
    return name, settings


def run_recipe(config: str, settings: dict, eval_interval: int) -> list[dict]:
    """Train one recipe with train.py in a fresh process (so each pays the same start-up costs)."""
    from llm.config import resolve

    batch = resolve(config, settings).train.batch_size
    if VALIDATION_WINDOWS % batch:
        raise UserError(f"batch_size {batch} does not divide the {VALIDATION_WINDOWS} validation windows")
    with tempfile.TemporaryDirectory() as out:
        settings = {**settings, "out_dir": out, "eval_interval": eval_interval,
                    "eval_iters": VALIDATION_WINDOWS // batch, "ckpt_interval": 10**9}
        flags = [f"--{k}={'none' if v is None else str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", config, *flags])
        if result.returncode == 130:  # Ctrl-C: train.py saved a checkpoint in a folder that goes now
            raise UserError("interrupted: no figures for this recipe")
        if result.returncode != 0:
            raise UserError(f"the recipe's training failed (exit status {result.returncode})")
        return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def summarize(name: str, records: list[dict], target: float) -> dict:
    evals = [r for r in records if "val_loss" in r]
    hit = next((r for r in evals if r["val_loss"] <= target), None)
    return {"recipe": name, "final_val_loss": evals[-1]["val_loss"], "final_val_bpb": evals[-1]["val_bpb"],
            "train_seconds": evals[-1]["train_seconds"], "tokens": evals[-1]["tokens"],
            "seconds_to_target": hit and hit["train_seconds"], "tokens_to_target": hit and hit["tokens"],
            "step_to_target": hit and hit["step"]}


def bench_speedrun(argv):
    extra = ArgumentParser(prog="python -m llm.bench speedrun", description=__doc__.split("\n\n")[0],
                           epilog="Any train.py setting is accepted too: --config NAME and --key=value "
                                  "(python train.py --help lists them).")
    extra.add_argument("--target", type=float, required=True, help="validation loss to reach")
    extra.add_argument("--recipe", action="append", help="name or name:key=value,...; repeat (default: baseline, config)")
    extra.add_argument("--eval_interval", type=int, default=25, help="steps between evaluations (default 25)")
    extra.add_argument("--json", type=Path)
    known, rest = extra.parse_known_args(argv)
    config, common = parse_args(rest, "python -m llm.bench speedrun")
    config = config or "default"
    recipes = [parse_recipe(r) for r in known.recipe or ["baseline", "config"]]
    rows = []
    for name, settings in recipes:
        print(f"\n=== recipe {name}: {settings or '(the config as it is)'}", flush=True)
        rows.append(summarize(name, run_recipe(config, {**common, **settings}, known.eval_interval), known.target))
    first = rows[0]["seconds_to_target"]
    print(f"\ntime to validation loss {known.target} ({config}, {machine()}; evaluation every {known.eval_interval} steps)")
    print(f"{'recipe':<14}{'to target':>11}{'tokens':>12}{'final loss':>12}{'bpb':>8}{'total':>9}{'speed-up':>10}")
    for r in rows:
        t = r["seconds_to_target"]
        print(f"{r['recipe']:<14}{f'{t:.0f} s' if t else 'not hit':>11}{r['tokens_to_target'] or 0:>12,}"
              f"{r['final_val_loss']:>12.4f}{r['final_val_bpb']:>8.3f}{r['train_seconds']:>8.0f}s"
              f"{f'{first / t:.2f}x' if t and first else '-':>10}")
    if known.json:
        write_json(known.json, {"device": machine(), "config": config, "target": known.target, "rows": rows,
                                "recipes": dict(recipes)})
