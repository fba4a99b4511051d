"""Tool calls read back from generated text (`--enable-auto-tool-choice --tool-call-parser NAME`,
vLLM's flags). The chat template renders the request's `tools` into the prompt; the model
answers with calls in its family's format, and the parser turns them into OpenAI `tool_calls`.

- `hermes`: Qwen2/Qwen3 and other Hermes-style templates, calls written as
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, text outside them the content.

GPT-OSS's harmony format needs openai-harmony's encoding files, which it downloads on first use;
its parser is not offered (see the README).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field


@dataclass
class ExtractedToolCalls:
    content: str | None  # the text outside the calls (None: none)
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's tool_calls entries


def _call_id() -> str:
    return "chatcmpl-tool-" + secrets.token_hex(12)


class HermesToolParser:
    """`<tool_call>{json}</tool_call>` blocks; a block that is not a JSON object with a string
    `name` leaves the whole text as content (as vLLM does: no call is better than a wrong one)."""

    name = "hermes"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> ExtractedToolCalls:
        if "<tool_call>" not in text:
            return ExtractedToolCalls(text)
        calls = []
        for body in self._BLOCK.findall(text):
            try:
                call = json.loads(body)
            except ValueError:
                return ExtractedToolCalls(text)
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return ExtractedToolCalls(text)
            arguments = call.get("arguments", call.get("parameters", {}))
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            calls.append({"id": _call_id(), "type": "function",
                          "function": {"name": call["name"], "arguments": arguments}})
        content = text[:text.index("<tool_call>")].strip()
        return ExtractedToolCalls(content or None, calls)


TOOL_PARSERS = {HermesToolParser.name: HermesToolParser}


def tool_parser(name: str):
    """The parser registered as `name`; ValueError listing the names there are."""
    if name not in TOOL_PARSERS:
        offered = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"--tool-call-parser {name!r} is not available (offered: {offered}); "
                         f"GPT-OSS's harmony parser needs openai-harmony's downloaded encoding")
    return TOOL_PARSERS[name]()


def assistant_message(extracted: ExtractedToolCalls, finish_reason: str | None
                      ) -> tuple[dict, str | None]:
    """(the chat message, its finish_reason) of an output read by a parser: "tool_calls" when
    the model called a tool."""
    message = {"role": "assistant", "content": extracted.content}
    if not extracted.tool_calls:
        return message, finish_reason
    message["tool_calls"] = extracted.tool_calls
    return message, "tool_calls"


def completion_chunks(body: dict, include_usage: bool):
    """A whole chat.completion as the chunks of a stream: per choice the role, the content,
    each tool call whole, then the finish; the usage last when asked."""
    base = {key: body[key] for key in ("id", "created", "model")}
    base["object"] = "chat.completion.chunk"

    def chunk(choices, **extra):
        return {**base, "choices": choices, **extra}

    for choice in body["choices"]:
        index, message = choice["index"], choice["message"]
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])
        if message.get("content"):
            yield chunk([{"index": index, "delta": {"content": message["content"]},
                          "logprobs": choice["logprobs"], "finish_reason": None}])
        for position, call in enumerate(message.get("tool_calls") or []):
            yield chunk([{"index": index, "delta": {"tool_calls": [{"index": position, **call}]},
                          "logprobs": None, "finish_reason": None}])
        yield chunk([{"index": index, "delta": {}, "logprobs": None,
                      "finish_reason": choice["finish_reason"],
                      "stop_reason": choice["stop_reason"]}])
    if include_usage:
        yield chunk([], usage=body["usage"])


__all__ = ["TOOL_PARSERS", "ExtractedToolCalls", "HermesToolParser", "assistant_message",
           "completion_chunks", "tool_parser"]
