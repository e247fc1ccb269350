"""The model on a static batch: one KV cache of `slots` rows, prefill into a row, one step for all.

Every decode step runs all the rows, busy or idle, so its shapes never change: it compiles once
and, on CUDA, replays as one CUDA graph for the server's whole life. A row's arithmetic then
never depends on what the other rows hold, so a request gives the same tokens alone or among
others (int8 at one row compiled is the exception: llm/infer/quantize.py). A new request is
prefilled alone into its row (KVCache.reset_row) while the others keep their state. An idle
row computes a token it never uses; its position goes back to 0 after each step, so it never
runs past the cache.

An eager step (no --compile) reads only the first positions of the cache that the row furthest
along needs, rounded up to a power-of-two fraction of the context (1/16 at least): with short
requests most of a whole-context cache is masked slots, which attention would read for nothing.
The other rows' positions then decide how many masked slots a row's attention skips, not what it
attends to. A compiled step reads the whole cache, its shapes never changing.
"""
import torch

from llm.infer.generate import CompiledStep, decode_one
from llm.infer.kv_cache import KVCache


class ModelRunner:
    def __init__(self, model, slots: int, compile_backend: str | None = None):
        weight = next(model.parameters())
        self.model, self.device = model, weight.device
        self.cache = KVCache(model.config, slots, model.config.block_size, weight.device, weight.dtype)
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=weight.device)
        self.idle = torch.ones(slots, dtype=torch.bool, device=weight.device)
        self.step = CompiledStep(compile_backend) if compile_backend else decode_one
        self.windows = {} if compile_backend is None else None  # length -> the cache's first positions

    def prefill(self, slot: int, ids: list[int], every_position: bool = False) -> torch.Tensor:
        """Row `slot` emptied and filled with a prompt -> the logits after its last token (1, vocab),
        or after each of its tokens (T, vocab) with every_position."""
        self.idle[slot] = False
        prompt = torch.tensor([ids], device=self.device)
        return self.model(prompt, cache=self.cache.reset_row(slot), last_only=not every_position)[0]

    def release(self, slot: int):
        self.idle[slot] = True

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One token per row (any id for an idle row) -> the next logits of every row (slots, vocab)."""
        self.tokens.copy_(torch.tensor(tokens)[:, None])
        logits = self.step(self.model, self.tokens, None, self.window())
        self.cache.pos.masked_fill_(self.idle, 0)
        return logits

    def window(self) -> KVCache:
        """What this step reads of the cache: all of it when compiled, else the shortest
        power-of-two fraction of it (down to 1/16) that holds every row's next position."""
        if self.windows is None:
            return self.cache
        # a host read, as the engine's of each step's tokens; a row released since the last step
        # still writes once, so idle rows count too
        needed = int(self.cache.pos.max()) + 1
        length = self.cache.max_len
        while length % 2 == 0 and length // 2 >= max(needed, self.cache.max_len // 16):
            length //= 2
        if length not in self.windows:
            self.windows[length] = self.cache if length == self.cache.max_len else self.cache.first(length)
        return self.windows[length]

    def warm_up(self):
        """Run the step on idle rows (compiling it, and on CUDA capturing its graph) before serving."""
        for _ in range(2):
            self.decode([0] * self.tokens.size(0))
