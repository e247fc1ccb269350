"""Chat templates: a conversation as the text a chat model was trained on.

A Hugging Face directory carries its model's template (chat_template.jinja, or "chat_template"
in tokenizer_config.json); it is rendered here as transformers' apply_chat_template renders it:
the same jinja2 sandbox (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loop
controls, the `{% generation %}` tag), the same helpers (raise_exception, strftime_now, a tojson
that keeps non-ASCII text, dict, a namespace without underscore names), `tools` and `documents`
(None unless given), and the tokenizer's special tokens as variables. Our own runs use DEFAULT_TEMPLATE, in
the ChatML layout, whose two markers are added to the tokenizer as special tokens and whose
text is saved with the run as chat_template.jinja, so exports carry it.

    <|im_start|>system
    You are concise.<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant
    Hello!<|im_end|>

For fine-tuning, `assistant_spans` finds which characters of a rendered conversation are the
assistant's (their tokens become the targets), and `end_of_turn` which token ends a turn (where
generation stops).
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
            variables = {"tools": None, "documents": None, **self.special_tokens, **variables}
            return compile_template(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        **variables)
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template failed: {e}")

    def save(self, folder: Path):
        """chat_template.jinja, and the special tokens it reads added to the folder's
        tokenizer_config.json (where find_template, transformers and GGUF writers look for them)."""
        from llm.files import read_json, write_json, write_text

        folder = Path(folder)
        write_text(folder / TEMPLATE_FILE, self.source)
        if self.special_tokens:
            config = folder / "tokenizer_config.json"
            write_json(config, {**(read_json(config) if config.exists() else {}), **self.special_tokens})

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


def _dict(*args, **kwargs):
    return dict(*args, **kwargs)


def _check_name(name):
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore names ({name!r})")


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace(), refusing underscore names (a way towards Python's internals)."""

    def __init__(*args, **kwargs):
        self, values = args[0], dict(*args[1:], **kwargs)
        for name in values:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, values)

    def __setitem__(self, name, value):
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which marks assistant text in some templates:
    rendered as its body (our assistant spans come from rendering prefixes: assistant_spans)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """A template from the Hub is untrusted code: it runs in jinja2's immutable sandbox."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _dict
    env.globals["namespace"] = _Namespace
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


def assistant_spans(template: ChatTemplate, messages: list[dict], last_only: bool = False) -> tuple[str, list[tuple]]:
    """(the rendered conversation, the (start, end) character spans of its assistant turns, or
    of the last one only). A turn's span is what rendering messages[:i + 1] adds to rendering
    messages[:i] with the generation prompt: the reply and whatever ends its turn (<|im_end|>,
    <|eot_id|>, ...), so a model trained on it learns to stop. A template that does not render
    a conversation's beginning as the beginning of the whole (one that drops earlier turns'
    reasoning, say) cannot be labelled this way: a UserError, not a silent mislabelling."""
    text = template.render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise UserError("the chat template does not render the beginning of a conversation as the beginning "
                            f"of the whole (at message {i}), so its assistant turns cannot be found: "
                            "fine-tuning needs a template that only appends")
        spans.append((len(before), len(through)))
    return text, spans[-1:] if last_only else spans


def end_of_turn(template: ChatTemplate, special_tokens: dict[str, int]) -> int | None:
    """The id of the special token that ends an assistant turn in this template (<|im_end|>,
    <|eot_id|>, <end_of_turn>, ...): the first special token rendered after a reply's text.
    special_tokens: the tokenizer's special tokens, text -> id. None where there is none."""
    reply = "Reply text."
    text = template.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}])
    after = text[text.rfind(reply) + len(reply):]
    found = [(after.find(token), token) for token in special_tokens if token and token in after]
    return special_tokens[min(found)[1]] if found else None


def check_conversation(messages, where: str) -> list[dict]:
    """Messages a fine-tuning example can be made of: valid, with an assistant turn, and
    something before the first one (templates render their header from messages[0])."""
    check_messages(messages, where)
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise UserError(f"{where}: no assistant message (nothing to learn)")
    if roles[0] == "assistant":
        raise UserError(f"{where}: the conversation starts with an assistant message (a user or system message "
                        "must come first)")
    return messages


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
