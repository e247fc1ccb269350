"""A run prepared once, before its first step, into one value the training loop reads.

    claim_out_dir(config, resume, d)   before prepare, for the whole job: locked and checked
        out_dir claimed         one job per run directory; it may be written, and is not another run's

    prepare(config, resume, d, out) -> PreparedRun
        tokenizer and data      from the checkpoint, a file, or trained; tokenized and cached
                                (task=sft: conversations in the chat template, llm/train/chat_data.py)
        model                   new, from --init_from's weights, or the checkpoint's; LoRA adapters
        dtype                   --dtype, `auto` decided once per run (llm/runtime.py)
        placed, parallelized    on the device, FSDP2 under torchrun, activation checkpointing
        optimizers              and, when resuming, their state and the model's
        metrics                 metrics.jsonl, wandb
        --overwrite             only now, with everything ready, the old run makes way

Everything that can fail on bad input fails here, before a step runs and before anything the
user had is touched.
"""
import contextlib
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llm import runtime
from llm.config import RunConfig, describe, flatten
from llm.errors import UserError
from llm.files import write_json
from llm.formats.load import chat_template, load, load_tokenizer
from llm.model.chat import TURN_END, TURN_START, ChatTemplate
from llm.model.lora import add_lora
from llm.model.tokenizer import Tokenizer
from llm.model.transformer import Transformer
from llm.train import out_dir
from llm.train.batches import WindowBatches
from llm.train.chat_data import ChatBatches, prepare_chats
from llm.train.checkpoint import Progress, Resume, checkpoint_bytes, human_bytes, load_training_state
from llm.train.data import open_corpus, prepare_tokens, split_tokens, train_or_load_tokenizer
from llm.train.distributed import Dist, any_rank, parallelize, sum_across_ranks
from llm.train.metrics import MetricsLog, flops_per_token, peak_flops
from llm.train.optim import make_optimizers


@dataclass
class PreparedRun:
    config: RunConfig
    d: Dist
    out: Path
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None  # task=sft: the template the run trains on, saved with it
    batches: WindowBatches | ChatBatches
    model: torch.nn.Module  # placed and parallelized: what checkpoints save
    step_model: torch.nn.Module  # what steps call: the model, compiled when asked
    optimizers: list
    dtype: torch.dtype
    autocast: contextlib.AbstractContextManager  # mixed precision without FSDP (FSDP casts itself)
    progress: Progress
    resumed_from: Path | None
    metrics: MetricsLog
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None  # of one device, where known (bf16 on CUDA): for MFU


@contextlib.contextmanager
def claim_out_dir(config: RunConfig, resume: Resume | None, d: Dist):
    """Yields out_dir, locked for the job until the block ends. Under torchrun the first process
    claims it for the job, and if it cannot, every process stops."""
    out, held, error = Path(config.launch.out_dir).expanduser(), None, None
    if d.is_main:
        try:
            out, held = out_dir.claim(config, resume)
        except UserError as e:
            error = e
    if any_rank(error is not None, d):
        raise error or UserError("the first process could not claim out_dir (its error is above)")
    try:
        yield out
    finally:
        if held is not None:
            held.release()


def prepare(config: RunConfig, resume: Resume | None, d: Dist, out: Path) -> PreparedRun:
    init_from = Path(config.launch.init_from).expanduser() if config.launch.init_from else None
    tokenizer, template, batches, data_line = prepare_data(config, d, resume.checkpoint if resume else init_from)

    torch.manual_seed(config.train.seed)
    model = new_model(config, init_from if resume is None else None)
    n_params, flops = model.num_params(), flops_per_token(model)
    if config.train.lora_rank:
        add_lora(model, config.train)
    model.to(d.device)
    progress = resume.progress if resume else Progress()
    dtype = choose_dtype(config, progress, model, d)
    progress.dtype = str(dtype.value).removeprefix("torch.")
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    parallelize(model, d, dtype.value if dtype.value != torch.float32 else None, config.runtime.activation_checkpointing)
    optimizers = make_optimizers(model, config.train, d.device, dtype.value)
    if resume is not None:
        load_training_state(resume.checkpoint, model, optimizers)
    if d.is_main:
        warn_if_no_room(out, checkpoint_bytes(model, optimizers))
    use_autocast = dtype.value != torch.float32 and not d.enabled

    if d.is_main and config.launch.overwrite:  # everything is ready: only now may an old run make way
        out_dir.set_aside_old_run(out)
    rt = config.runtime
    wandb = dict(project=rt.wandb_project, name=rt.wandb_run_name, config=flatten(config), dir=str(out),
                 id=progress.wandb_id, resume="allow") if rt.wandb else None
    metrics = MetricsLog(out, d.is_main, progress.step if resume else None, wandb)
    tokens_per_step = config.train.batch_size * config.model.block_size * config.train.grad_accum * d.world_size
    if d.is_main:
        print(describe(config))
        if resume is not None:
            print(f"resuming from {resume.checkpoint} at step {progress.step}")
        print(f"device: {d.device} x {d.world_size} ({d.device_reason}) | dtype: {dtype} | {runtime.threads()}")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if trainable != n_params:
            print(f"LoRA: {trainable:,} trainable parameters (rank {config.train.lora_rank} on "
                  f"{config.train.lora_targets}); the {n_params:,} of the model are frozen")
        print(f"parameters: {n_params:,} | global batch: {config.train.batch_size} x {config.train.grad_accum} "
              f"accumulation x {d.world_size} processes = {tokens_per_step:,} tokens/step")
        print(data_line)
        write_json(out / "run.json", config.to_saved())
    return PreparedRun(
        config=config, d=d, out=out, tokenizer=tokenizer, chat_template=template, batches=batches, model=model,
        step_model=torch.compile(model) if rt.compile else model, optimizers=optimizers, dtype=dtype.value,
        autocast=torch.autocast(d.device.type, dtype=dtype.value) if use_autocast else contextlib.nullcontext(),
        progress=progress, resumed_from=resume.checkpoint if resume else None, metrics=metrics,
        tokens_per_step=tokens_per_step, flops_per_token=flops,
        peak_flops=peak_flops(d.device) if dtype.value == torch.bfloat16 else None)


def warn_if_no_room(out: Path, needed: int):
    """Say before the first step, not at the first checkpoint, that out_dir's disk is too full."""
    free = shutil.disk_usage(out).free
    if free < needed:
        print(f"warning: a checkpoint of this run needs about {human_bytes(needed)} and {out} has {human_bytes(free)} "
              "free: saving will fail unless space is made", file=sys.stderr)


def prepare_data(config: RunConfig, d: Dist, source: Path | None):
    """The run's tokenizer (from `source`, a checkpoint to resume or initialize from; else
    --tokenizer; else trained on the corpus), its chat template (task=sft) and its batches.

    Under torchrun the first process of each node checks the caches (sizes and checksums) or
    builds them while the others wait, then they check sizes only. Each cache entry is built under
    a file lock, so with a shared cache_dir one node builds it and the others wait. If the first
    process fails, the others stop too instead of waiting forever.
    """
    cfg = config.train
    cache_dir = Path(config.runtime.cache_dir).expanduser()
    corpus = open_corpus(cfg.data)  # cheap checks, on every process
    if source is not None:
        tokenizer = load_tokenizer(source)
    elif cfg.tokenizer:
        tokenizer = Tokenizer.from_file(Path(cfg.tokenizer).expanduser())
    else:
        tokenizer = None
    template = None
    if cfg.task == "sft":
        if tokenizer is None:
            raise UserError("--task sft fine-tunes a model on conversations: pass --init_from (a run or a Hugging Face "
                            "directory), or --tokenizer to start from scratch")
        template = sft_template(config, tokenizer, source, d)

    def build(checksum: bool):
        vocab_size = config.model.vocab_size
        tok = tokenizer or train_or_load_tokenizer(corpus, vocab_size, cache_dir, cfg.tokenizer_train_bytes, checksum)
        if tok.vocab_size > config.model.vocab_size:
            raise UserError(f"the tokenizer has {tok.vocab_size} tokens but vocab_size is {config.model.vocab_size}: "
                            f"pass --vocab_size {tok.vocab_size} (or more)")
        if template is not None:
            last_only = cfg.train_on == "last_assistant"
            return tok, prepare_chats(corpus, tok, template, cache_dir, cfg.val_fraction, last_only)
        return tok, prepare_tokens(corpus, tok, cache_dir, cfg.val_fraction, checksum)

    error = None
    if d.local_rank == 0:
        try:
            built = build(checksum=True)
        except UserError as e:
            error = e
    if any_rank(error is not None, d):
        raise error or UserError("another process failed while preparing the data (its error is above)")
    tokenizer, token_dir = built if d.local_rank == 0 else build(checksum=False)
    if template is not None:
        batches = ChatBatches(token_dir, config, d, tokenizer)
        return tokenizer, template, batches, batches.describe()
    splits = split_tokens(token_dir, config.model.block_size)
    line = (f"data: {splits.meta['corpus']}: {len(splits.train):,} training, {len(splits.val):,} validation tokens "
            f"(validation: {splits.how})")
    return tokenizer, None, WindowBatches(splits.train, splits.val, config, d, tokenizer), line


def sft_template(config: RunConfig, tokenizer: Tokenizer, source: Path | None, d: Dist) -> ChatTemplate:
    """The source's chat template, or the default (ChatML) one. The default's two markers must be
    special tokens: a tokenizer trained before they were reserved gets them now (new ids at the
    end of its vocabulary), and the model's vocabulary grows to hold them where it must (their
    embeddings start as the mean of the others: new_model)."""
    template = chat_template(source) if source is not None else None
    if template is not None:
        return template
    added = tokenizer.add_special_tokens([TURN_START, TURN_END])
    if added:
        ids = ", ".join(f"{t} = {tokenizer.hf.token_to_id(t)}" for t in added)
        grown = tokenizer.vocab_size > config.model.vocab_size
        if grown:
            config.model.vocab_size = tokenizer.vocab_size
        if d.is_main:
            print(f"note: the tokenizer had no {' and '.join(added)} (the default chat template's markers): added as "
                  f"special tokens ({ids})" + (f"; the model's vocabulary grows to {tokenizer.vocab_size}, the new "
                                                "embeddings start as the mean of the others" if grown else ""))
    return ChatTemplate.default()


def new_model(config: RunConfig, init_from: Path | None) -> Transformer:
    """A freshly initialized model, or one holding --init_from's weights (in fp32)."""
    model = Transformer(config.model, config.runtime.attention, config.train.dropout)
    if init_from is not None:
        source, _ = load(init_from, dtype=torch.float32)
        model.load_state_dict(grown_vocabulary(source.state_dict(), config.model.vocab_size))
    return model


def grown_vocabulary(state_dict: dict, vocab_size: int) -> dict:
    """The embedding (and an untied output head) with rows added up to vocab_size, each the mean
    of the existing rows (new tokens start where the model's average token is, as transformers'
    resize_token_embeddings does)."""
    for name in ("tok_embeddings.weight", "output.weight"):
        weight = state_dict.get(name)
        if weight is not None and weight.size(0) < vocab_size:
            mean = weight.mean(dim=0, keepdim=True).expand(vocab_size - weight.size(0), -1)
            state_dict[name] = torch.cat([weight, mean])
    return state_dict


def choose_dtype(config: RunConfig, progress: Progress, model, d: Dist) -> runtime.Choice:
    """--dtype, with `auto` decided once per run: a resumed run keeps the dtype it trained in.
    Where `auto` measures, the first process decides for all (from its cached or new probe)."""
    setting = config.runtime.dtype
    if setting == "auto" and progress.dtype is not None:
        return runtime.Choice(runtime.dtype_named(progress.dtype), "auto: the dtype this run has trained in")
    shape = {"model": asdict(config.model), "rows": min(config.train.batch_size, 4)}
    probe = runtime.cached_probe(config.runtime.cache_dir, shape,
                                 lambda: runtime.bf16_speedup(model, shape["rows"], config.model.block_size))
    choice = runtime.training_dtype(setting, d.device, probe=probe) if d.is_main else None
    if d.enabled:  # the first process's choice, for every process
        verdict = sum_across_ranks(torch.tensor([float(choice.value == torch.bfloat16) if choice else 0.0],
                                                device=d.device), d).item()
        if choice is None:
            choice = runtime.Choice(torch.bfloat16 if verdict else torch.float32, "auto: as the first process chose")
    return choice
