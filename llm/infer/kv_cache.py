"""A static KV cache: preallocated once, written in place, one position per row."""
import torch


class KVCache:
    """Per layer, keys and values of shape (batch, n_kv_head, max_len, head_dim).

    Stored at grouped-query width: query heads sharing a KV head read the same entries.
    `pos` (batch,) is each row's next slot to write: rows advance together in a generation
    (prompts of different lengths are left-padded), or each on its own in a server whose rows
    are requests that come and go (`reset_row`). It is a tensor on the cache's device, advanced in
    place by the model, and readers get the whole buffers (attention masks the slots after each
    query's): a decode step has the same shapes and inputs from the first token to the last, so it
    compiles once and can be replayed as a CUDA graph. (An eager step may read less: `first`.)
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        if max_len > config.block_size:
            raise ValueError(f"a KV cache of {max_len} positions exceeds block_size={config.block_size}")
        # One tensor per layer, not views of one: torch.compile then writes each in place.
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rows = torch.arange(batch_size, device=device)[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
        """Write new (B, Hkv, T, D) entries at each row's slots (B, T); return the layer's whole
        (B, Hkv, max_len, D) buffers."""
        self.k[layer][self.rows, :, slots] = k.transpose(1, 2)
        self.v[layer][self.rows, :, slots] = v.transpose(1, 2)
        return self.k[layer], self.v[layer]

    def reset_row(self, b: int) -> "KVCache":
        """Row b emptied (its position back to 0) and returned alone, as a cache of batch 1 that
        writes into this one (views, not copies): a new request is prefilled into its row while
        the other rows keep their state. What the row held before is masked, never read."""
        self.pos[b] = 0
        return self.view([t[b : b + 1] for t in self.k], [t[b : b + 1] for t in self.v], self.max_len,
                         self.pos[b : b + 1], self.rows[:1])

    def first(self, length: int) -> "KVCache":
        """The first `length` positions of every row, as a cache that reads and writes this one's
        buffers (views): for a step whose rows all stand before `length`, attention then reads only
        those positions (the ones after each row's are masked anyway)."""
        return self.view([t[:, :, :length] for t in self.k], [t[:, :, :length] for t in self.v], length,
                         self.pos, self.rows)

    @staticmethod
    def view(k: list, v: list, max_len: int, pos: torch.Tensor, rows: torch.Tensor) -> "KVCache":
        """A cache over given views of another's buffers (nothing allocated)."""
        cache = object.__new__(KVCache)
        cache.k, cache.v, cache.max_len, cache.pos, cache.rows = k, v, max_len, pos, rows
        return cache
