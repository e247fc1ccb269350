"""Supervised fine-tuning (--task sft): packed conversations computed as if each were alone,
targets on assistant turns only, 2 processes = 1, a small model that learns its replies.

The models fine-tuned here start from a Hugging Face Llama directory built with transformers'
own classes (random weights, our tokenizer), as a user's would.
"""
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import llm
from llm.model.chat import ChatTemplate
from llm.model.tokenizer import Tokenizer
from llm.train.chat_data import Chats, pack, tokenize_conversations, window_rows
from sample import main as sample_main
from tests.helpers import old_tokenizer, tiny_model
from tests.test_distributed import TORCHRUN, assert_same_weights, losses, run
from train import main as train_main

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "nina",
         "oscar", "peggy", "rupert", "sybil", "trent", "uma", "victor", "walter", "xena", "yara", "zoe", "quinn",
         "liam", "mia", "noah", "olga", "pablo", "rosa", "sam", "tina", "kim"]
WORDS = ["red", "blue", "green", "amber", "violet", "teal", "black", "white", "stone", "river", "cloud", "pine"]


def conversations(n=33, seed=0) -> list[dict]:
    """n questions, each with its own reply (the name, and a word of WORDS drawn at random)."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": f"What is {name}'s sign?"},
                          {"role": "assistant", "content": f"Yes, {name} is {rng.choice(WORDS)}."}]}
            for name in NAMES[:n]]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_llama_dir(path: Path, tokenizer: Tokenizer, **overrides) -> Path:
    """A small Llama directory as transformers writes it, with our tokenizer."""
    settings_ = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings_, **overrides})).save_pretrained(path)
    tokenizer.save(path / "tokenizer.json")
    return path


def chat_text(rows) -> str:
    return " ".join(m["content"] for r in rows for m in r["messages"]) * 20


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """33 conversations as JSONL (with val_fraction=0.01 the first is held out for validation, the
    other 32 train), and a Llama directory whose tokenizer knows their words."""
    base = tmp_path_factory.mktemp("sft")
    rows = conversations()
    tokenizer = Tokenizer.train([chat_text(rows)], vocab_size=300)
    return {"jsonl": write_jsonl(base / "chats.jsonl", rows), "rows": rows,
            "hf": hf_llama_dir(base / "hf", tokenizer), "tokenizer": tokenizer}


def sft_args(chats, cache_dir, out, *extra) -> list[str]:
    return ["--init_from", str(chats["hf"]), "--data", str(chats["jsonl"]), "--task", "sft", "--out_dir", str(out),
            "--cache_dir", str(cache_dir), "--batch_size", "4", "--val_fraction", "0.01", "--dtype", "float32",
            "--attention", "sdpa", "--eval_iters", "1", "--warmup_steps", "2", *extra]


# ---------------------------------------------------------------- packed = each conversation alone

PACKED_CASES = [(b, p) for b in ("naive", "sdpa") for p in ("rope", "learned", "sinusoidal")] + [("triton", "rope")]


@pytest.mark.parametrize("backend,pos_embedding", PACKED_CASES)
def test_packed_conversations_compute_as_if_alone(backend, pos_embedding, seed):
    """Logits and summed loss of conversations packed into rows (with padding) equal each one's alone
    (float64; our kernel, in the interpreter or on a GPU, in float32 against the float64 model on the CPU)."""
    if backend == "triton":
        pytest.importorskip("triton")
        model = tiny_model(seed, attention="triton", dtype=torch.float32, d_model=64, sliding_window=None)
        reference = tiny_model(seed, attention="naive", d_model=64, sliding_window=None)
        reference.load_state_dict({k: v.double().cpu() for k, v in model.state_dict().items()})
    else:
        model = tiny_model(seed, attention=backend, pos_embedding=pos_embedding, sliding_window=None)
        reference = model
    T, V = model.config.block_size, model.config.vocab_size
    rows, docs_of_rows = [], []
    for _ in range(2):
        lengths = torch.randint(1, 17, (4,)).tolist()
        while sum(lengths) > T:
            lengths.pop()
        docs = [torch.randint(0, V, (n,)) for n in lengths]
        rows.append(torch.cat(docs + [torch.zeros(T - sum(lengths), dtype=torch.long)]))
        docs_of_rows.append(docs)
    idx = torch.stack(rows)
    documents = torch.stack([torch.cat([torch.full((len(d),), k) for k, d in enumerate(docs)]
                                       + [torch.full((T - sum(map(len, docs)),), len(docs))])
                             for docs in docs_of_rows])
    targets = torch.randint(0, V, idx.shape)
    device = next(model.parameters()).device
    logits = model(idx.to(device), documents=documents.to(device)).double().cpu()
    loss = model(idx.to(device), targets.to(device), documents=documents.to(device), reduction="sum").double().cpu()
    tol = 1e-10 if model is reference else 1e-4
    expected_loss = 0.0
    for row, docs in enumerate(docs_of_rows):
        at = 0
        for doc in docs:
            alone = reference(doc[None])
            torch.testing.assert_close(logits[row, at : at + len(doc)], alone[0], rtol=tol, atol=tol)
            expected_loss += reference(doc[None], targets[row, at : at + len(doc)][None], reduction="sum")
            at += len(doc)
        padding = T - at
        if padding:
            expected_loss += reference(idx[row, at:][None], targets[row, at:][None], reduction="sum")
    torch.testing.assert_close(loss, expected_loss, rtol=tol, atol=tol)


def test_packed_bounds_are_found_once_per_forward(seed, monkeypatch):
    """The kernel's document bounds (their count depends on the data, so finding them waits for a
    GPU) are found once per forward and shared by the layers, not found again in each."""
    pytest.importorskip("triton")
    import llm.model.attention as attention

    calls = []
    find = attention.document_bounds
    monkeypatch.setattr(attention, "document_bounds", lambda documents: calls.append(1) or find(documents))
    model = tiny_model(seed, attention="triton", dtype=torch.float32, d_model=64, n_layer=3, sliding_window=None)
    device = next(model.parameters()).device
    cut = int(torch.randint(1, 23, ()))
    documents = torch.tensor([[0] * cut + [1] * (24 - cut), [0] * 24], device=device)
    model(torch.randint(0, 97, (2, 24), device=device), documents=documents)
    assert len(calls) == 1


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(2, 40), min_size=1, max_size=30), block_size=st.integers(8, 32),
       packing=st.booleans())
def test_packing_places_every_conversation_once(lengths, block_size, packing):
    tokens = np.arange(sum(lengths)) % 50
    mask = np.ones(sum(lengths), dtype=np.uint8)
    chats = Chats(tokens, mask, np.concatenate([[0], np.cumsum(lengths)]))
    packed = pack(chats, block_size, packing)
    placed = sorted(i for w in packed.windows for i, _ in w)
    assert placed == list(range(len(lengths)))
    assert packed.truncated == sum(n > block_size + 1 for n in lengths) and packed.dropped == 0
    for window in packed.windows:
        assert sum(n - 1 for _, n in window) <= block_size
        assert packing or len(window) == 1
        assert all(n == min(lengths[i], block_size + 1) for i, n in window)
    if packing:  # best fit: no two windows could have shared one
        used = sorted(sum(n - 1 for _, n in w) for w in packed.windows)
        assert len(used) < 2 or used[0] + used[1] > block_size


# ---------------------------------------------------------------- targets and gradients

def grads(model, inputs, targets, documents):
    model.zero_grad()
    model(inputs, targets, documents=documents, reduction="sum").backward()
    return [p.grad.clone() for p in model.parameters()]


def test_masked_targets_carry_no_gradient(chats, seed):
    """Through the pipeline (template, spans, packing): a label under the mask can change without
    changing any gradient; an unmasked one cannot; and the loss is the plain cross-entropy of the
    assistant tokens alone (a float64 reference from the full logits)."""
    tokenizer, template = chats["tokenizer"], ChatTemplate.default()
    conversation = [{"role": "system", "content": "Be brief."}] + chats["rows"][0]["messages"] * 2
    ids, mask = tokenize_conversations([conversation], tokenizer, template, last_only=False)[0]
    chat = Chats(np.asarray(ids), mask.astype(np.uint8), np.array([0, len(ids)]))
    model = tiny_model(seed, vocab_size=tokenizer.vocab_size, block_size=len(ids)).train()
    window = [[(0, len(ids))]]
    inputs, targets, docs = (torch.from_numpy(a) for a in window_rows(chat, window, len(ids) - 1, 0, True))
    reference = grads(model, inputs, targets, docs)
    logits = model(inputs, documents=docs)[0]
    counted = torch.from_numpy(mask[1:])
    expected = F.cross_entropy(logits[counted], torch.tensor(ids[1:])[counted], reduction="sum")
    torch.testing.assert_close(model(inputs, targets, documents=docs, reduction="sum"), expected)
    assert 0 < counted.sum() < len(counted)
    for position, masked in ((int(np.flatnonzero(mask == 0)[-1]), True), (int(np.flatnonzero(mask)[0]), False)):
        perturbed = np.array(ids)
        perturbed[position] = (perturbed[position] + 1) % tokenizer.vocab_size
        labels = Chats(perturbed, chat.mask, chat.starts)
        _, new_targets, _ = window_rows(labels, window, len(ids) - 1, 0, True)  # inputs stay as they were
        new = grads(model, inputs, torch.from_numpy(new_targets), docs)
        same = all(torch.equal(a, b) for a, b in zip(reference, new))
        assert same == masked, position


# ---------------------------------------------------------------- end to end

def chat_replies(run_dir, prompts, capsys) -> list[str]:
    argv = ["--ckpt", str(run_dir), "--chat", "--temperature", "0", "--max_new_tokens", "24"]
    for p in prompts:
        argv += ["--prompt", p]
    capsys.readouterr()
    assert sample_main(argv) == 0
    out = capsys.readouterr().out
    return [r.strip("\n") for r in out.split("-" * 40)[: len(prompts)]]


@pytest.fixture(scope="module")
def finetuned(chats, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetuned") / "run"
    assert train_main(sft_args(chats, cache_dir, out, "--max_steps", "400", "--lr", "1e-2", "--eval_interval", "400",
                               "--batch_size", "8", "--weight_decay", "0", "--min_lr_ratio", "0.5")) == 0
    return out


def test_a_small_model_learns_its_replies(finetuned, chats, capsys):
    """Fine-tuned on 32 conversations, it answers >= 90% of their questions with the trained reply
    (greedy, sample.py --chat), stopping at the end of its turn."""
    rows = chats["rows"][1:]  # the 32 it trained on
    replies = chat_replies(finetuned, [r["messages"][0]["content"] for r in rows], capsys)
    right = sum(reply == r["messages"][1]["content"] for reply, r in zip(replies, rows))
    print(f"{right}/{len(rows)} replies as trained")
    assert right >= 0.9 * len(rows), list(zip(replies, [r["messages"][1]["content"] for r in rows]))
    assert (llm.formats.run_dir.latest(finetuned) / "chat_template.jinja").exists()


def test_export_carries_the_template(finetuned, chats, tmp_path, capsys):
    """transformers, from the export alone, renders the prompt and generates the same reply."""
    from llm.export import main as export_main

    assert export_main(["--ckpt", str(finetuned), "--out", str(tmp_path / "hf")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    question = chats["rows"][3]["messages"][0]["content"]
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].size(1):]
    assert out[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>")  # stopped at the end of the turn
    assert tokenizer.decode(out[:-1]) == chat_replies(finetuned, [question], capsys)[0]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_processes_fine_tune_like_one(chats, cache_dir, tmp_path, lora):
    """FSDP2 on 2 processes = 1 process with 2 accumulation steps, on masked, packed data."""
    extra = ["--max_steps", "3", "--log_interval", "1", "--eval_interval", "3", "--lr", "1e-2"]
    extra += ["--lora_rank", "4", "--lora_dropout", "0"] if lora else []
    common = ["train.py", *sft_args(chats, cache_dir, tmp_path / "x", *extra)]
    two, one = tmp_path / "two", tmp_path / "one"
    run(TORCHRUN + common + ["--out_dir", str(two), "--grad_accum", "1"])
    run([sys.executable] + common + ["--out_dir", str(one), "--grad_accum", "2"])
    a, b = losses(two), losses(one)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step
    assert_same_weights(two, one)


# ---------------------------------------------------------------- data and templates of older runs

def test_an_older_model_gets_the_chat_markers(chats, cache_dir, tmp_path, capsys):
    tokenizer = old_tokenizer(chat_text(chats["rows"]))
    source = hf_llama_dir(tmp_path / "old", tokenizer)
    assert tokenizer.hf.token_to_id("<|im_end|>") is None
    out = tmp_path / "run"
    argv = sft_args({**chats, "hf": source}, cache_dir, out, "--max_steps", "1", "--lr", "1e-12", "--eval_interval", "1")
    assert train_main(argv) == 0
    printed = capsys.readouterr().out
    V = tokenizer.vocab_size
    assert f"<|im_start|> = {V}, <|im_end|> = {V + 1}" in printed and f"grows to {V + 2}" in printed
    embedding = load_file(out / "model.safetensors")["tok_embeddings.weight"]
    original = load_file(source / "model.safetensors")["model.embed_tokens.weight"]
    assert embedding.shape == (V + 2, original.size(1))
    torch.testing.assert_close(embedding[:V], original, rtol=0, atol=1e-9)
    torch.testing.assert_close(embedding[V:], original.mean(0).expand(2, -1), rtol=0, atol=1e-9)
    _, loaded = llm.load(out)
    assert loaded.special_ids["<|im_end|>"] == V + 1


BAD_ROWS = {
    "no_messages": ({"text": "hi"}, "row 2: a row needs 'messages', or 'prompt' and 'completion'"),
    "bad_role": ({"messages": [{"role": "robot", "content": "x"}]}, "row 2: message 0 needs a role"),
    "no_assistant": ({"messages": [{"role": "user", "content": "x"}]}, "row 2: no assistant message"),
    "assistant_first": ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
                        "row 2: the conversation starts with an assistant message"),
    "mixed_prompt": ({"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]},
                     "row 2: prompt and completion must both be text"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_malformed_row_is_one_line_naming_it(chats, cache_dir, tmp_path, capsys, case):
    row, message = BAD_ROWS[case]
    data = write_jsonl(tmp_path / "bad.jsonl", [chats["rows"][0], row, chats["rows"][1]])
    with pytest.raises(SystemExit) as e:
        train_main(sft_args({**chats, "jsonl": data}, cache_dir, tmp_path / "o", "--max_steps", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and err.count("error") == 1
    assert err.splitlines()[-1].startswith(f"error: {data}: {message}")


def test_prompt_completion_rows_and_plain_text(chats, cache_dir, tmp_path, capsys):
    rows = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]} for r in chats["rows"]]
    rows[5]["prompt"] = "What is it? " * 40  # longer than block_size: truncated, its reply cut off: dropped
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    assert train_main(sft_args({**chats, "jsonl": data}, cache_dir, tmp_path / "o", "--max_steps", "1",
                               "--packing", "false")) == 0
    printed = capsys.readouterr().out
    assert "32 training conversations, one per row" in printed
    assert "1 longer than block_size+1 = 65 tokens truncated to it, 1 of them dropped (no target left)" in printed
    (tmp_path / "notes.txt").write_text("plain text")
    with pytest.raises(SystemExit):
        train_main(sft_args({**chats, "jsonl": tmp_path / "notes.txt"}, cache_dir, tmp_path / "p", "--max_steps", "1"))
    assert "reads conversations from .jsonl, .json or .parquet" in capsys.readouterr().err


def test_gguf_export_carries_the_template_and_its_end_of_turn(finetuned, chats, tmp_path, capsys):
    """The GGUF file holds the run's template and <|im_end|> as end of turn; llama.cpp (not in CI),
    from the file alone, renders the chat and answers as sample.py --chat does."""
    import gguf

    from llm.export import main as export_main
    from llm.formats.load import chat_template

    path = tmp_path / "chat.gguf"
    assert export_main(["--ckpt", str(finetuned), "--out", str(path)]) == 0
    reader = gguf.GGUFReader(path)
    template = reader.fields["tokenizer.chat_template"]
    assert template.contents() == chat_template(finetuned).source
    tokenizer = llm.formats.load.load_tokenizer(finetuned)
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == tokenizer.special_ids["<|im_end|>"]
    llama_cpp = pytest.importorskip("llama_cpp")
    question = chats["rows"][5]["messages"][0]["content"]
    lm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False, n_threads=1)
    try:
        reply = lm.create_chat_completion([{"role": "user", "content": question}], temperature=0, max_tokens=24)
    finally:
        lm.close()
    assert reply["choices"][0]["message"]["content"] == chat_replies(finetuned, [question], capsys)[0]
