"""LoRA: the adapted layer is the base plus a low-rank update; fine-tuning leaves the base weights
bit-identical and out of the optimizer; the merged model.safetensors computes what the base with
its adapters computes; resuming is bit-exact."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import llm
from llm.config import TrainConfig
from llm.formats.hf import from_hf
from llm.formats.run_dir import latest
from llm.model.lora import ADAPTER_FILE, LoRALinear, add_lora, is_adapter, merged
from tests.helpers import tiny_model
from tests.test_sft import chats, sft_args  # noqa: F401 (a fixture)
from train import main as train_main


def test_lora_linear_is_the_base_plus_a_low_rank_update(seed):
    base = nn.Linear(12, 20, dtype=torch.float64)
    layer = LoRALinear(base, rank=3, alpha=6.0, dropout=0.0)
    assert layer.weight is base.weight and not layer.weight.requires_grad and layer.lora_a.requires_grad
    one = torch.ones(1, 12, dtype=torch.float64)
    assert torch.equal(layer(one), base(one))  # B starts at zero
    nn.init.normal_(layer.lora_b)
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_a.T) @ layer.lora_b.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    weights = merged({f"m.{k}": v for k, v in layer.state_dict().items()}, scale=2.0)
    assert sorted(weights) == ["m.bias", "m.weight"]
    torch.testing.assert_close(F.linear(x, weights["m.weight"], weights["m.bias"]), expected, rtol=1e-12, atol=1e-12)


def test_add_lora_adapts_the_targets_and_freezes_the_rest(seed):
    model = add_lora(tiny_model(seed), TrainConfig(lora_rank=2, lora_targets="wqkv,w2"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"layers.{i}.{m}.lora_{ab}" for i in range(2) for m in ("attention.wqkv", "feed_forward.w2")
                               for ab in "ab")
    assert [n for n in model.state_dict() if not is_adapter(n)] == list(tiny_model(seed).state_dict())  # names kept


def training_state(ckpt, tmp_path) -> dict:
    dcp_to_torch_save(ckpt / "state", tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=False)


LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0.1", "--lr", "1e-2", "--eval_interval", "100"]


def test_lora_fine_tuning(chats, cache_dir, tmp_path):  # noqa: F811
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_main(sft_args(chats, cache_dir, full, "--max_steps", "6", *LORA)) == 0
    assert train_main(sft_args(chats, cache_dir, split, "--max_steps", "3", "--decay_steps", "6", *LORA)) == 0
    assert train_main(["--out_dir", str(split), "--resume", "--max_steps", "6", "--decay_steps", "6"]) == 0
    ckpt = latest(full)

    # resumed = uninterrupted, bit for bit: the merged weights, the adapters
    for name in ("model.safetensors", ADAPTER_FILE):
        a, b = load_file(ckpt / name), load_file(latest(split) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # the base weights are bit-identical to the source's, and only the adapters have optimizer state
    state = training_state(ckpt, tmp_path)
    source = load_file(chats["hf"] / "model.safetensors")
    base_names = [n for n in state["model"] if not is_adapter(n)]
    for name, tensor in from_hf(source, base_names).items():
        assert torch.equal(state["model"][name], tensor), name
    assert state["optim"]["state"] and all(is_adapter(n) for n in state["optim"]["state"])
    adapters = load_file(ckpt / ADAPTER_FILE)
    assert len(adapters) == 2 * 5 * 2 and any(t.abs().sum() > 0 for n, t in adapters.items() if n.endswith("lora_b"))

    # model.safetensors is a plain model that computes what the base with its adapters computes
    merged_model, _ = llm.load(full, dtype=torch.float64)
    unmerged, _ = llm.load(chats["hf"], dtype=torch.float64)
    add_lora(unmerged, TrainConfig(lora_rank=4, lora_alpha=8.0)).eval()
    unmerged.load_state_dict({**unmerged.state_dict(), **{k: v.double() for k, v in adapters.items()}})
    ids = torch.randint(0, merged_model.config.vocab_size, (2, 40))
    with torch.no_grad():  # (the merged weights were rounded to float32 once)
        torch.testing.assert_close(merged_model(ids), unmerged(ids), rtol=1e-5, atol=1e-6)
        base = llm.load(chats["hf"], dtype=torch.float64)[0]
        assert (merged_model(ids) - base(ids)).abs().max() > 1e-3  # the adapters did train
