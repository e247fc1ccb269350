"""The server (python -m llm.serve) against the official `openai` client, on a live process on
127.0.0.1: its text equals complete()'s (as sample.py prints it) for the same prompt and seed,
streamed piece for piece; concurrent requests equal each alone; a client that disconnects frees
its slot; bad requests get OpenAI's error bodies; SIGTERM lets requests in flight finish and
exits 0. The engine alone (no HTTP): idle rows never run past the cache, and the compiled step
compiles once while requests come and go."""
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

import llm
from llm.bench.serve import launch_server
from llm.infer.generate import Sampling, TextStream, complete, generate
from llm.infer.quantize import for_decoding
from llm.model.chat import ChatTemplate
from llm.model.tokenizer import Tokenizer
from llm.serve.api import chat_stops
from llm.serve.engine import Engine
from llm.serve.runner import ModelRunner
from llm.serve.sequence import Sequence
from tests.helpers import fresh_seed, old_tokenizer, tiny_model

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
TEXT = "def greet(name):\n    return f'héllo {name} 🐍 你好'\n\nclass Box:\n    pass\n" * 10
SLOTS, QUEUE, CONTEXT = 4, 4, 512
PROMPTS = ["def greet", "class Box:\n", "héllo 🐍", "", "    return f'", "x" * 40, "你好", "pass\n\n"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint folder as train.py writes one: random weights, a tokenizer trained on a little
    text with multi-byte characters (so tokens split characters and streaming must hold them)."""
    path = tmp_path_factory.mktemp("ckpt")
    tokenizer = Tokenizer.train([TEXT], vocab_size=300)
    model = tiny_model(fresh_seed(), dtype=torch.float32, vocab_size=tokenizer.vocab_size, block_size=CONTEXT,
                       tie_embeddings=False)
    save_file(model.state_dict(), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(model.config.__dict__))
    tokenizer.save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint as sample.py prepares it, for complete()."""
    model, tokenizer = llm.load(checkpoint)
    return for_decoding(model), tokenizer


def start_server(checkpoint: Path, log: Path, *args) -> tuple[subprocess.Popen, str]:
    """python -m llm.serve on a free port; returns the process and its base URL once it answers."""
    return launch_server(checkpoint, log, ["--max_batch", str(SLOTS), "--max_queue", str(QUEUE), *args], timeout=120)


def stop_server(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "log"
    proc, url = start_server(checkpoint, log)
    yield url
    stop_server(proc)
    print(log.read_text())


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def expected(reference, prompt: str, max_tokens: int, temperature=0.0, seed=None, stop=()) -> tuple[str, list[str]]:
    """complete()'s text for one prompt (as sample.py prints it) and the pieces it streams."""
    model, tokenizer = reference
    pieces = []
    result = complete(model, tokenizer, [prompt], max_tokens, Sampling(temperature, None, None), seed=seed,
                      stop=tuple(stop), on_text=lambda row, piece: pieces.append(piece))
    return result[0]["text"], pieces


def test_completions_equal_sample_output(client, reference):
    """Greedy and seeded sampling, streamed and not, with a stop string: the text complete() makes,
    streamed in the same pieces; usage counts the prompt's tokens and the generated ones."""
    model, tokenizer = reference
    for prompt in PROMPTS[:4]:
        text, pieces = expected(reference, prompt, 40)
        response = client.completions.create(model="m", prompt=prompt, max_tokens=40, temperature=0)
        assert response.choices[0].text == text
        assert response.usage.prompt_tokens == len(tokenizer.encode(prompt) or [tokenizer.eot_id])
        stream = client.completions.create(model="m", prompt=prompt, max_tokens=40, temperature=0, stream=True)
        assert [c.choices[0].text for c in stream if c.choices[0].text] == pieces
    greedy, _ = expected(reference, PROMPTS[0], 40)
    stop = greedy[len(greedy) // 2:][:2] or "e"
    text, pieces = expected(reference, PROMPTS[0], 40, stop=[stop])
    response = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=stop)
    assert response.choices[0].text == text and stop not in text and response.choices[0].finish_reason == "stop"
    text, pieces = expected(reference, PROMPTS[1], 30, temperature=0.9, seed=1234)
    stream = client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=30, temperature=0.9, seed=1234,
                                       top_p=1.0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert [c.choices[0].text for c in chunks if c.choices and c.choices[0].text] == pieces
    assert chunks[-1].usage.completion_tokens == len(sampled_ids(reference, PROMPTS[1], 30, 0.9, 1234))


def test_choices_sample_with_their_own_seeds(client, reference):
    """Prompts x n choices: choice i * n + j of prompt i samples with seed + j, as complete() does alone."""
    prompts = PROMPTS[1:3]
    response = client.completions.create(model="m", prompt=prompts, n=2, max_tokens=12, temperature=1.0, seed=77)
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert texts == [expected(reference, p, 12, temperature=1.0, seed=77 + j)[0] for p in prompts for j in range(2)]


def sampled_ids(reference, prompt, max_tokens, temperature, seed) -> list[int]:
    """The tokens sampled (an end-of-sequence token included, as usage counts it)."""
    model, tokenizer = reference
    ids = complete(model, tokenizer, [prompt], max_tokens, Sampling(temperature), seed=seed)[0]["ids"]
    return ids + [tokenizer.eot_id] * (len(ids) < max_tokens)


def test_chat_equals_the_template_completed(client, reference):
    """Chat renders the default template (ChatML, our runs) and completes it, stopping at its
    end-of-turn marker (a string here: this tokenizer has no such token)."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 🐍"}]
    prompt = ChatTemplate.default().render(messages, add_generation_prompt=True)
    text, pieces = expected(reference, prompt, 32, stop=["<|im_end|>"])
    response = client.chat.completions.create(model="m", messages=messages, max_tokens=32, temperature=0)
    assert response.choices[0].message.content == text and response.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=32, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content] == pieces
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_turn_ends_at_the_end_of_turn_token_or_text():
    """ChatML's end of turn stops chat as a token where the tokenizer has it, and as text always."""
    tokenizer = old_tokenizer(TEXT)  # trained before <|im_end|> was reserved
    template = ChatTemplate.default()
    assert chat_stops(tokenizer, template) == ({tokenizer.eot_id}, ("<|im_end|>",))
    tokenizer.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    ids, texts = chat_stops(tokenizer, template)
    assert ids == {tokenizer.eot_id, tokenizer.hf.token_to_id("<|im_end|>")} and texts == ("<|im_end|>",)
    assert chat_stops(tokenizer, ChatTemplate("{{ messages[0]['content'] }}")) == (ids, ())


def test_prompt_logprobs_equal_a_float64_forward_pass(client, checkpoint):
    """echo + logprobs, as lm-evaluation-harness's local-completions sends it (token prompts in a
    batch, max_tokens 1; and max_tokens 0): each prompt token's log-probability given those before."""
    model, tokenizer = llm.load(checkpoint, dtype=torch.float64)
    prompts = [torch.randint(0, tokenizer.vocab_size, (n,)).tolist() for n in (7, 19, 2)]
    for max_tokens in (1, 0):
        response = client.completions.create(model="m", prompt=prompts, max_tokens=max_tokens, temperature=0,
                                             logprobs=1, echo=True, seed=1234)
        for prompt, choice in zip(prompts, sorted(response.choices, key=lambda c: c.index)):
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([prompt]))[0], dim=-1)
            want = logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
            got = choice.logprobs.token_logprobs
            assert len(got) == len(prompt) + max_tokens and got[0] is None
            torch.testing.assert_close(torch.tensor(got[1:len(prompt)], dtype=torch.float64), want, rtol=0, atol=1e-4)
            greedy = [max(top.values()) == lp for lp, top in zip(got[1:], choice.logprobs.top_logprobs[1:])]
            assert greedy[:len(prompt) - 1] == (logprobs[:-1].argmax(-1) == torch.tensor(prompt[1:])).tolist()
            assert choice.text.startswith(tokenizer.decode(prompt))


def test_concurrent_streams_equal_each_alone(server):
    """8 streamed requests at once (4 slots: half wait and join as others finish), of different
    prompts and lengths: each streams exactly the pieces it streams alone."""
    requests = [dict(prompt=p, max_tokens=20 + 13 * i, temperature=0 if i % 2 else 0.7, seed=i)
                for i, p in enumerate(PROMPTS)]
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)

    async def run(request):
        stream = await client.completions.create(model="m", stream=True, **request)
        return [c.choices[0].text async for c in stream if c.choices[0].text]

    async def alone_then_together():
        alone = [await run(r) for r in requests]
        together = await asyncio.gather(*(run(r) for r in requests))
        return alone, together

    alone, together = asyncio.run(alone_then_together())
    assert together == alone


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def wait_for(condition, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_disconnect_frees_the_slot(server, client):
    """A client that goes away mid-stream cancels its sequence; then all 4 slots run at once: 4 long
    requests each get their first token before any of them ends."""
    cancelled = health(server)["finished"].get("cancelled", 0)
    stream = client.completions.create(model="m", prompt="def", max_tokens=CONTEXT - 8, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    wait_for(lambda: health(server)["finished"].get("cancelled", 0) == cancelled + 1)
    assert health(server)["running"] == 0

    async def timed(client):
        stream = await client.completions.create(model="m", prompt="class", max_tokens=100, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        times = [time.monotonic() async for _ in stream]
        return times[0], times[-1]

    async def together():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*(timed(client) for _ in range(SLOTS)))

    spans = asyncio.run(together())
    assert max(first for first, _ in spans) < min(last for _, last in spans)


def test_bad_requests_are_answered_and_the_server_goes_on(server, client):
    bad = [
        (b'{"prompt": "x",', "not valid JSON"),
        (b'["prompt"]', "must be a JSON object"),
        (b'{"prompt": "x", "temperature": NaN}', "NaN is not a JSON number"),
        ({"prompt": "x", "frobnicate": 1}, "unknown field 'frobnicate'"),
        ({"prompt": "x", "temperature": "hot"}, "temperature must be a number"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens must be an integer"),
        ({"prompt": "x", "stream": "yes"}, "stream must be a boolean"),
        ({"prompt": 7}, "prompt must be a string"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens must be at least 1"),
        ({"prompt": "x", "max_tokens": -3}, "max_tokens must be at least 1"),
        ({"prompt": "x", "temperature": -0.5}, "temperature must be >= 0"),
        ({"prompt": "x", "top_p": 0}, "top_p must be in (0, 1]"),
        ({"prompt": "x", "stop": ["", "a"]}, "stop must be"),
        ({"prompt": "x", "logprobs": 50}, "logprobs must be between"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "not supported"),
        ({"prompt": [1, 2, 10**6]}, "token ids must be in"),
        ({"prompt": "x" * 3000, "max_tokens": 4}, "context is 512 tokens"),
        ({"prompt": "x", "max_tokens": CONTEXT}, "context is 512 tokens"),
        ({"prompt": "x", "n": SLOTS + QUEUE + 1}, "server holds at most"),
    ]
    for body, message in bad:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{server}/v1/completions", content=data)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error", (body, error)
        assert set(error) == {"message", "type", "param", "code"}
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "x" * 3000}).json()["error"]["code"] == \
        "context_length_exceeded"
    for messages in ([], [{"role": "wizard", "content": "hi"}], [{"role": "user", "content": 3}]):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=messages)
        assert e.value.body["param"] == "messages"
    assert httpx.get(f"{server}/v1/nothing").status_code == 404
    assert httpx.get(f"{server}/v1/completions").status_code == 405
    assert client.completions.create(model="m", prompt="x", max_tokens=3, temperature=0).usage.completion_tokens >= 1
    assert health(server)["status"] == "ok"


def test_beyond_the_queue_is_429_with_retry_after(server, client):
    """Every slot and queue place taken by one request's choices: the next request gets 429 with
    Retry-After; once that client goes, the server serves again."""
    stream = client.completions.create(model="m", prompt="def", max_tokens=CONTEXT - 8, temperature=0,
                                       n=SLOTS + QUEUE, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    response = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    stream.close()
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "queue_full"
    wait_for(lambda: health(server)["running"] == 0 and health(server)["waiting"] == 0)
    assert client.completions.create(model="m", prompt="x", max_tokens=2, temperature=0).choices[0].finish_reason


def test_api_key_and_sigterm(checkpoint, tmp_path):
    """--api_key is checked as OpenAI clients send it; SIGTERM lets the request in flight finish,
    refuses new connections and exits 0 within --shutdown_timeout."""
    proc, url = start_server(checkpoint, tmp_path / "log", "--api_key", "sesame", "--shutdown_timeout", "5")
    try:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == str(checkpoint)
        stream = client.completions.create(model="m", prompt="def", max_tokens=200, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rest = list(chunks)
        assert rest[-1].usage.completion_tokens == 200 and rest[-2].choices[0].finish_reason == "length"
        with pytest.raises(openai.APIConnectionError):
            client.completions.create(model="m", prompt="x", max_tokens=2)
        assert proc.wait(30) == 0
        assert time.monotonic() - signalled < 5 + 10  # the stated time, and room for a loaded machine
    finally:
        stop_server(proc)


def test_serving_benchmark_runs(checkpoint, tmp_path):
    """python -m llm.bench serve end to end at a tiny size: every level's requests complete, whole."""
    out = tmp_path / "serve.json"
    command = [sys.executable, "-m", "llm.bench", "serve", "--ckpt", str(checkpoint), "--clients", "1,3",
               "--requests", "2", "--prompt_tokens", "5", "--max_tokens", "6", "--max_batch", "2", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run = json.loads(out.read_text())["runs"][0]
    assert run["server_exit_status"] == 0 and run["sample_tokens_per_s"] > 0
    for row, clients in zip(run["rows"], (1, 3)):
        assert (row["clients"], row["requests"], row["failed"]) == (clients, 2 * clients, 0)
        assert row["tokens_per_s"] * row["seconds"] == pytest.approx(6 * 2 * clients)
        assert 0 < row["ttft_p50"] <= row["ttft_p99"] and 0 < row["per_token_p50"] <= row["per_token_p99"]
    timed = subprocess.run([*command[:6], "--clients", "2", "--seconds", "1", "--prompt_tokens", "5", "--max_tokens", "6",
                            "--max_batch", "2", "--json", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)  # by time instead of by count
    assert timed.returncode == 0, timed.stdout[-2000:] + timed.stderr[-2000:]
    row = json.loads(out.read_text())["runs"][0]["rows"][0]
    assert row["clients"] == 2 and row["requests"] >= 2 and row["failed"] == 0


def run_sequences(model, tokenizer, prompts: list[list[int]], max_tokens: list[int], compile_backend=None,
                  slots: int = 3) -> tuple[list[list[int]], Engine]:
    """Greedy sequences submitted one by one as the engine steps (each joins while others run, the
    other rows idle); their tokens."""
    engine = Engine(ModelRunner(model, slots, compile_backend), max_waiting=8)
    seqs = [Sequence(i, p, m, TextStream(tokenizer, (), p), deliver=lambda out: None)
            for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    with torch.inference_mode():
        for seq in seqs:
            engine.submit([seq])
            for _ in range(3):
                engine.step()
        while engine.scheduler.running:
            engine.step()
    return [s.ids for s in seqs], engine


def alone(model, prompt: list[int], n: int) -> list[int]:
    return torch.stack(list(generate(model, [prompt], n, Sampling(temperature=0))), dim=1)[0].tolist()


def test_idle_rows_never_run_past_the_cache(seed):
    """Rows idle for more steps than the cache holds (requests one after another, mostly in the lowest
    slot): the steps go on (an idle row past the cache would write out of bounds), and every request
    equals generate() alone (float64: exact)."""
    tokenizer = Tokenizer.train([TEXT], vocab_size=280)
    model = tiny_model(seed, vocab_size=tokenizer.vocab_size, block_size=24)
    prompts = [torch.randint(0, tokenizer.vocab_size, (n,)).tolist() for n in (5, 3, 9, 2)]
    lengths = [24 - len(p) for p in prompts]
    ids, _ = run_sequences(model, tokenizer, prompts, lengths)
    assert ids == [alone(model, p, n) for p, n in zip(prompts, lengths)]
    assert sum(lengths) > 3 * 24


def test_an_eager_step_reads_only_the_cache_its_rows_need(seed):
    """Rows at random positions: the step reads the shortest power-of-two fraction of the cache (down
    to 1/16) that holds every row's next slot, and its logits are those of a step that reads it all
    (float64)."""
    model = tiny_model(seed, block_size=64)
    runner, whole = ModelRunner(model, 4), ModelRunner(model, 4)
    whole.windows = None  # as a compiled step: the whole cache
    busy = int(torch.randint(1, 4, ()))
    with torch.inference_mode():
        for slot in range(busy):
            prompt = torch.randint(0, model.config.vocab_size, (int(torch.randint(1, 40, ())),)).tolist()
            for r in (runner, whole):
                r.prefill(slot, prompt)
        for _ in range(int(torch.randint(1, 8, ()))):
            needed = int(runner.cache.pos.max()) + 1
            assert runner.window().max_len == max(4, 1 << (needed - 1).bit_length())
            tokens = torch.randint(0, model.config.vocab_size, (4,)).tolist()
            torch.testing.assert_close(runner.decode(tokens), whole.decode(tokens), rtol=1e-12, atol=1e-12)
        assert torch.equal(runner.cache.pos, whole.cache.pos)


def test_compiled_step_compiles_once_while_requests_come_and_go(seed):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    tokenizer = Tokenizer.train([TEXT], vocab_size=280)
    model = tiny_model(seed, vocab_size=tokenizer.vocab_size, block_size=48, n_layer=1)
    prompts = [torch.randint(0, tokenizer.vocab_size, (n,)).tolist() for n in (5, 13, 2, 8, 1)]
    lengths = [10, 4, 12, 6, 9]
    counter = CompileCounter()
    compiled, _ = run_sequences(model, tokenizer, prompts, lengths, counter)
    assert counter.frame_count == 1
    assert compiled == [alone(model, p, n) for p, n in zip(prompts, lengths)]


def test_a_stop_string_in_the_last_held_back_text_is_a_stop(reference):
    """At max_tokens the bytes held back for an unfinished character come out (as U+FFFD); a stop
    string that shows only then still cuts the text there, and the sequence ends as a stop, not at
    its length (found by a random model that repeated lone lead bytes)."""
    from llm.serve.sequence import Sequence

    _, tokenizer = reference
    lead = tokenizer.hf.token_to_id("ä")  # byte 0xE4 alone: the first byte of a 3-byte character
    prompt = tokenizer.encode("x")
    outputs = []
    seq = Sequence(0, prompt, 3, TextStream(tokenizer, ("\ufffd\ufffd",), prompt), outputs.append)
    texts = [seq.append(t).text for t in (tokenizer.encode("a")[0], lead, lead)]
    assert "".join(texts) == "a" and seq.finish_reason == "stop"
    assert tokenizer.decode(prompt + seq.ids)[len("x"):].startswith("a\ufffd\ufffd")
