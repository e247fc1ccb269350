"""Small builders shared by the tests."""
import itertools
import os

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm.config import ModelConfig
from llm.model.tokenizer import EOT, Tokenizer
from llm.model.transformer import Transformer

OPTIONS = {
    "norm": ("rmsnorm", "layernorm"),
    "norm_position": ("pre", "post"),
    "ffn": ("swiglu", "gelu"),
    "pos_embedding": ("rope", "learned", "sinusoidal"),
}


def option_grid():
    """Every combination of the architecture switches, cycling GQA/MQA/MHA, biases, tying and a sliding
    window across them."""
    for i, values in enumerate(itertools.product(*OPTIONS.values())):
        yield {
            **dict(zip(OPTIONS, values)),
            "n_kv_head": (4, 2, 1)[i % 3],
            "bias": i % 2 == 1,
            "tie_embeddings": i % 4 < 2,
            "sliding_window": (None, 7, None, None, 4)[i % 5],
        }


def grid_id(options: dict) -> str:
    return "-".join(f"{k}={int(v)}" if isinstance(v, bool) else f"window={v}" if k == "sliding_window" else f"{v}"
                    for k, v in options.items() if v is not None)


# Where our Triton kernel runs: compiled on a GPU, else on the CPU in Triton's interpreter (conftest.py
# chooses, once per process; the interpreter cannot run beside compiled kernels).
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny_model(seed=0, dtype=torch.float64, attention="sdpa", dropout=0.0, device=None, **overrides) -> Transformer:
    """A small model; one with attention="triton" is on KERNEL_DEVICE unless a device is given."""
    settings = dict(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_kv_head=2, d_model=32)
    settings.update(overrides)
    torch.manual_seed(seed)
    device = device or (KERNEL_DEVICE if attention == "triton" else "cpu")
    return Transformer(ModelConfig(**settings), attention, dropout).to(device, dtype).eval()



def fresh_seed() -> int:
    """Seed torch with a fresh random seed, printed so that a failure can be replayed: TEST_SEED=<seed>
    in the environment gives every test that seed instead."""
    value = int(os.environ.get("TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed = {value} (TEST_SEED={value} replays it)")
    torch.manual_seed(value)
    return value


def old_tokenizer(text: str) -> Tokenizer:
    """A tokenizer trained as before the chat markers were reserved: <|endoftext|> only."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(hf)
