"""Tool calling as a vLLM user runs it: `--enable-auto-tool-choice --tool-call-parser hermes`,
`tools` from the official openai client, the calls back in `tool_calls` with finish_reason
"tool_calls" (whole and streamed), and a follow-up turn carrying the call and the tool's answer.
The demo's random model is steered to a call with a guided regex, so the parse is exercised on
a real generation; the chat template is a Hermes-style one given by --chat-template."""

from __future__ import annotations

import json

import openai
import pytest
from moelora.demo.assets import build_demo_assets
from moelora.entrypoints.openai.tool_parsers import HermesToolParser
from server_harness import openai_server, server_env

TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "</tools><|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}"
    "</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CALL = r'<tool_call>\{"name": "weather", "arguments": \{"city": "Oslo"\}\}</tool_call>'
MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model_dir, _ = build_demo_assets(str(root))
    template = root / "hermes.jinja"
    template.write_text(TEMPLATE)
    args = [model_dir, "--served-model-name", "base", "--device", "cpu", "--max-num-seqs", "4",
            "--max-model-len", "512", "--chat-template", str(template),
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with openai_server(args, server_env(), str(tmp_path_factory.mktemp("logs") / "s.log")) as (
            _, client):
        yield client


def test_hermes_parser():
    parser = HermesToolParser()
    out = parser.extract('Let me look.\n<tool_call>\n{"name": "weather", "arguments": '
                         '{"city": "Oslo"}}\n</tool_call>\n<tool_call>{"name": "time", '
                         '"arguments": {}}</tool_call>')
    assert out.content == "Let me look."
    assert [c["function"]["name"] for c in out.tool_calls] == ["weather", "time"]
    assert json.loads(out.tool_calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert len({c["id"] for c in out.tool_calls}) == 2
    assert parser.extract("plain text").tool_calls == []
    broken = "<tool_call>{not json</tool_call>"
    assert parser.extract(broken).content == broken and parser.extract(broken).tool_calls == []
    cut = parser.extract('<tool_call>{"name": "weather", "arguments": {"city": "Os"}}')
    assert cut.content is None and cut.tool_calls[0]["function"]["name"] == "weather"


def test_a_tool_call_comes_back_whole_and_streamed(client):
    out = client.chat.completions.create(
        model="base", messages=MESSAGES, tools=TOOLS, max_tokens=128, temperature=0.0,
        extra_body={"guided_regex": CALL})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    chunks = list(client.chat.completions.create(
        model="base", messages=MESSAGES, tools=TOOLS, max_tokens=128, temperature=0.0,
        stream=True, stream_options={"include_usage": True}, extra_body={"guided_regex": CALL}))
    calls = [c for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["weather"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0
    # the next turn carries the call and the tool's answer through the template
    follow = client.chat.completions.create(
        model="base", max_tokens=4, temperature=0.0, tools=TOOLS,
        messages=[*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "weather", "arguments": call.function.arguments}}]},
                  {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}])
    assert follow.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_tool_choice_forms(client):
    plain = client.chat.completions.create(model="base", messages=MESSAGES, tools=TOOLS,
                                           tool_choice="none", max_tokens=3)
    assert plain.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=MESSAGES, tools=TOOLS,
                                       tool_choice="required", max_tokens=3)
    assert caught.value.body["param"] == "tool_choice"
