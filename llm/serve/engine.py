"""The serving loop, in a thread of its own: continuous batching over the static slots.

Each turn: admit the waiting sequences that fit in free slots (prefill each into its slot and
sample its first token), drop the sequences whose client went away, then one decode step for
every slot and one token for each running sequence. A sequence that finishes frees its slot
before the next turn, so a waiting one joins at the next step boundary. Each sequence samples
with its own settings and random stream; greedy rows take the argmax of the whole batch at once.
"""
import logging
import threading
import traceback
from collections import Counter

import torch

from llm.infer.generate import sample
from llm.serve.runner import ModelRunner
from llm.serve.scheduler import Scheduler
from llm.serve.sequence import Output, Sequence, TokenLogprob

log = logging.getLogger("llm.serve")


class Engine:
    def __init__(self, runner: ModelRunner, max_waiting: int):
        self.runner = runner
        self.scheduler = Scheduler(runner.tokens.size(0), max_waiting)
        self.finished = Counter()  # finish reason -> sequences, "cancelled" included
        self.generated = 0  # tokens, all sequences
        self.thread = threading.Thread(target=self._loop, name="llm-serve-engine", daemon=True)

    def start(self):
        self.thread.start()

    def submit(self, seqs: list[Sequence]):
        self.scheduler.submit(seqs)

    def cancel(self, seqs: list[Sequence]):
        self.scheduler.cancel([s for s in seqs if s.finish_reason is None])

    def stop(self, timeout: float | None = None):
        """Stop after the current step; sequences still waiting or running are dropped."""
        for seq in self.scheduler.stop():
            seq.cancelled = True
        self.thread.join(timeout)

    def stats(self) -> dict:
        s = self.scheduler
        return {"slots": s.slots, "running": len(s.running), "waiting": len(s.waiting),
                "generated_tokens": self.generated, "finished": dict(self.finished)}

    def _loop(self):
        if self.runner.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(self.runner.device)
        with torch.inference_mode():
            while self.scheduler.wait_for_work():
                try:
                    self.step()
                except Exception:  # the model failed: these requests end in an error, the server goes on
                    log.error("generation failed:\n%s", traceback.format_exc())
                    for seq in list(self.scheduler.running.values()):
                        seq.finish_reason = "error"
                        self._finish(seq, Output(seq.index, finish_reason="error"))

    def step(self):
        """One turn of the loop (the engine's thread runs them; a test may too, with no thread)."""
        for seq in self.scheduler.admit():
            if not seq.cancelled:
                self._prefill(seq)
        for seq in list(self.scheduler.running.values()):
            if seq.cancelled:
                seq.finish_reason = "cancelled"
                self._finish(seq, None)
        running = self.scheduler.running
        if not running:
            return
        tokens = [0] * self.scheduler.slots
        for slot, seq in running.items():
            tokens[slot] = seq.ids[-1]
        logits = self.runner.decode(tokens)
        seqs = list(running.values())
        for seq, token in zip(seqs, self._sample(logits, seqs)):
            self._take(seq, token, logits[seq.slot])

    def _prefill(self, seq: Sequence):
        logits = self.runner.prefill(seq.slot, seq.prompt_ids, every_position=seq.prompt_logprobs)
        prompt = prompt_logprobs(logits[:-1], seq.prompt_ids, seq.logprobs or 0) if seq.prompt_logprobs else None
        last = logits[-1]
        if seq.max_tokens == 0:
            seq.finish_reason = "length"
            self._finish(seq, Output(seq.index, seq.text.finish(), prompt=prompt, finish_reason="length"))
            return
        self._take(seq, self._sample(last[None], [seq], rows=[0])[0], last, prompt)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int] | None = None) -> list[int]:
        """The next token of each sequence from its row of logits (its slot, unless `rows` says)."""
        rows = rows or [s.slot for s in seqs]
        greedy = logits.argmax(dim=-1).tolist() if any(s.sampling.temperature == 0 for s in seqs) else None
        return [greedy[r] if s.sampling.temperature == 0 else int(sample(logits[r:r + 1], s.sampling, s.generator))
                for s, r in zip(seqs, rows)]

    def _take(self, seq: Sequence, token: int, logits: torch.Tensor, prompt: list[TokenLogprob] | None = None):
        self.generated += 1
        logprob = token_logprob(logits, token, seq.logprobs) if seq.logprobs is not None else None
        out = seq.append(token, logprob)
        out.prompt = prompt
        if seq.finish_reason is not None:
            self._finish(seq, out)
        elif out.text or out.tokens or out.prompt:
            seq.deliver(out)

    def _finish(self, seq: Sequence, out: Output | None):
        """Free the sequence's slot now (it is reused at the next step) and give its last output."""
        self.runner.release(seq.slot)
        self.scheduler.finish(seq)
        self.finished[seq.finish_reason] += 1
        if out is not None:
            seq.deliver(out)


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """A token's log-probability under the model's distribution (before temperature and filters,
    as OpenAI and vLLM report it) and the `top` most likely tokens with theirs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
    return TokenLogprob(token, float(logprobs[token]), list(zip(ids.tolist(), values.tolist())))


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it, from the prefill's logits
    (T - 1, vocab) after each token but the last; the first token has none."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(ids[1:], device=logits.device)[:, None])[:, 0].tolist()
    tops = logprobs.topk(top, dim=-1) if top else None
    result = [TokenLogprob(ids[0], None)]
    for i, (token, value) in enumerate(zip(ids[1:], chosen)):
        top_i = list(zip(tops.indices[i].tolist(), tops.values[i].tolist())) if top else []
        result.append(TokenLogprob(token, value, top_i))
    return result
