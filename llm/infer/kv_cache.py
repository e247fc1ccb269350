"""A static KV cache: preallocated once per generation, written in place."""
import torch


class KVCache:
    """Per layer, keys and values of shape (batch, n_kv_head, max_len, head_dim).

    Stored at grouped-query width: query heads sharing a KV head read the same
    entries. `pos` is the next slot to write, the same for every row (rows of
    different lengths are left-padded). It is a tensor on the cache's device, advanced
    in place by the model, and readers always get the whole buffers (attention masks
    the slots not yet written): a decode step has the same shapes and inputs from the
    first token to the last, so it compiles once and can be replayed as a CUDA graph.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        if max_len > config.block_size:
            raise ValueError(f"a KV cache of {max_len} positions exceeds block_size={config.block_size}")
        # One tensor per layer, not views of one: torch.compile then writes each in place.
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.pos = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
        """Write new (B, Hkv, T, D) entries at slots (T,); return the layer's whole (B, Hkv, max_len, D) buffers."""
        self.k[layer][:, :, slots] = k
        self.v[layer][:, :, slots] = v
        return self.k[layer], self.v[layer]
