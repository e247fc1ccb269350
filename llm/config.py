"""Typed configuration: ModelConfig (the architecture, saved as config.json) and
TrainConfig (everything else about a run).

A run's settings resolve in three layers: the dataclass defaults, then a flat TOML
file from configs/, then `--key=value` (or `--key value`) on the command line.
Field names are the command-line names.
"""
import argparse
import difflib
import json
import math
import sys
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from llm.model.attention import BACKENDS
from llm.model.rope import check_scaling
from llm.errors import ArgumentParser, UserError


def option(default, help: str, flag: bool = False):
    """A setting; `flag`: may be given without a value (`--resume` means `--resume=true`), as bools may."""
    return field(default=default, metadata={"help": help, "flag": flag})


TRAIN_CHOICES = {"optimizer": ("adamw", "muon"), "schedule": ("cosine", "wsd"), "task": ("pretrain", "sft"),
                 "train_on": ("assistant", "last_assistant")}
LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")  # the linear layers of a block (llm/model/lora.py)
MODEL_CHOICES = {
    "norm": ("rmsnorm", "layernorm"),
    "norm_position": ("pre", "post"),
    "ffn": ("swiglu", "gelu"),
    "pos_embedding": ("rope", "learned", "sinusoidal"),
}
# Keys that older config.json files carried although they are not architecture.
LEGACY_MODEL_KEYS = ("attention", "dropout")


@dataclass
class ModelConfig:
    """The architecture: what the weights mean. Saved as config.json beside them."""
    vocab_size: int = option(8192, "vocabulary size (the tokenizer is trained to this size)")
    block_size: int = option(1024, "context length, in tokens")
    n_layer: int = option(12, "number of transformer blocks")
    n_head: int = option(12, "query heads per attention layer")
    n_kv_head: int | None = option(None, "key/value heads: n_head = MHA, 1 = MQA, between = GQA (default n_head)")
    d_model: int = option(768, "width of the residual stream")
    head_dim: int | None = option(None, "width of one head (default d_model // n_head)")
    ffn_hidden: int | None = option(None, "FFN hidden width (default 4·d_model for gelu, ≈8/3·d_model for swiglu)")
    norm: str = option("rmsnorm", "rmsnorm | layernorm")
    norm_position: str = option("pre", "pre (x + f(norm(x))) | post (norm(x + f(x)), GPT-1)")
    norm_eps: float = option(1e-5, "epsilon of the norms")
    ffn: str = option("swiglu", "swiglu | gelu")
    pos_embedding: str = option("rope", "rope | learned | sinusoidal")
    rope_theta: float = option(10000.0, "RoPE base")
    rope_scaling: dict | None = option(None, "RoPE frequency scaling, as transformers' rope_parameters: "
                                             '{"rope_type": "linear" | "llama3" | "yarn", "factor": ..., ...} '
                                             "(llm/model/rope.py)")
    bias: bool = option(False, "biases in linear layers and LayerNorm")
    qkv_bias: bool = option(False, "biases on the query/key/value projection only (Qwen2)")
    qk_norm: bool = option(False, "RMSNorm over each head of the queries and keys, before RoPE (Qwen3)")
    tie_embeddings: bool = option(True, "share the input embedding with the output projection")
    sliding_window: int | None = option(None, "sliding-window attention: each query sees this many keys, itself "
                                              "included (Mistral); default: every earlier key")

    def __post_init__(self):
        for name, choices in MODEL_CHOICES.items():
            if getattr(self, name) not in choices:
                raise UserError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_kv_head <= 0 or self.n_head % self.n_kv_head:
            raise UserError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise UserError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.head_dim <= 0:
            raise UserError(f"head_dim must be positive, got {self.head_dim}")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise UserError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.ffn_hidden is None:
            hidden = 4 * self.d_model if self.ffn == "gelu" else 8 * self.d_model // 3
            self.ffn_hidden = 64 * math.ceil(hidden / 64)
        self.rope_scaling = check_scaling(self.rope_scaling)
        if self.rope_scaling and self.pos_embedding != "rope":
            raise UserError(f"rope_scaling needs pos_embedding=rope, got {self.pos_embedding!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UserError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.ffn_hidden <= 0:
            raise UserError(f"ffn_hidden must be positive, got {self.ffn_hidden}")
        if not (self.norm_eps > 0 and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise UserError(f"norm_eps and rope_theta must be positive, got {self.norm_eps} and {self.rope_theta}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = {k: v for k, v in d.items() if k not in LEGACY_MODEL_KEYS}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)


@dataclass
class TrainConfig:
    """How the run trains: its data and its optimization. Resuming compares these with the saved run."""
    # data
    data: str | None = option(None, "corpus: file, directory, glob or Hub dataset (default: the stdlib's .py files)")
    val_fraction: float = option(0.01, "fraction held out for validation (of documents, or of tokens for few documents)")
    tokenizer: str | None = option(None, "a tokenizer.json (or a folder holding one) to use instead of training one")
    tokenizer_train_bytes: int = option(50_000_000, "at most this much text trains the tokenizer")
    seed: int = option(1337, "seeds initialization, data windows and dropout")
    # fine-tuning (task=sft: conversations, llm/train/chat_data.py; docs/finetune.md)
    task: str = option("pretrain", "pretrain (plain text, every token a target) | sft (conversations in the model's "
                                   "chat template, loss on assistant turns only)")
    train_on: str = option("assistant", "sft: the turns whose tokens are targets: assistant (every assistant turn) | "
                                        "last_assistant (the last one only)")
    packing: bool = option(True, "sft: pack several conversations into each window (attention and positions kept "
                                 "per conversation); false: one conversation per row, padded")
    lora_rank: int = option(0, "LoRA: rank of the adapters (0: off, every weight trains)")
    lora_alpha: float = option(16.0, "LoRA: the adapters' update is scaled by lora_alpha / lora_rank")
    lora_dropout: float = option(0.05, "LoRA: dropout on the adapters' input")
    lora_targets: str = option("wqkv,wo,w1,w2,w3", f"LoRA: the linear layers of each block that get adapters, "
                                                   f"comma-separated, of {', '.join(LORA_TARGETS)}")
    # optimization
    batch_size: int = option(16, "sequences per process per micro-step")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    max_steps: int = option(1000, "optimizer steps")
    optimizer: str = option("adamw", "adamw | muon (Muon for the 2-D weights inside the blocks, AdamW for "
                                     "embeddings, output head, norms and biases)")
    lr: float = option(3e-4, "peak learning rate (of AdamW)")
    muon_lr: float = option(0.02, "peak learning rate of Muon's matrices (optimizer=muon)")
    muon_momentum: float = option(0.95, "Muon's momentum (Nesterov)")
    schedule: str = option("cosine", "cosine (warmup, then cosine decay to lr·min_lr_ratio at decay_steps) | "
                                     "wsd (warmup, constant, then linear decay over the last cooldown_fraction)")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of lr")
    warmup_steps: int = option(100, "linear warmup steps")
    decay_steps: int | None = option(None, "length of the schedule: the learning rate is final from here on (default max_steps)")
    cooldown_fraction: float = option(0.2, "wsd: the fraction of decay_steps spent decaying")
    weight_decay: float = option(0.1, "decoupled weight decay, on 2-D weights only")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    dropout: float = option(0.0, "dropout on embeddings, attention probabilities and residual branches")
    max_bad_steps: int = option(10, "stop after this many consecutive steps with a non-finite loss or gradient")
    # evaluation
    eval_interval: int = option(250, "evaluate every N steps (and at the end)")
    eval_iters: int = option(20, "validation batches per evaluation (always the same windows)")

    def __post_init__(self):
        for name, choices in TRAIN_CHOICES.items():
            if getattr(self, name) not in choices:
                raise UserError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters",
                     "tokenizer_train_bytes", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "muon_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise UserError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps < max(self.warmup_steps, 1):
            raise UserError(f"decay_steps={self.decay_steps} must be at least warmup_steps={self.warmup_steps} (and positive)")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("label_smoothing", "dropout", "beta1", "beta2", "muon_momentum", "cooldown_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.check_lora()

    def check_lora(self):
        if self.lora_rank < 0:
            raise UserError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if not self.lora_rank:
            return
        targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if not targets or unknown:
            raise UserError(f"lora_targets={self.lora_targets!r}: choose from {', '.join(LORA_TARGETS)}")
        if not 0 <= self.lora_dropout < 1 or not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise UserError(f"lora_dropout must be in [0, 1) and lora_alpha positive, got {self.lora_dropout} and "
                            f"{self.lora_alpha}")
        if self.optimizer != "adamw":
            raise UserError("lora_rank: the adapters train with optimizer=adamw only (Muon orthogonalizes whole "
                            "matrices, not low-rank factors)")


@dataclass
class RuntimeConfig:
    """How this process runs the training: free to change when a run is resumed."""
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = option("auto", "auto (bfloat16 on CUDA and on CPUs with AMX; measured once per machine and model "
                                "shape on CPUs with AVX512-BF16 only; float32 elsewhere) | float32 | bfloat16")
    compile: bool = option(False, "torch.compile the model")
    attention: str = option("auto", "attention backend: auto (our Triton kernel where it supports the shape, else sdpa) | naive | sdpa | triton")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward")
    cache_dir: str = option("~/.cache/llm", "where tokenizers and tokenized corpora are cached")
    log_interval: int = option(10, "update the progress bar and metrics.jsonl every N steps")
    ckpt_interval: int = option(1000, "checkpoint every N steps (and at the end, and on SIGINT/SIGTERM)")
    wandb: bool = option(False, "log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = option("llm", "wandb project")
    wandb_run_name: str | None = option(None, "wandb run name")

    def __post_init__(self):
        for name in ("log_interval", "ckpt_interval"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"dtype={self.dtype!r} is not one of auto, float32, bfloat16")
        if self.attention not in BACKENDS:
            raise UserError(f"attention={self.attention!r} is not one of {', '.join(BACKENDS)}")


RESUME_CHOICES = ("false", "true", "auto")


@dataclass
class LaunchConfig:
    """Where the run lives and how this command starts it: never saved as a setting."""
    out_dir: str = option("out", "run directory: checkpoints, metrics, plots")
    resume: str = option("false", "continue the run in out_dir (--resume); auto: continue it if it has a checkpoint, "
                                  "else start it (the same command serves the first start and every requeue)", flag=True)
    overwrite: bool = option(False, "replace a run already in out_dir (once the new one is ready to start)")
    init_from: str | None = option(None, "start from the weights of this run, Hugging Face directory or GGUF file, "
                                         "with a fresh optimizer")

    def __post_init__(self):
        resume = str(self.resume).lower()
        self.resume = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}.get(resume, resume)
        if self.resume not in RESUME_CHOICES:
            raise UserError(f"--resume takes true, false or auto, got {self.resume!r}")
        if self.resume != "false" and self.overwrite:
            raise UserError("--resume continues the run in out_dir, --overwrite replaces it: choose one")


@dataclass
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def to_dict(self) -> dict:
        """The saved settings (run.json): everything but the launch options."""
        return {"model": asdict(self.model), "train": asdict(self.train), "runtime": asdict(self.runtime)}

    def to_saved(self) -> dict:
        """run.json: the saved settings, and where the run's first weights came from."""
        return {**self.to_dict(), "init_from": self.launch.init_from}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return build({**d["model"], **d["train"], **d.get("runtime", {})}, legacy_ok=True)


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "runtime": RuntimeConfig, "launch": LaunchConfig}
FIELDS = {f.name: (section, f) for section, cls in SECTIONS.items() for f in fields(cls)}


def find_config(name: str) -> Path:
    """`configs/tiny`, `configs/tiny.toml`, `tiny` and a path all name configs/tiny.toml."""
    configs = Path(__file__).resolve().parent.parent / "configs"
    for path in (Path(name), Path(name + ".toml"), configs / name, configs / (name + ".toml")):
        if path.is_file():
            return path
    known = ", ".join(sorted(p.stem for p in configs.glob("*.toml")))
    raise UserError(f"no config named {name!r} (known: {known})")


def read_toml(path: Path) -> dict:
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read config {path}: {e}")
    for key in values:
        check_key(key, f"config {path}")
    return values


def check_key(key: str, where: str):
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown config key {key!r} in {where}{hint}")


def parse_value(key: str, text: str):
    """Parse a command-line string into the type the field declares."""
    hint = typing.get_type_hints(SECTIONS[FIELDS[key][0]])[key]
    types_ = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in types_ and text.lower() in ("none", "null", ""):
        return None
    kind = next(t for t in types_ if t is not type(None))
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is dict:  # --rope_scaling '{"rope_type": "linear", "factor": 2}'
            return json.loads(text)
        return kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
    except ValueError:
        raise UserError(f"--{key} expects {kind.__name__}, got {text!r}")


def build(values: dict, legacy_ok: bool = False) -> RunConfig:
    """Make a RunConfig from flat field values (legacy_ok: drop keys older runs saved and we no longer use)."""
    by_section = {name: {} for name in SECTIONS}
    for key, value in values.items():
        if legacy_ok and key not in FIELDS:
            continue
        check_key(key, "the settings")
        by_section[FIELDS[key][0]][key] = value
    try:
        return RunConfig(*(cls(**by_section[name]) for name, cls in SECTIONS.items()))
    except TypeError as e:  # a TOML value of the wrong type
        raise UserError(f"bad config value: {e}")


def flatten(run: RunConfig) -> dict:
    return {key: value for section in SECTIONS for key, value in asdict(getattr(run, section)).items()}


class _Parser(ArgumentParser):
    def error(self, message):
        unknown = [a for a in message.split() if a.startswith("--")]
        if message.startswith("unrecognized arguments") and unknown:
            key = unknown[0][2:].split("=")[0]
            close = difflib.get_close_matches(key, FIELDS, n=1)
            if close:
                message += f" (did you mean --{close[0]}?)"
        super().error(message)


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = _Parser(description=description, allow_abbrev=False,
                     usage="%(prog)s [--config NAME] [--key=value ...]")
    parser.add_argument("--config", help="a preset from configs/ (tiny, default, gpt2-small, ...) or a TOML file")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings (override the config file)")
        for f in fields(cls):
            is_bool = f.type is bool or f.metadata["flag"]
            group.add_argument(
                f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                nargs="?" if is_bool else None, const="true" if is_bool else None,
                help=f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})"),
            )
    return parser


def parse_args(argv: list[str], description: str = "") -> tuple[str | None, dict]:
    """Command line -> (config name or None, {field: typed value}) for the fields given."""
    args = vars(argument_parser(description).parse_args(argv))
    name = args.pop("config", None)
    return name, {key: parse_value(key, text) for key, text in args.items()}


def resolve(name: str | None, overrides: dict, base: dict | None = None) -> RunConfig:
    """defaults < base (a saved run) or the named TOML config < overrides."""
    values = dict(base or {})
    if name is not None:
        values.update(read_toml(find_config(name)))
    values.update(overrides)
    return build(values)


def describe(run: RunConfig) -> str:
    lines = []
    for section, values in run.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"  {k} = {v!r}" for k, v in values.items()]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m llm.config --config tiny: print the resolved settings
    from llm.errors import exit_on_user_error

    with exit_on_user_error():
        print(describe(resolve(*parse_args(sys.argv[1:], "Print the resolved settings of a run."))))
