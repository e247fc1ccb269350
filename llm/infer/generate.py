"""Sampling: prompts in, tokens or text out, with a static KV cache.

`generate` is the token-level loop: one forward pass over the prompts (prefill),
then one token per step (`decode_one`) reading the cache. `complete` wraps it with
text: encode, stop at the end-of-sequence token and at stop strings, stream text as
the tokenizer decodes it.

Prompts of different lengths are left-padded: row b's first kv_start[b] slots are
padding, masked out of attention, and its positions count from its first real
token, so each row is computed exactly as if it were generated alone.

The decode step has static shapes: the cache is preallocated for the whole generation,
written in place at a position held in a tensor, and attention reads all of it under a
mask. So the step compiles once (`CompiledStep`) and, on CUDA, replays as a CUDA graph.
"""
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llm.errors import UserError
from llm.infer.aot import AheadOfTimeStep
from llm.infer.kv_cache import KVCache
from llm.model.tokenizer import StreamDecoder


@dataclass
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of most likely tokens with total probability >= top_p

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: (B, V)."""
    if top_k and top_k < logits.size(-1):
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, mass_before < top_p)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / s.temperature, s.top_k, s.top_p).softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p, without multinomial's host synchronization.
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, P) ids, right-aligned, and each row's padding length (None when there is none)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    pads = [width - len(p) for p in prompts]
    return ids, (torch.tensor(pads, device=device) if any(pads) else None)


def decode_one(model, token: torch.Tensor, kv_start: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """One token per row, (B, 1), through the model, reading and extending the cache -> (B, vocab)
    logits. Its inputs keep their shapes for a whole generation (the cache's position is a tensor)."""
    return model(token, kv_start=kv_start, cache=cache, last_only=True)[:, -1]


def check_compile_backend(backend: str):
    try:
        import torch._dynamo
    except OSError as e:  # e.g. TORCHINDUCTOR_CACHE_DIR names a file: made at import
        raise UserError(f"--compile {backend}: torch cannot make its compile cache folder ({e}); "
                        f"see TORCHINDUCTOR_CACHE_DIR")

    available = torch._dynamo.list_backends(exclude_tags=())
    if backend not in available:
        raise UserError(f"--compile {backend}: not a torch.compile backend (available: {', '.join(available)})")


# Inductor recomputes a cheap activation (a norm's output, a residual sum) inside each loop that reads
# it; in a decode step on CPU those loops stream weights, and recomputing there costs more than the
# tiny buffer it saves: realize activations read more than once, or made of more than a few ops.
# The wrapper's check of every input's size and stride (~370 at 30 layers, each already guarded by
# Dynamo) cost about a twentieth of a step: off.
CPU_INDUCTOR_OPTIONS = {"realize_reads_threshold": 1, "realize_opcount_threshold": 4,
                        "size_asserts": False, "alignment_asserts": False}


class CompiledStep:
    """`decode_one` under torch.compile: the shapes are static, so one compilation serves a whole
    generation (and later ones of the same sizes and model: layers packed for oneDNN are found by a
    key that is a constant of the graph, so another model, even a copy, compiles anew). On CUDA the
    step is also captured as a CUDA graph at the second step of each generation (the first compiles
    and warms up, on a side stream as capture requires) and replayed after that, with no per-kernel
    launch cost. Inductor on CPU compiles with CPU_INDUCTOR_OPTIONS, and ahead of time (AOTInductor,
    llm/infer/aot.py: no guards and no Python wrapper per step) unless a layer is packed for oneDNN."""

    def __init__(self, backend="inductor"):
        self.backend = backend
        self.step = None  # compiled at the first call, for the device it is given
        self.inputs = None  # the generation the graph belongs to: (model, kv_start, cache)
        self.graph = None
        self.compile_seconds = None  # how long the first call took (it compiles)

    def __call__(self, model, token, kv_start, cache):
        if self.compile_seconds is None:
            start = time.perf_counter()
            logits = self._call(model, token, kv_start, cache)
            self.compile_seconds = time.perf_counter() - start
            return logits
        return self._call(model, token, kv_start, cache)

    def _compile(self, device: torch.device, model):
        if self.backend == "inductor" and device.type == "cpu" and AheadOfTimeStep.supports(model):
            self.step = AheadOfTimeStep(CPU_INDUCTOR_OPTIONS)
            return
        # Dynamo keeps compiled code, and its limit of 8 recompilations, per code object: each
        # CompiledStep compiles its own copy of decode_one, so a process that decodes with many
        # models, dtypes or batch sizes never reaches the limit (a hard error under fullgraph).
        step = types.FunctionType(decode_one.__code__.replace(), decode_one.__globals__, decode_one.__name__)
        options = CPU_INDUCTOR_OPTIONS if self.backend == "inductor" and device.type == "cpu" else None
        self.step = torch.compile(step, backend=self.backend, fullgraph=True, dynamic=False, options=options)

    def _call(self, model, token, kv_start, cache):
        if self.step is None:
            self._compile(token.device, model)
        if isinstance(self.step, AheadOfTimeStep):
            return self.step(model, token, kv_start, cache)
        inputs = (model, kv_start, cache)
        same = self.inputs is not None and all(a is b for a, b in zip(inputs, self.inputs))
        if token.device.type != "cuda":
            self.inputs = inputs
            if not same:
                return self.step(model, token, kv_start, cache)
            # The inputs of the last call again: what Dynamo's guards check (the model's structure,
            # the tensors' sizes, ~370 tensors at 30 layers) has not changed, and checking it cost
            # about a twentieth of a step. Guards that tell apart graphs compiled for other inputs
            # still run.
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.step(model, token, kv_start, cache)
        if not same:
            self.inputs, self.graph = inputs, None
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.step(model, token, kv_start, cache)
            torch.cuda.current_stream().wait_stream(side)
            return logits
        if self.graph is None:  # capture records without running: the replay below runs this step
            self.token, self.graph = token.clone(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step(model, self.token, kv_start, cache)
        self.token.copy_(token)
        self.graph.replay()
        return self.logits  # overwritten by the next replay: sample from it before


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             generator: torch.Generator | None = None, use_cache: bool = True, pad_id: int = 0,
             decode_step: Callable = decode_one) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, (B,) on the model's device, max_new_tokens times.

    Stopping early is the caller's choice (stop iterating). use_cache=False recomputes
    the whole sequence every step: slow, and the reference the cache must equal.
    decode_step: how the one-token steps run (decode_one, or a CompiledStep).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    ids, kv_start = left_pad(prompts, pad_id, device)
    width = ids.size(1)
    total = width + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(f"prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds the context of {model.config.block_size} tokens")
    if use_cache:
        cache = KVCache(model.config, len(prompts), total, device, next(model.parameters()).dtype)
        logits = model(ids, kv_start=kv_start, cache=cache, last_only=True)[:, -1]  # prefill
    else:  # the reference: explicit positions, no cache, every step from scratch
        positions = torch.arange(width, device=device).expand(len(prompts), width)
        if kv_start is not None:
            positions = (positions - kv_start[:, None]).clamp(min=0)
        logits = model(ids, positions=positions, kv_start=kv_start, last_only=True)[:, -1]
    for i in range(max_new_tokens):
        token = sample(logits, sampling, generator)
        yield token
        if i == max_new_tokens - 1:
            return
        if use_cache:
            logits = decode_step(model, token[:, None], kv_start, cache)
        else:
            ids = torch.cat([ids, token[:, None]], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            logits = model(ids, positions=positions, kv_start=kv_start, last_only=True)[:, -1]


class TextStream:
    """Turns one row's tokens into text pieces that never split a character or reveal a stop string.

    The text is the tokenizer's own decoding of prompt + completion, less the prompt's
    (StreamDecoder): pieces never end inside a character, and SentencePiece-style spaces
    come out as a full decode has them. Text that could be the start of a stop string
    is held until it is clearly not one; a stop string ends the text where it begins.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), prompt_ids: list[int] = ()):
        self.decoder = StreamDecoder(tokenizer, prompt_ids)
        self.stop = stop
        self.text = ""  # the text so far; text[:emitted] has been handed out
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Add a token; return the text that became safe to show."""
        if self.stopped:
            return ""
        self.text += self.decoder.add(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended: return everything still held back."""
        if not self.stopped:
            self.text += self.decoder.finish()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        longest = max((len(s) for s in self.stop), default=0)
        hits = [at for s in self.stop if (at := self.text.find(s, max(0, self.emitted - longest))) != -1]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        end = len(self.text)
        if not self.stopped and not final:
            # Hold back the longest tail that is the beginning of a stop string.
            for k in range(min(longest - 1, end - self.emitted), 0, -1):
                if any(s.startswith(self.text[end - k :]) for s in self.stop):
                    end -= k
                    break
        out, self.emitted = self.text[self.emitted : end], end
        return out


def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """A prompt's ids; an empty prompt starts from what the tokenizer adds (e.g. BOS), else its
    end-of-sequence token, as a document boundary."""
    ids = tokenizer.encode(prompt)
    if ids:
        return ids
    if tokenizer.eot_id is None:
        raise ValueError("an empty prompt needs a token to start from, and this tokenizer adds no BOS "
                         "and has no end-of-sequence token: give a prompt")
    return [tokenizer.eot_id]


@torch.inference_mode()
def complete(model, tokenizer, prompts: list[str | list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             seed: int | None = None, stop: tuple[str, ...] = (), on_text: Callable[[int, str], None] | None = None,
             use_cache: bool = True, truncate: bool = False, decode_step: Callable = decode_one,
             stop_ids: tuple[int, ...] = ()) -> list[dict]:
    """Complete each prompt (text, or token ids as given); returns per row {"prompt_ids", "ids", "text"}.

    Generation of a row ends at the end-of-sequence token (if the tokenizer has one) or one of
    stop_ids (a chat template's end of turn), at a stop string (excluded from the text) or after
    max_new_tokens. "text" is what the completion adds to the prompt when the tokenizer decodes
    both together; on_text(row, piece) receives it as it is made. truncate: drop a too-long prompt's left
    side instead of failing.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    eot = tokenizer.eot_id
    stops = [i for i in (eot, *stop_ids) if i is not None]
    prompt_ids = [list(p) if isinstance(p, list) else prompt_tokens(tokenizer, p) for p in prompts]
    if truncate:
        room = model.config.block_size - max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {model.config.block_size}")
        prompt_ids = [p[-room:] for p in prompt_ids]
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    streams = [TextStream(tokenizer, stop, p) for p in prompt_ids]
    pad = eot if eot is not None else 0  # any id: padding is masked
    tokens = generate(model, prompt_ids, max_new_tokens, sampling, generator, use_cache, pad, decode_step) if max_new_tokens else iter(())
    # Host-side work each step only when text is needed now (streaming or stop strings);
    # otherwise tokens stay on the device and end-of-sequence is checked every 16 steps.
    if on_text is not None or stop:
        ids = follow_streams(tokens, streams, stops, on_text)
    else:
        ids = collect_on_device(tokens, streams, stops, device)
    return [{"prompt_ids": p, "ids": i, "text": s.text} for p, i, s in zip(prompt_ids, ids, streams)]


def follow_streams(tokens, streams: list[TextStream], stops: list[int], on_text) -> list[list[int]]:
    """Each step's tokens through the rows' text streams as they come, so that a stop string ends
    its row at once; returns each row's ids."""
    ids: list[list[int]] = [[] for _ in streams]
    done = [False] * len(streams)
    for token in tokens:
        for row, t in enumerate(token.tolist()):
            if done[row]:
                continue
            if t in stops:
                done[row] = True
                piece = streams[row].finish()
            else:
                ids[row].append(t)
                piece = streams[row].add(t)
                done[row] = streams[row].stopped
            if piece and on_text:
                on_text(row, piece)
        if all(done):
            break
    for row, stream in enumerate(streams):
        if not done[row]:  # ran out of tokens: release what was held back
            tail = stream.finish()
            if tail and on_text:
                on_text(row, tail)
    return ids


def collect_on_device(tokens, streams: list[TextStream], stops: list[int], device) -> list[list[int]]:
    """The steps' tokens kept on the device (one host sync per 16 steps, for end of sequence), then
    cut at each row's first stop and decoded; returns each row's ids."""
    steps = []
    finished = torch.zeros(len(streams), dtype=torch.bool, device=device)
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    for i, token in enumerate(tokens):
        steps.append(token)
        if stops:
            finished |= torch.isin(token, stop_tensor)
            if i % 16 == 15 and bool(finished.all()):
                break
    ids: list[list[int]] = [[] for _ in streams]
    if steps:
        for row, seq in enumerate(torch.stack(steps, dim=1).tolist()):
            ids[row] = seq[: next((k for k, t in enumerate(seq) if t in stops), len(seq))]
            for t in ids[row]:
                streams[row].add(t)
            streams[row].finish()
    return ids
