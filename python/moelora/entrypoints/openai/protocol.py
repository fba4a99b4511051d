"""The OpenAI wire format (with vLLM's extra sampling fields) as pydantic models.

Requests are validated here: a bad field becomes a 400 naming the parameter, never a crash.
Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moelora.engine.sampling_params import SamplingParams
from moelora.engine.structured_params import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_TOKEN_ID_DIGITS = 18  # a logit_bias key longer than this is no token id of any vocabulary


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Request):
    """Sampling fields shared by completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:N" (vLLM)
    prompt_logprobs: int | None = Field(None, ge=-1)  # vLLM: logprobs of the prompt's tokens
    # Structured outputs: OpenAI's response_format, vLLM's guided_* fields and its newer
    # structured_outputs object (one constraint per request; structured_outputs_params()).
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_token_ids(cls, value):
        # Keys are checked before int() sees them: Python refuses to convert strings of more
        # than 4,300 digits, and that error is no place to learn what the field wants.
        for key, bias in (value or {}).items():
            digits = key.strip()
            if not (digits.isascii() and digits.isdigit() and
                    len(digits) <= MAX_TOKEN_ID_DIGITS):
                shown = key if len(key) <= 24 else key[:24] + "..."
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), "
                                 f"got {shown!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return value

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a feature this server does not implement, if used."""
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed with stream=true"
        if self.guided_whitespace_pattern is not None:
            return "guided_whitespace_pattern", ("guided_whitespace_pattern is not supported "
                                                 "(xgrammar's JSON whitespace rules apply)")
        if self.prompt_logprobs is not None and self.stream:
            return "prompt_logprobs", "prompt_logprobs is not supported with stream=true"
        kind = (self.response_format or {}).get("type")
        if kind not in (None, "text", "json_object", "json_schema"):
            return "response_format", (f"response_format type {kind!r} is not supported (text, "
                                       f"json_object, json_schema)")
        return None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The request's one output constraint, or None; ValueError (a 400 naming the field)
        for a malformed one or more than one."""
        given = {}
        kind = (self.response_format or {}).get("type")
        if kind == "json_object":
            given["response_format"] = {"json_object": True}
        elif kind == "json_schema":
            spec = self.response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError("response_format json_schema needs a json_schema object with "
                                 "a 'schema' object")
            given["response_format"] = {"json": spec["schema"]}
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                          ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                given[name] = {key: getattr(self, name)}
        if self.structured_outputs is not None:
            given["structured_outputs"] = dict(self.structured_outputs)
        if not given:
            if self.guided_decoding_backend is not None:
                raise ValueError("guided_decoding_backend needs a guided_* constraint")
            return None
        if len(given) > 1:
            raise ValueError(f"give one output constraint, got {', '.join(sorted(given))}")
        (field_name, fields), = given.items()
        if self.guided_decoding_backend is not None:
            fields.setdefault("backend", self.guided_decoding_backend)
        try:
            return StructuredOutputsParams(**fields)
        except TypeError as exc:
            raise ValueError(f"{field_name}: {exc}") from None

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        structured_outputs: StructuredOutputsParams | None = None
                        ) -> SamplingParams:
        """The request's SamplingParams; structured_outputs: its structured_outputs_params()."""
        return SamplingParams(
            structured_outputs=structured_outputs,
            prompt_logprobs=self.prompt_logprobs,
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p, seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=(1.0 if self.repetition_penalty is None
                                else self.repetition_penalty),
            logit_bias=self.logit_bias,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output)


class CompletionRequest(_SamplingFields):
    # Tried in this order, and token ids before lists of strings: pydantic's default "smart"
    # union collects an error per element of every member it tries, which takes it 0.7 s for
    # a million token ids.
    prompt: str | list[int] | list[list[int]] | list[str] = Field(union_mode="left_to_right")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value):
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be an empty list")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: a string, a list of strings, token ids, or lists of them."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of must equal n (or be omitted)"
        if self.suffix:
            return "suffix", "suffix is not supported by this server"
        return super().unsupported()


class ChatContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer names the call it answers

    def as_template_message(self) -> dict:
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": text}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs=true"
        if self.tools and self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", ("tool_choice 'required' and named functions are not "
                                   "supported; use 'auto' (or 'none')")
        if self.continue_final_message and self.add_generation_prompt:
            return "continue_final_message", ("continue_final_message needs "
                                              "add_generation_prompt=false")
        return super().unsupported()

    def wants_tool_calls(self) -> bool:
        """Whether the request offers tools the model may call (tool_choice unset or auto)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


def _printable_name(value: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("must not contain control characters")
    return value


class LoadLoRAAdapterRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)

    _name_printable = field_validator("lora_name")(_printable_name)

    @field_validator("lora_path")
    @classmethod
    def _path_without_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain a NUL byte")
        return value


class UnloadLoRAAdapterRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None

    _name_printable = field_validator("lora_name")(_printable_name)


# -- responses (plain dicts are built in serving; these document and shape the non-streaming
# -- bodies and the model list) ------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "moelora"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a completion prompt, or chat messages rendered by the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if (self.prompt is None) == (self.messages is None):
            return "prompt", "give exactly one of prompt and messages"
        return None

    def chat_request(self) -> ChatCompletionRequest:
        """The chat request whose prompt this request asks to tokenise."""
        return ChatCompletionRequest(
            messages=self.messages, add_generation_prompt=self.add_generation_prompt,
            chat_template=self.chat_template, chat_template_kwargs=self.chat_template_kwargs)


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(min_length=1)
