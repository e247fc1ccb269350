"""How a train.py command becomes a run: a new one, the continuation of the run in out_dir, a
new one initialized from a checkpoint's weights, or one that replaces an old run.

Settings have four sections (llm/config.py): the architecture (model), the training (train),
how this process runs it (runtime) and the launch options (out_dir, resume, overwrite,
init_from). A resumed run takes its saved settings; whatever the command line or config file
gives on top must keep the architecture and the data, and may change the rest (printed). So
the exact command that started a run continues it, which is what a cluster scheduler does
when it requeues a preempted job; `--resume=auto` starts the run when out_dir holds no
checkpoint and continues it when it does.
"""
import os
from dataclasses import asdict, fields
from pathlib import Path

from llm.config import FIELDS, LaunchConfig, ModelConfig, RunConfig, build, find_config, flatten, read_toml
from llm.errors import UserError
from llm.formats.load import model_config
from llm.train.checkpoint import Resume, resume_point
from llm.train.data import normalize_data_spec

# Training settings that decide which tokens the run trains and validates on: a resumed run keeps them.
DATA_FIELDS = ("data", "tokenizer", "tokenizer_train_bytes", "val_fraction", "seed", "task", "train_on", "packing")
# LoRA settings that decide which parameters exist and train: a resumed run keeps them too.
ADAPTER_FIELDS = ("lora_rank", "lora_targets", "lora_alpha")


def given_settings(name: str | None, overrides: dict) -> tuple[dict, dict]:
    """(values from the config file, values from the command line), both as given."""
    from_file = read_toml(find_config(name)) if name is not None else {}
    values = {**from_file, **overrides}
    for key in ("data", "tokenizer"):
        if values.get(key) is not None:
            values[key] = normalize_data_spec(values[key])
    return {k: values[k] for k in from_file}, {k: values[k] for k in overrides}


def configure(name: str | None, overrides: dict) -> tuple[RunConfig, Resume | None]:
    """The run's settings, and the checkpoint it continues (read here, once) or None.
    launch.resume comes back resolved: "true" (continue) or "false" (start)."""
    from_file, from_cli = given_settings(name, overrides)
    given = {**from_file, **from_cli}
    launch = LaunchConfig(**{k: v for k, v in given.items() if FIELDS[k][0] == "launch"})
    out_dir = Path(launch.out_dir).expanduser()
    if launch.resume != "false":
        resume = resume_point(out_dir)
        if resume is not None:
            run = continue_settings(resume.config, from_file, from_cli, launch.init_from)
            run.launch.resume = "true"
            return run, resume
        if launch.resume == "true":
            raise UserError(f"--resume: {out_dir} holds no complete checkpoint")
        given["resume"] = "false"  # auto, and nothing to continue: start
    if launch.init_from:
        return init_settings(given, from_cli, Path(launch.init_from).expanduser()), None
    return build(given), None


def architecture_overrides(from_file: dict, from_cli: dict, init_from: str | None) -> dict:
    """The model settings the command asks for. With --init_from the architecture is the
    source's: a config file's model settings are ignored, the command line's must agree."""
    source = from_cli if init_from else {**from_file, **from_cli}
    return {k: v for k, v in source.items() if FIELDS[k][0] == "model"}


def check_architecture(saved: ModelConfig, asked: dict, flag: str):
    """Refuse, by name, a change to the architecture of a checkpoint (derived values included)."""
    wanted = ModelConfig(**{**asdict(saved), **asked})
    for f in fields(ModelConfig):
        if getattr(wanted, f.name) != getattr(saved, f.name):
            raise UserError(f"{flag} keeps the checkpoint's architecture: cannot change {f.name} "
                            f"({getattr(saved, f.name)} -> {getattr(wanted, f.name)})")


def continue_settings(saved: RunConfig, from_file: dict, from_cli: dict, init_from: str | None) -> RunConfig:
    """The saved run's settings with the command's on top: architecture and data kept (a change is
    refused by name), any other change applied and printed."""
    check_architecture(saved.model, architecture_overrides(from_file, from_cli, init_from), "--resume")
    before = flatten(saved)
    asked = {k: v for k, v in {**from_file, **from_cli}.items() if FIELDS[k][0] in ("train", "runtime", "launch")}
    run = build({**{k: v for k, v in before.items() if FIELDS[k][0] != "launch"}, **asked})
    after = flatten(run)
    changed = [k for k in asked if FIELDS[k][0] != "launch" and after[k] != before[k]]
    for key in changed:
        if key in DATA_FIELDS:
            raise UserError(f"--resume keeps the run's data: cannot change {key} ({before[key]} -> {after[key]}); "
                            "start a new run with --init_from to train on other data")
        if key in ADAPTER_FIELDS:
            raise UserError(f"--resume keeps the run's adapters: cannot change {key} ({before[key]} -> {after[key]})")
    if changed and os.environ.get("RANK", "0") == "0":
        print("resuming with changed settings: " + ", ".join(f"{k} {before[k]} -> {after[k]}" for k in changed))
    return run


def init_settings(given: dict, from_cli: dict, source: Path) -> RunConfig:
    """A new run whose architecture is the --init_from checkpoint's."""
    if not source.exists():
        raise UserError(f"--init_from {source} does not exist")
    source_model = model_config(source)
    check_architecture(source_model, architecture_overrides({}, from_cli, "init"), "--init_from")
    return build({**{k: v for k, v in given.items() if FIELDS[k][0] != "model"}, **asdict(source_model)})
