"""Structured outputs and prompt logprobs through the OpenAI routes, as a vLLM user sends them
with the official openai client (response_format, extra_body guided_* and structured_outputs,
prompt_logprobs), against a real server on loopback serving the demo's random-weight model: the
outputs obey their constraint whatever the weights, bad constraints answer 400 naming the field.
"""

from __future__ import annotations

import json
import re

import openai
import pytest
from moelora.demo.assets import build_demo_assets
from server_harness import openai_server, server_env

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model_dir, adapters = build_demo_assets(str(root))
    args = [model_dir, "--served-model-name", "base", "--device", "cpu",
            "--lora-modules", f"poet={adapters['poet']}", "--max-lora-rank", "16",
            "--max-num-seqs", "8", "--max-model-len", "512"]
    with openai_server(args, server_env(), str(tmp_path_factory.mktemp("logs") / "s.log")) as (
            _, client):
        yield client


def _chat(client, model="base", max_tokens=48, **kwargs):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Who?"}], max_tokens=max_tokens,
        temperature=0.0, **kwargs)


def test_response_format_json_schema_and_json_object(client):
    out = _chat(client, response_format={"type": "json_schema", "json_schema": {
        "name": "person", "schema": SCHEMA}})
    choice = out.choices[0]
    if choice.finish_reason == "stop":  # a complete document within max_tokens
        value = json.loads(choice.message.content)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    else:  # cut by max_tokens: still a prefix of the grammar's language
        assert choice.message.content.startswith("{")
    obj = _chat(client, model="poet", response_format={"type": "json_object"}, max_tokens=24)
    assert obj.choices[0].message.content.lstrip().startswith("{")


def test_guided_fields_through_extra_body(client):
    choice = _chat(client, extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert choice.choices[0].message.content in ("yes", "no", "maybe")
    assert choice.choices[0].finish_reason == "stop"
    regex = client.completions.create(model="base", prompt="Code:", max_tokens=16,
                                      temperature=0.8, seed=3,
                                      extra_body={"guided_regex": r"[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", regex.choices[0].text)
    newer = _chat(client, extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert newer.choices[0].message.content in ("red", "blue")
    grammar = _chat(client, extra_body={"guided_grammar": 'root ::= "a" ("b" | "c")'})
    assert grammar.choices[0].message.content in ("ab", "ac")


@pytest.mark.parametrize("extra,field", [
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
     "guided_json"),
    ({"guided_regex": "([a-z"}, "guided_regex"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_regex"),  # the message names both
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
])
def test_bad_constraints_answer_400_naming_the_field(client, extra, field):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, extra_body=extra)
    assert caught.value.body["param"] == field, caught.value.body
    # the server goes on serving
    assert _chat(client, max_tokens=2).choices[0].finish_reason == "length"


def test_prompt_logprobs(client):
    out = client.completions.create(model="poet", prompt="Hello there", max_tokens=2,
                                    temperature=0.0, extra_body={"prompt_logprobs": 2})
    entries = out.model_extra.get("prompt_logprobs") or out.choices[0].model_extra[
        "prompt_logprobs"]
    assert entries[0] is None and len(entries) == out.usage.prompt_tokens
    for position in entries[1:]:
        assert 1 <= len(position) <= 3  # the prompt's token and the top 2
        for value in position.values():
            assert value["logprob"] <= 0.0 and value["rank"] >= 1
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="x", max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})
    assert caught.value.body["param"] == "prompt_logprobs"
