"""Prompts from requests: tokenisation and chat-template rendering, off the event loop.

Both run in a small pool of worker threads, so a long prompt or a slow template never delays
another client (the tokenizer releases the GIL on long inputs; templates run under the time
and size limits of engine/chat_template.py). A chat template sent with a request is code from
the client: it is refused unless the server was started with --trust-request-chat-template,
as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

from moelora.entrypoints.openai.errors import APIError, bad_request
from moelora.entrypoints.openai.protocol import ChatCompletionRequest
from moelora.entrypoints.openai.workers import OffLoop

PROMPT_WORKERS = 4  # threads that tokenise and render; more requests queue for them


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]


class PromptBuilder:
    def __init__(self, tokenizer, vocab_size: int, trust_request_chat_template: bool = False,
                 workers: int = PROMPT_WORKERS):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.trust_request_chat_template = trust_request_chat_template
        self.workers = OffLoop("moelora-prompts", workers)

    def close(self) -> None:
        self.workers.close()

    # -- what the routes call ------------------------------------------------------------------
    def check_template_allowed(self, chat_template, chat_template_kwargs) -> None:
        """400 for a request-supplied template unless the server trusts them."""
        if self.trust_request_chat_template:
            return
        if chat_template is not None or "chat_template" in (chat_template_kwargs or {}):
            raise bad_request("a chat_template in the request is refused: the server runs only "
                              "its model's template unless started with "
                              "--trust-request-chat-template", "chat_template")

    async def completion_prompt(self, prompt) -> Prompt:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad_request("this model has no tokenizer: send the prompt as token ids",
                                  "prompt")
            if prompt == "":
                raise bad_request("the prompt is empty", "prompt")
            return Prompt(prompt, await self.workers.run(self.tokenizer.encode, prompt))
        ids = list(prompt)
        if not ids:
            raise bad_request("a prompt of token ids must not be empty", "prompt")
        await self.workers.run(self.check_token_ids, ids, "prompt")
        return Prompt(None, ids)

    async def chat_prompt(self, req: ChatCompletionRequest) -> Prompt:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer, so no chat template", "messages")
        self.check_template_allowed(req.chat_template, req.chat_template_kwargs)
        return await self.workers.run(self._render_and_encode, req)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return await self.workers.run(self.tokenizer.encode, text,
                                    add_special_tokens=add_special_tokens)

    async def decode(self, ids: list[int]) -> str:
        return await self.workers.run(self._check_and_decode, ids)

    async def ids_json(self, ids: list[int]) -> bytes:
        """`ids` as a JSON array, written in slices so that a long list never holds the GIL
        (and so the event loop) for long."""
        return await self.workers.run(_ids_json, ids)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"{param} token ids must be in [0, {self.vocab_size}), got "
                              f"{bad[0]}", param)

    # -- worker threads ------------------------------------------------------------------------
    def _check_and_decode(self, ids: list[int]) -> str:
        self.check_token_ids(ids, "tokens")
        return self.tokenizer.decode(ids)

    def _render_and_encode(self, req: ChatCompletionRequest) -> Prompt:
        messages = [m.as_template_message() for m in req.messages]
        kwargs = dict(req.chat_template_kwargs or {})
        try:
            if req.continue_final_message:
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=False, chat_template=req.chat_template,
                    **kwargs)
                last = messages[-1]["content"]
                end = text.rfind(last) if last else -1
                if end < 0:
                    raise ValueError("the final message is not in the rendered template")
                text = text[:end + len(last)]
            else:
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=req.add_generation_prompt,
                    chat_template=req.chat_template, **kwargs)
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - a template and its arguments are user input
            raise bad_request(f"cannot apply the chat template: {exc}", "messages") from None
        if not isinstance(text, str):
            raise bad_request("the chat template did not render to text", "messages")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise bad_request("the rendered chat prompt is empty", "messages")
        return Prompt(text, ids)


def _ids_json(ids: list[int], slice_len: int = 8192) -> bytes:
    parts = [b"["]
    for start in range(0, len(ids), slice_len):
        if start:
            parts.append(b",")
        parts.append(",".join(map(str, ids[start:start + slice_len])).encode())
    parts.append(b"]")
    return b"".join(parts)
