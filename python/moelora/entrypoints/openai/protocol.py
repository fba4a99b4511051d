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
        return None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
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

    def as_template_message(self) -> dict:
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


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
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs=true"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format", "only response_format type 'text' is supported"
        if self.tools and self.tool_choice not in (None, "none"):
            return "tools", "tool calling is not supported by this server"
        if self.continue_final_message and self.add_generation_prompt:
            return "continue_final_message", ("continue_final_message needs "
                                              "add_generation_prompt=false")
        return super().unsupported()

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
