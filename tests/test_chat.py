"""Chat templates: rendered as transformers renders them, assistant turns found, chat at inference.

Real templates are written in below (SmolLM2's, Qwen2.5's, Llama 3's and Llama 3.2's, as their
Hugging Face repositories ship them) and rendered on random conversations by us and by
transformers' own renderer (render_jinja_template) and tokenizer (apply_chat_template).
"""
import jinja2
import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken
from transformers.utils.chat_template_utils import render_jinja_template

from llm.errors import UserError
from llm.infer.chat import chat_prompt
from llm.model.chat import DEFAULT_TEMPLATE, ChatTemplate, assistant_spans, end_of_turn, find_template
from llm.model.tokenizer import Tokenizer
from llm.train.chat_data import tokenize_conversations

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA32 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported after the system message') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
GENERATION_TAG = (  # TRL-style: the assistant's text inside {% generation %}
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {"smollm2": SMOLLM2, "qwen2.5": QWEN25, "llama3": LLAMA3, "llama3.2": LLAMA32, "default": DEFAULT_TEMPLATE,
             "generation_tag": GENERATION_TAG}
LLAMA_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
SPECIAL = {"llama3": LLAMA_TOKENS, "llama3.2": LLAMA_TOKENS}
MARKERS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Message text: words, spaces, newlines, non-ASCII, quotes and braces (jinja and JSON must not care).
PIECES = ["Hello", " world", "x", " ", "\n", "\t", "é", "🐍", "中文", "'", '"', "{{", "}", "%", "<b>", "2 + 2"]
text = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text})
conversations = st.lists(message, min_size=1, max_size=6)


def render_theirs(source, messages, add_generation_prompt, special):
    return render_jinja_template([messages], chat_template=source, add_generation_prompt=add_generation_prompt,
                                 **special)[0][0]


def outcome(render):
    try:
        return render()
    except (jinja2.TemplateError, UserError):  # both must refuse the same conversations
        return "refused"


@pytest.mark.parametrize("name", TEMPLATES)
@settings(max_examples=60, deadline=None)
@given(messages=conversations, add_generation_prompt=st.booleans())
def test_rendering_equals_transformers(name, messages, add_generation_prompt):
    special = SPECIAL.get(name, {})
    ours = outcome(lambda: ChatTemplate(TEMPLATES[name], special).render(messages, add_generation_prompt))
    theirs = outcome(lambda: render_theirs(TEMPLATES[name], messages, add_generation_prompt, special))
    assert ours == theirs


def test_tools_render_as_transformers():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"a": "é"}}}]
    messages = [{"role": "user", "content": "Sum?"}]
    ours = ChatTemplate(QWEN25).render(messages, True, tools=tools)
    assert ours == render_jinja_template([messages], tools=tools, chat_template=QWEN25, add_generation_prompt=True)[0][0]
    assert '"a": "é"' in ours  # tojson keeps non-ASCII text


def test_the_sandbox_holds():
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(UserError, match="chat template failed"):
        ChatTemplate(escape).render([{"role": "user", "content": "x"}])
    with pytest.raises(UserError, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}{{ ns }}").render([{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer.train(["Hello world, the color is blue. " * 50, "中文 🐍 é 2 + 2 'quoted' {braces}"], 400)
    tok.hf.add_special_tokens([AddedToken(t, special=True) for t in MARKERS])
    return tok


def hf_tokenizer(tokenizer, source, special) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, chat_template=source, **special)


@pytest.mark.parametrize("name", ["smollm2", "qwen2.5", "llama3", "default"])
@settings(max_examples=30, deadline=None)
@given(messages=conversations)
def test_prompt_tokens_equal_apply_chat_template(tokenizer, name, messages):
    special = SPECIAL.get(name, {})
    template = ChatTemplate(TEMPLATES[name], special)
    theirs = hf_tokenizer(tokenizer, TEMPLATES[name], special).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert chat_prompt(tokenizer, template, messages) == theirs


# Conversations whose turns begin and end with a word, so that no token straddles a turn's edge and
# the targets decode to exactly the assistant's text and end of turn.
word_text = st.lists(st.sampled_from(["Hello", " world", " 中文", " 2 + 2", "\n", " é"]), max_size=5).map(
    lambda parts: "Hi" + "".join(parts) + " ok")
turns = st.lists(st.tuples(word_text, word_text), min_size=1, max_size=4)
AFTER_REPLY = {"default": "<|im_end|>\n", "smollm2": "<|im_end|>\n", "qwen2.5": "<|im_end|>\n", "llama3": "<|eot_id|>"}


@pytest.mark.parametrize("name", AFTER_REPLY)
@pytest.mark.parametrize("last_only", [False, True])
@settings(max_examples=25, deadline=None)
@given(pairs=turns, system=st.booleans())
def test_targets_are_the_assistant_turns(tokenizer, name, last_only, pairs, system):
    messages = [{"role": "system", "content": "Be brief"}] if system else []
    for question, answer in pairs:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    template = ChatTemplate(TEMPLATES[name], SPECIAL.get(name, {}))
    [(ids, mask)] = tokenize_conversations([messages], tokenizer, template, last_only)
    answers = [a for _, a in pairs][-1:] if last_only else [a for _, a in pairs]
    expected = "".join(a + AFTER_REPLY[name] for a in answers)
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == expected
    assert ids == tokenizer.hf.encode(template.render(messages), add_special_tokens=False).ids


def test_a_template_that_rewrites_earlier_turns_is_refused():
    """Like Qwen3's, which drops earlier turns' reasoning: the last turn renders differently later."""
    source = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[earlier]{% else %}"
              "{{ m.content }}{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(UserError, match="cannot be found"):
        assistant_spans(ChatTemplate(source), messages)


@pytest.mark.parametrize("name, token", [("default", "<|im_end|>"), ("qwen2.5", "<|im_end|>"),
                                         ("llama3", "<|eot_id|>"), ("llama3.2", "<|eot_id|>")])
def test_end_of_turn(tokenizer, name, token):
    template = ChatTemplate(TEMPLATES[name], SPECIAL.get(name, {}))
    assert end_of_turn(template, tokenizer.special_ids) == tokenizer.hf.token_to_id(token)


def test_saved_template_is_found_with_its_special_tokens(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "X"}')
    ChatTemplate(LLAMA3, LLAMA_TOKENS).save(tmp_path)
    found = find_template(tmp_path)
    assert found.source == LLAMA3 and found.special_tokens == LLAMA_TOKENS
    assert '"tokenizer_class": "X"' in (tmp_path / "tokenizer_config.json").read_text()  # kept
