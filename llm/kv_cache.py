"""A static KV cache: preallocated once per generation, written in place."""
import torch


class KVCache:
    """Per layer, keys and values of shape (batch, n_kv_head, max_len, head_dim).

    Stored at grouped-query width: query heads sharing a KV head read the same
    entries. `length` is how many slots are filled, the same for every row (rows
    of different lengths are left-padded).
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write new (B, Hkv, T, D) entries after the filled part; return views of everything so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} needed")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int):
        """Called by the model once every layer has written its n new positions."""
        self.length += n
