"""Chat: a conversation in, the assistant's reply out, through the model's own chat template.

    template = llm.formats.load.chat_template("out")     # saved with a fine-tuned run
    reply = chat(model, tokenizer, template, [{"role": "user", "content": "Hi"}])["text"]

The conversation is rendered with the generation prompt and tokenized as transformers'
apply_chat_template does (the template's special tokens recognised, none added), and generation
stops at the template's end-of-turn token (llm/model/chat.py end_of_turn) or the tokenizer's
end-of-sequence token.
"""
import json
from collections.abc import Callable
from pathlib import Path

from llm.errors import UserError
from llm.infer.generate import Sampling, complete
from llm.model.chat import ChatTemplate, check_messages, end_of_turn
from llm.model.tokenizer import Tokenizer


def chat_prompt(tokenizer: Tokenizer, template: ChatTemplate, messages: list[dict]) -> list[int]:
    text = template.render(check_messages(messages), add_generation_prompt=True)
    return tokenizer.hf.encode(text, add_special_tokens=False).ids


def chat(model, tokenizer: Tokenizer, template: ChatTemplate, messages: list[dict], max_new_tokens: int = 256,
         sampling: Sampling = Sampling(temperature=0), seed: int | None = None,
         on_text: Callable[[int, str], None] | None = None, **options) -> dict:
    """The assistant's next turn: {"prompt_ids", "ids", "text"} as complete() gives them, the
    end-of-turn token left out. options: complete()'s (use_cache, decode_step, truncate, stop)."""
    stop = end_of_turn(template, tokenizer.special_ids)
    prompt = chat_prompt(tokenizer, template, messages)
    return complete(model, tokenizer, [prompt], max_new_tokens, sampling, seed=seed, on_text=on_text,
                    stop_ids=() if stop is None else (stop,), **options)[0]


def read_conversation(path) -> list[dict]:
    """A JSON file of messages: a list, or an object with "messages" (one row of a chat data set)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read conversation {path}: {e}")
    if isinstance(value, dict):
        value = value.get("messages")
    return check_messages(value, str(path))
