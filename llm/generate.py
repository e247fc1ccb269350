"""Sampling: prompts in, tokens or text out, with a static KV cache.

`generate` is the token-level loop: one forward pass over the prompts (prefill),
then one token per step reading the cache. `complete` wraps it with text: encode,
stop at <|endoftext|> and at stop strings, stream characters as they complete.

Prompts of different lengths are left-padded: row b's first kv_start[b] slots are
padding, masked out of attention, and its positions count from its first real
token, so each row is computed exactly as if it were generated alone.
"""
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llm.kv_cache import KVCache


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


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             generator: torch.Generator | None = None, use_cache: bool = True, pad_id: int = 0,
             decode_step: Callable | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, (B,) on the model's device, max_new_tokens times.

    Stopping early is the caller's choice (stop iterating). use_cache=False recomputes
    the whole sequence every step: slow, and the reference the cache must equal.
    decode_step: a replacement for `model` in the one-token steps (e.g. a compiled model).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    ids, kv_start = left_pad(prompts, pad_id, device)
    width = ids.size(1)
    total = width + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(f"prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds the context of {model.config.block_size} tokens")
    positions = torch.arange(width, device=device).expand(len(prompts), width)
    if kv_start is not None:
        positions = (positions - kv_start[:, None]).clamp(min=0)
    cache = KVCache(model.config, len(prompts), total, device, next(model.parameters()).dtype) if use_cache else None
    logits = model(ids, positions=positions, kv_start=kv_start, cache=cache, last_only=True)[:, -1]
    position = positions[:, -1:].clone()  # (B, 1), advanced in place
    step = model if decode_step is None else decode_step
    for i in range(max_new_tokens):
        token = sample(logits, sampling, generator)
        yield token
        if i == max_new_tokens - 1:
            return
        position += 1
        if use_cache:
            logits = step(token[:, None], positions=position, kv_start=kv_start, cache=cache, last_only=True)[:, -1]
        else:
            ids = torch.cat([ids, token[:, None]], dim=1)
            positions = torch.cat([positions, position], dim=1)
            logits = model(ids, positions=positions, kv_start=kv_start, last_only=True)[:, -1]


class TextStream:
    """Turns one row's tokens into text pieces that never split a character or reveal a stop string.

    Byte-level tokens can end inside a multi-byte UTF-8 character; such tokens are held
    until the character completes. Text that could be the start of a stop string is
    held until it is clearly not one; a stop string ends the text where it begins.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.pending: list[int] = []  # tokens whose text is not yet whole characters
        self.text = ""  # the text so far; text[:emitted] has been handed out
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Add a token; return the text that became safe to show."""
        if self.stopped:
            return ""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        # An incomplete character decodes as U+FFFD; at most 3 more bytes (tokens) complete it.
        if piece.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        self.text += piece
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended: return everything still held back."""
        if self.pending and not self.stopped:
            self.text += self.tokenizer.decode(self.pending)
            self.pending = []
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


@torch.inference_mode()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int, sampling: Sampling = Sampling(),
             seed: int | None = None, stop: tuple[str, ...] = (), on_text: Callable[[int, str], None] | None = None,
             use_cache: bool = True, truncate: bool = False, decode_step: Callable | None = None) -> list[dict]:
    """Complete each prompt; returns per row {"prompt_ids", "ids", "text"}.

    Generation of a row ends at <|endoftext|>, at a stop string (excluded from the
    text) or after max_new_tokens. on_text(row, piece) receives text as it is made.
    An empty prompt starts from <|endoftext|>. truncate: drop a too-long prompt's
    left side instead of failing.
    """
    device = next(model.parameters()).device
    eot = tokenizer.eot_id
    prompt_ids = [tokenizer.encode(p) or [eot] for p in prompts]
    room = model.config.block_size - max_new_tokens
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if truncate:
        if room < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {model.config.block_size}")
        prompt_ids = [p[-room:] for p in prompt_ids]
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    ids: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    # Host-side work each step only when text is needed now (streaming or stop strings);
    # otherwise tokens stay on the device and end-of-text is checked every 16 steps.
    per_step = on_text is not None or bool(stop)
    steps = []
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens = generate(model, prompt_ids, max_new_tokens, sampling, generator, use_cache, eot, decode_step) if max_new_tokens else iter(())
    for i, token in enumerate(tokens):
        if not per_step:
            steps.append(token)
            finished |= token == eot
            if i % 16 == 15 and bool(finished.all()):
                break
            continue
        for row, t in enumerate(token.tolist()):
            if done[row]:
                continue
            if t == eot:
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
    if steps:
        for row, seq in enumerate(torch.stack(steps, dim=1).tolist()):
            ids[row] = seq[: seq.index(eot)] if eot in seq else seq
    results = []
    for row, stream in enumerate(streams):
        if per_step and not done[row]:  # ran out of tokens: release what was held back
            tail = stream.finish()
            if tail and on_text:
                on_text(row, tail)
        text = stream.text if per_step else tokenizer.decode(ids[row])
        results.append({"prompt_ids": prompt_ids[row], "ids": ids[row], "text": text})
    return results
