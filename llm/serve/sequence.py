"""One completion being generated: its prompt, how it samples and stops, what it has made so far.

A request asks for one or more completions (several prompts, `n` choices each); each is a
Sequence, and each Sequence holds one slot (a row of the KV cache) from its prefill to its
last token. The engine hands it tokens; it turns them into text and tells its request
through `deliver` (called on the engine's thread).
"""
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llm.infer.generate import Sampling, TextStream


@dataclass
class TokenLogprob:
    id: int
    logprob: float | None  # None for a prompt's first token: nothing comes before it
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens there, (id, logprob)


@dataclass
class Output:
    """What one sequence adds at one step, for its request."""
    index: int  # the choice's index in its request
    text: str = ""  # text that became safe to show (never half a character or part of a stop string)
    tokens: list[TokenLogprob] = field(default_factory=list)  # the new tokens' log-probabilities, where asked
    prompt: list[TokenLogprob] | None = None  # the prompt's own (echo with logprobs), with the first output
    finish_reason: str | None = None  # stop | length | error, on the last output


@dataclass(eq=False)
class Sequence:
    index: int
    prompt_ids: list[int]
    max_tokens: int  # 0: score the prompt only (prompt_logprobs)
    text: TextStream  # the text, with the stop strings
    deliver: Callable[[Output], None]
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0))
    generator: torch.Generator | None = None  # this sequence's own random stream (its seed)
    stop_ids: frozenset[int] = frozenset()  # tokens that end it: end of sequence, end of turn
    logprobs: int | None = None  # for each generated token: its log-probability and the top `logprobs`
    prompt_logprobs: bool = False
    ids: list[int] = field(default_factory=list)  # generated so far, stop token included
    slot: int | None = None
    finish_reason: str | None = None
    cancelled: bool = False  # its client went away: the engine drops it at the next step

    def append(self, token: int, logprob: TokenLogprob | None = None) -> Output:
        """The next token: the text it releases, and whether the sequence is finished."""
        self.ids.append(token)
        if token in self.stop_ids:
            text, self.finish_reason = self.text.finish(), "stop"
        else:
            text = self.text.add(token)
            if self.text.stopped:
                self.finish_reason = "stop"
            elif len(self.ids) >= self.max_tokens:
                # The text held back (bytes of an unfinished character) is released now, and a
                # stop string may only show in it: the text is then cut there, as for any stop.
                text += self.text.finish()
                self.finish_reason = "stop" if self.text.stopped else "length"
        return Output(self.index, text, [logprob] if logprob else [], finish_reason=self.finish_reason)
