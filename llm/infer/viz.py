"""Attention heatmaps: what one head attends to over a prompt and its completion."""
import os
from pathlib import Path

import torch

from llm.errors import UserError


def check_layer_and_head(config, layer: int, head: int):
    if not -config.n_layer <= layer < config.n_layer or not -config.n_head <= head < config.n_head:
        raise UserError(f"the model has {config.n_layer} layers and {config.n_head} heads; got layer {layer}, head {head}")


@torch.no_grad()
def attention_map(model, ids: list[int], layer: int, head: int) -> torch.Tensor:
    """(T, T) attention probabilities of one head (rows: queries, columns: keys)."""
    check_layer_and_head(model.config, layer, head)
    maps = []
    model(torch.tensor([ids], device=next(model.parameters()).device), attn_maps=maps, last_only=True)
    return maps[layer][0, head].float().cpu()


def save_attention_map(model, tokenizer, ids: list[int], layer: int, head: int, path, max_tokens: int = 64):
    """Write a heatmap PNG of the last max_tokens tokens, both axes labelled with the tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = attention_map(model, ids, layer, head)[-max_tokens:, -max_tokens:]
    labels = [repr(t)[1:-1].replace(" ", "␣") or "∅" for t in tokenizer.token_strings(ids[-max_tokens:])]
    n = len(labels)
    size = max(4.0, 0.18 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    image = ax.imshow(probs.numpy(), cmap="viridis", vmin=0.0)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7, family="monospace")
    ax.set_yticks(range(n), labels, fontsize=7, family="monospace")
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(f"layer {layer % model.config.n_layer}, head {head % model.config.n_head}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix or '.png'}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return probs
