"""Does an export compute what its source computes? (`python -m llm.export --verify`)

The written model is read back by an independent reader where there is one: a Hugging Face
directory by transformers (by our reader when transformers is not installed), a GGUF file by
our GGUF reader (gguf's own parser and dequantizer). On a fixed prompt it is compared with the
source, both in float32 on the CPU: the largest |Δlogit| over the prompt's positions, relative
to the largest |logit|, and the greedy tokens of 64 steps (how many agree before the first
difference). TOLERANCES is what passes; greedy tokens must all agree in f32 only, since in
lower precisions a near-tie may rightly go either way.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.infer.generate import Sampling, generate
from llm.model.tokenizer import Tokenizer
from llm.model.transformer import Transformer

PROMPT = ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
          '    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nclass Stack:\n')
GREEDY_TOKENS = 64
# outtype -> the largest |Δlogit| that passes, as a fraction of the largest |logit|: about ten times what
# a trained tiny run and freshly initialized models show (f16 3e-4, bf16 2e-3, q8_0 5e-3; docs/formats.md)
TOLERANCES = {"f32": 1e-5, "f16": 5e-3, "bf16": 2e-2, "q8_0": 5e-2}


@dataclass
class Verification:
    reader: str
    outtype: str
    max_diff: float
    max_logit: float
    same_greedy: int
    n_greedy: int

    @property
    def ok(self) -> bool:
        logits_ok = self.max_diff <= TOLERANCES[self.outtype] * self.max_logit + 1e-6
        return logits_ok and (self.outtype != "f32" or self.same_greedy == self.n_greedy)

    def __str__(self) -> str:
        bound = TOLERANCES[self.outtype]
        greedy = "all" if self.same_greedy == self.n_greedy else f"the first {self.same_greedy}"
        return (f"verify ({self.reader}, {self.outtype}): max |Δlogit| = {self.max_diff:.3g} "
                f"({self.max_diff / max(self.max_logit, 1e-30):.2g} of max |logit| {self.max_logit:.3g}; "
                f"tolerance {bound:g}); greedy: {greedy} of {self.n_greedy} tokens the same"
                f"{'' if self.outtype != 'f32' else ' (all required)'}: {'ok' if self.ok else 'FAILED'}")


@torch.no_grad()
def our_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    return torch.stack(list(generate(model, [prompt], n, Sampling(temperature=0))), dim=1)[0].tolist()


def reloaded(path: Path, fmt: str):
    """(logits of a token list, greedy continuation, who read it) for the written model."""
    if fmt == "hf":
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            AutoModelForCausalLM = None
        if AutoModelForCausalLM is not None:
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            hf.generation_config.eos_token_id = None  # 64 tokens, whatever they are

            @torch.no_grad()
            def hf_greedy(prompt, n):
                out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
                return out[0, len(prompt):].tolist()

            return (lambda ids: hf(torch.tensor([ids])).logits[0]), hf_greedy, "transformers"
    from llm.formats import gguf, hf as hf_format

    model = (gguf if fmt == "gguf" else hf_format).load_model(path).float().eval()
    return (lambda ids: model(torch.tensor([ids]))[0]), (lambda p, n: our_greedy(model, p, n)), f"our {fmt} reader"


@torch.no_grad()
def verify(source: Transformer, tokenizer: Tokenizer, written: Path, fmt: str, outtype: str) -> Verification:
    source = source.float().eval()
    prompt = tokenizer.encode(PROMPT)[: source.config.block_size // 2] or [0]
    n = min(GREEDY_TOKENS, source.config.block_size - len(prompt))
    logits, greedy, reader = reloaded(written, fmt)
    expected = source(torch.tensor([prompt]))[0]
    max_diff = (logits(prompt).float() - expected).abs().max().item()
    ours, theirs = our_greedy(source, prompt, n), greedy(prompt, n)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return Verification(reader, outtype, max_diff if math.isfinite(max_diff) else math.inf,
                        expected.abs().max().item(), same, n)
