"""Chat templates: a conversation as the text a chat model was trained on.

A Hugging Face directory carries its model's template (chat_template.jinja, or "chat_template"
in tokenizer_config.json); it is rendered here as transformers' apply_chat_template renders it:
the same jinja2 sandbox (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loop
controls), the same helpers (raise_exception, strftime_now, a tojson that keeps non-ASCII
text), and the tokenizer's special tokens as variables. Our own runs use DEFAULT_TEMPLATE, in
the ChatML layout, whose two markers are added to the tokenizer as special tokens and whose
text is saved with the run as chat_template.jinja, so exports carry it.

    <|im_start|>system
    You are concise.<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant
    Hello!<|im_end|>
"""
import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llm.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant")
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens that end an assistant turn in common templates: generation stops at the first one the
# tokenizer knows (besides its end-of-sequence token).
END_OF_TURN = (TURN_END, "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


@dataclass
class ChatTemplate:
    source: str  # the jinja text
    special_tokens: dict = field(default_factory=dict)  # bos_token, eos_token, ... as the template sees them

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
        """The conversation as text, as transformers' apply_chat_template(tokenize=False) gives it."""
        try:
            return compile_template(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        **self.special_tokens, **variables)
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template failed: {e}")

    def save(self, folder: Path):
        from llm.files import write_text

        write_text(Path(folder) / TEMPLATE_FILE, self.source)

    @classmethod
    def default(cls) -> "ChatTemplate":
        return cls(DEFAULT_TEMPLATE)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """A template from the Hub is untrusted code: it runs in jinja2's immutable sandbox."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template does not compile: {e}")


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_template(folder: Path) -> ChatTemplate | None:
    """The chat template saved in a model folder (chat_template.jinja, or tokenizer_config.json's
    "chat_template": a string, or a list of named templates of which "default" is used), with
    the special tokens tokenizer_config.json names; None where there is none."""
    folder = Path(folder)
    config = {}
    if (folder / "tokenizer_config.json").is_file():
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {folder / 'tokenizer_config.json'}: {e}")
    special = {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name))) is not None}
    if (folder / TEMPLATE_FILE).is_file():
        return ChatTemplate((folder / TEMPLATE_FILE).read_text(), special)
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return ChatTemplate(source, special) if isinstance(source, str) and source else None


def check_messages(messages, where: str = "the conversation") -> list[dict]:
    """OpenAI-style messages: a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UserError(f"{where}: message {i} needs a role of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"{where}: message {i} ({message['role']}) needs text content")
    return messages
