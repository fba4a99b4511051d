"""/v1/completions and /v1/chat/completions: requests in, engine requests out, responses (or
SSE chunks) back.

One engine request per prompt (a completions batch of k prompts with n samples gives k*n
choices, indexed prompt-major). Streaming sends text deltas; while stop strings are active the
last (longest stop - 1) characters are held back, so text that a stop string later removes is
never sent, and an incomplete UTF-8 character is never sent half.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from moelora.engine.async_engine import AsyncEngine, RequestStream
from moelora.entrypoints.openai.errors import (
    bad_request,
    from_engine_error,
    from_failed_output,
    from_validation_error,
    overloaded,
)
from moelora.entrypoints.openai.logprobs import LogprobFormatter, finite_logprob
from moelora.entrypoints.openai.prompts import Prompt, PromptBuilder
from moelora.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    random_id,
)
from moelora.entrypoints.openai.serving_models import ServingModels
from moelora.entrypoints.openai.streaming import SSEResponse, run_until_disconnect, sse
from moelora.entrypoints.openai.tool_parsers import (
    assistant_message,
    completion_chunks,
    tool_parser,
)

_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens",
                    "logprobs", "seed", "stop", "stop_token_ids", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "logit_bias",
                    "prompt_logprobs")
_CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice",
                      "guided_grammar", "structured_outputs")


class _Choice:
    """How much of one choice has been sent."""

    def __init__(self):
        self.sent_chars = 0
        self.sent_tokens = 0
        self.started = False
        self.finished = False

    def advance(self, output, hold: int, with_logprobs: bool):
        """(new text, first new token, end token, finish_reason) or None if nothing to send."""
        if self.finished:
            return None
        text = output.text
        finishing = output.finish_reason is not None
        limit = len(text) if finishing else _safe_length(text, hold)
        new_text = text[self.sent_chars:limit] if limit > self.sent_chars else ""
        end = len(output.token_ids)
        new_tokens = end > self.sent_tokens and (with_logprobs or finishing or bool(new_text))
        if not new_text and not new_tokens and not finishing:
            return None
        start = self.sent_tokens
        self.sent_chars = max(self.sent_chars, limit)
        self.sent_tokens = end
        self.finished = finishing
        return new_text, start, end, output.finish_reason


def _safe_length(text: str, hold: int) -> int:
    limit = max(0, len(text) - hold)
    # A trailing U+FFFD may be a UTF-8 character whose last bytes are still to come (a decoder
    # gives one U+FFFD for an incomplete sequence): hold it back. Earlier ones are final.
    if limit > 0 and text[limit - 1] == "\ufffd":
        limit -= 1
    return limit


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, models: ServingModels, tokenizer, max_model_len: int,
                 vocab_size: int, max_waiting_requests: int | None = None,
                 trust_request_chat_template: bool = False, tool_call_parser: str | None = None):
        self.engine = engine
        # --enable-auto-tool-choice's parser, or None: requests offering tools answer 400
        self.tool_parser = tool_parser(tool_call_parser) if tool_call_parser else None
        self.models = models
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_waiting_requests = max_waiting_requests
        self.prompts = PromptBuilder(tokenizer, vocab_size, trust_request_chat_template)
        self.logprobs = LogprobFormatter(tokenizer)

    def close(self) -> None:
        self.prompts.close()

    # -- /v1/completions -----------------------------------------------------------------------
    async def create_completion(self, req: CompletionRequest, raw: Request) -> Response:
        lora = self._admit(req)
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs is not supported (no prompt logprobs)", "echo")
        prompts = [await self.prompts.completion_prompt(p) for p in req.prompts()]
        params = self._params(req, prompts, req.max_tokens, req.logprobs, "prompt")
        await self._check_constraint(req, params)
        request_id = random_id("cmpl")
        streams = await self._start(request_id, prompts, params, lora)
        created, model = int(time.time()), req.model or self.models.base_name
        if req.stream:
            body = self._completion_stream(req, request_id, created, model, prompts, streams,
                                           lora)
            return SSEResponse(body, on_close=lambda: _close_all(streams))
        return await run_until_disconnect(raw, self._completion_full(
            req, request_id, created, model, prompts, streams, lora))

    async def _completion_full(self, req, request_id, created, model, prompts, streams, lora):
        finals = await _collect(streams)
        choices, completion_tokens = [], 0
        for i, output in enumerate(finals):
            for o in output.outputs:
                self._raise_if_failed(o, lora)
                text = (self._echo(prompts[i]) + o.text) if req.echo else o.text
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self.logprobs.completion(o.logprobs or [], o.token_ids, 0,
                                                        req.return_tokens_as_token_ids)
                choices.append({"index": i * req.n + o.index, "text": text, "logprobs": logprobs,
                                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                                **self._prompt_logprobs(req, output)})
                completion_tokens += len(o.token_ids)
        choices.sort(key=lambda c: c["index"])
        return JSONResponse({"id": request_id, "object": "text_completion", "created": created,
                             "model": model, "choices": choices,
                             "usage": _usage(prompts, completion_tokens)})

    async def _completion_stream(self, req, request_id, created, model, prompts, streams,
                                 lora) -> AsyncIterator[str]:
        states: dict[int, _Choice] = {}
        hold = _holdback(req.stop)
        options = req.stream_options
        completion_tokens = 0

        def chunk(choices, usage=None):
            body = {"id": request_id, "object": "text_completion", "created": created,
                    "model": model, "choices": choices}
            if options is not None and (options.include_usage or options.continuous_usage_stats):
                body["usage"] = usage
            return sse(body)

        try:
            async for i, output in _merge(streams):
                for o in output.outputs:
                    self._raise_if_failed(o, lora)
                    index = i * req.n + o.index
                    state = states.setdefault(index, _Choice())
                    step = state.advance(o, hold, req.logprobs is not None)
                    if step is None:
                        continue
                    text, start, end, finish = step
                    completion_tokens += end - start
                    offset = state.sent_chars - len(text)
                    if req.echo and not state.started:
                        text = self._echo(prompts[i]) + text
                    state.started = True
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = self.logprobs.completion(
                            (o.logprobs or [])[start:end], o.token_ids[start:end], offset,
                            req.return_tokens_as_token_ids)
                    usage = None
                    if options is not None and options.continuous_usage_stats:
                        usage = _usage(prompts, completion_tokens)
                    yield chunk([{"index": index, "text": text, "logprobs": logprobs,
                                  "finish_reason": finish,
                                  "stop_reason": o.stop_reason if finish else None}], usage)
            if options is not None and options.include_usage:
                yield chunk([], _usage(prompts, completion_tokens))
        except Exception as exc:  # noqa: BLE001 - reported in the stream, as vLLM does
            yield sse(from_engine_error(exc).body())
        yield "data: [DONE]\n\n"

    # -- /v1/chat/completions ------------------------------------------------------------------
    async def create_chat_completion(self, req: ChatCompletionRequest, raw: Request) -> Response:
        lora = self._admit(req)
        parser = None
        if req.wants_tool_calls():
            if self.tool_parser is None:
                raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and '
                                  '--tool-call-parser to be set', "tool_choice")
            parser = self.tool_parser
        prompt = await self.prompts.chat_prompt(req)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, [prompt], req.requested_max_tokens(), top, "messages")
        await self._check_constraint(req, params)
        request_id = random_id("chatcmpl")
        streams = await self._start(request_id, [prompt], params, lora)
        created, model = int(time.time()), req.model or self.models.base_name
        if req.stream and parser is not None:
            # calls are read from the whole output: it streams once it is complete
            return SSEResponse(self._chat_tool_stream(req, request_id, created, model, prompt,
                                                      streams, lora, parser),
                               on_close=lambda: _close_all(streams))
        if req.stream:
            return SSEResponse(self._chat_stream(req, request_id, created, model, prompt,
                                                 streams, lora),
                               on_close=lambda: _close_all(streams))
        return await run_until_disconnect(raw, self._chat_full(req, request_id, created, model,
                                                               prompt, streams, lora, parser))

    async def _chat_full(self, req, request_id, created, model, prompt, streams, lora,
                         parser=None):
        return JSONResponse(await self._chat_body(req, request_id, created, model, prompt,
                                                  streams, lora, parser))

    async def _chat_body(self, req, request_id, created, model, prompt, streams, lora,
                         parser) -> dict:
        (final,) = await _collect(streams)
        choices, completion_tokens = [], 0
        for o in final.outputs:
            self._raise_if_failed(o, lora)
            logprobs = None
            if req.logprobs:
                logprobs = self.logprobs.chat(o.logprobs or [], o.token_ids,
                                              req.return_tokens_as_token_ids)
            message, finish = {"role": "assistant", "content": o.text}, o.finish_reason
            if parser is not None:
                message, finish = assistant_message(parser.extract(o.text), finish)
            choices.append({"index": o.index, "message": message, "logprobs": logprobs,
                            "finish_reason": finish, "stop_reason": o.stop_reason,
                            **self._prompt_logprobs(req, final)})
            completion_tokens += len(o.token_ids)
        choices.sort(key=lambda c: c["index"])
        return {"id": request_id, "object": "chat.completion", "created": created,
                "model": model, "choices": choices,
                "usage": _usage([prompt], completion_tokens)}

    async def _chat_tool_stream(self, req, request_id, created, model, prompt, streams, lora,
                                parser) -> AsyncIterator[str]:
        try:
            body = await self._chat_body(req, request_id, created, model, prompt, streams,
                                         lora, parser)
            options = req.stream_options
            for chunk in completion_chunks(body, include_usage=bool(
                    options and options.include_usage)):
                yield sse(chunk)
        except Exception as exc:  # noqa: BLE001 - reported in the stream, as vLLM does
            yield sse(from_engine_error(exc).body())
        yield "data: [DONE]\n\n"

    async def _chat_stream(self, req, request_id, created, model, prompt, streams,
                           lora) -> AsyncIterator[str]:
        states: dict[int, _Choice] = {}
        hold = _holdback(req.stop)
        options = req.stream_options
        completion_tokens = 0

        def chunk(choices, usage=None):
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": choices}
            if options is not None and (options.include_usage or options.continuous_usage_stats):
                body["usage"] = usage
            return sse(body)

        try:
            for index in range(req.n):  # the role comes first, as OpenAI sends it
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            async for _, output in _merge(streams):
                for o in output.outputs:
                    self._raise_if_failed(o, lora)
                    state = states.setdefault(o.index, _Choice())
                    step = state.advance(o, hold, req.logprobs)
                    if step is None:
                        continue
                    text, start, end, finish = step
                    completion_tokens += end - start
                    logprobs = None
                    if req.logprobs:
                        logprobs = self.logprobs.chat((o.logprobs or [])[start:end],
                                                      o.token_ids[start:end],
                                                      req.return_tokens_as_token_ids)
                    usage = None
                    if options is not None and options.continuous_usage_stats:
                        usage = _usage([prompt], completion_tokens)
                    delta = {"content": text} if text or not finish else {}
                    yield chunk([{"index": o.index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish,
                                  "stop_reason": o.stop_reason if finish else None}], usage)
            if options is not None and options.include_usage:
                yield chunk([], _usage([prompt], completion_tokens))
        except Exception as exc:  # noqa: BLE001 - reported in the stream, as vLLM does
            yield sse(from_engine_error(exc).body())
        yield "data: [DONE]\n\n"

    # -- tokenizer endpoints (vLLM's /tokenize and /detokenize) --------------------------------
    async def tokenize(self, req: TokenizeRequest) -> Response:
        problem = req.unsupported()
        if problem is not None:
            raise bad_request(problem[1], problem[0])
        self.models.resolve(req.model)  # 404 for an unknown model name
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer", "prompt")
        if req.messages is not None:
            try:
                chat = req.chat_request()
            except ValidationError as exc:  # the fields the two requests do not share
                raise from_validation_error(exc) from exc
            ids = (await self.prompts.chat_prompt(chat)).token_ids
        else:
            ids = await self.prompts.encode(req.prompt, req.add_special_tokens)
        # Written off the loop: a million token ids take json.dumps 0.1 s under the GIL.
        body = (b'{"count":%d,"max_model_len":%d,"tokens":' % (len(ids), self.max_model_len) +
                await self.prompts.ids_json(ids) + b"}")
        return Response(body, media_type="application/json")

    async def detokenize(self, req: DetokenizeRequest) -> dict:
        self.models.resolve(req.model)
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer", "tokens")
        return {"prompt": await self.prompts.decode(req.tokens)}

    # -- shared steps --------------------------------------------------------------------------
    def _admit(self, req):
        """Checks what needs no tokenizing: unsupported fields, the model, the load."""
        problem = req.unsupported()
        if problem is not None:
            raise bad_request(problem[1], problem[0])
        lora = self.models.resolve(req.model)
        limit = self.max_waiting_requests
        if limit is not None and self.engine.num_waiting >= limit:
            raise overloaded(f"the server is overloaded ({self.engine.num_waiting} requests "
                             f"waiting, limit {limit}); retry later")
        return lora

    def _params(self, req, prompts: list[Prompt], max_tokens: int | None,
                logprobs: int | None, prompt_param: str):
        longest = max(len(p.token_ids) for p in prompts)
        if longest >= self.max_model_len:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} "
                              f"tokens. However, your prompt has {longest} tokens. Please "
                              f"reduce the length of the {prompt_param}.", prompt_param)
        if max_tokens is None:
            max_tokens = self.max_model_len - longest
        elif longest + max_tokens > self.max_model_len:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} "
                              f"tokens. However, you requested {longest + max_tokens} tokens "
                              f"({longest} in the {prompt_param}, {max_tokens} in the "
                              f"completion). Please reduce the length of the {prompt_param} or "
                              f"completion.", "max_tokens")
        if req.stop_token_ids and any(t >= self.vocab_size for t in req.stop_token_ids):
            raise bad_request(f"stop_token_ids must be < {self.vocab_size}", "stop_token_ids")
        if req.logit_bias and any(str(t).isdigit() and int(t) >= self.vocab_size
                                  for t in req.logit_bias):
            raise bad_request(f"logit_bias token ids must be < {self.vocab_size}", "logit_bias")
        try:
            constraint = req.structured_outputs_params()
        except ValueError as exc:
            raise bad_request(str(exc), _constraint_field(req)) from exc
        try:
            return req.sampling_params(max_tokens, logprobs, constraint)
        except ValueError as exc:
            message = str(exc)
            name = message.split(" ", 1)[0]
            raise bad_request(message, name if name in _SAMPLING_FIELDS else None) from exc

    async def _check_constraint(self, req, params) -> None:
        """Compiles the request's output constraint before it queues, so that a schema, regex
        or grammar that does not compile answers 400 naming its field (the engine then finds the
        compilation in the pool's cache)."""
        if params.structured_outputs is None:
            return
        try:
            pool = await asyncio.to_thread(self.engine.engine.grammar_pool)
            await asyncio.wrap_future(pool.compile(params.structured_outputs))
        except ValueError as exc:
            raise bad_request(str(exc), _constraint_field(req)) from exc

    def _prompt_logprobs(self, req, output) -> dict:
        """{"prompt_logprobs": [...]} as vLLM answers it (None for the first prompt token, then
        {token id: {logprob, rank, decoded_token}} per token), or {} when not asked."""
        if req.prompt_logprobs is None:
            return {}
        entries = []
        for position in output.prompt_logprobs or []:
            if position is None:
                entries.append(None)
                continue
            entries.append({str(token): {"logprob": finite_logprob(lp.logprob), "rank": lp.rank,
                                         "decoded_token": lp.decoded_token}
                            for token, lp in position.items()})
        return {"prompt_logprobs": entries}

    async def _start(self, request_id: str, prompts: list[Prompt], params,
                     lora) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                engine_prompt = {"prompt_token_ids": prompt.token_ids, "prompt": prompt.text}
                streams.append(await self.engine.add_request(
                    f"{request_id}-{i}", engine_prompt, params, lora,
                    prompt_len=len(prompt.token_ids)))
        except BaseException as exc:
            for stream in streams:
                stream.close()
            if isinstance(exc, Exception):
                raise from_engine_error(exc) from exc
            raise
        return streams

    def _echo(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids) if self.tokenizer is not None else ""

    def _raise_if_failed(self, output, lora) -> None:
        """Raises the client's error for an output that ended with finish_reason "error"; an
        adapter that failed stops being offered (it is no longer listed in /v1/models)."""
        if output.finish_reason != "error":
            return
        error = from_failed_output(output)
        if lora is not None and getattr(output, "error_type", None) == "adapter_error":
            self.models.mark_failed(lora.lora_name, error.message)
        raise error


def _holdback(stop) -> int:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    return max((len(s) for s in stops), default=1) - 1


def _usage(prompts: list[Prompt], completion_tokens: int) -> dict:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


async def _collect(streams: list[RequestStream]):
    finals = [None] * len(streams)
    try:
        async for i, output in _merge(streams):
            finals[i] = output
    except Exception as exc:
        raise from_engine_error(exc) from exc
    return finals


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, object]]:
    """(stream index, output) from several request streams as they come. Leaving early (or
    being cancelled) aborts every request still running."""
    try:
        if len(streams) == 1:
            async for output in streams[0]:
                yield 0, output
            return
        merged: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    merged.put_nowait((index, output))
            except Exception as exc:  # noqa: BLE001 - re-raised by the reader
                merged.put_nowait((index, exc))
            merged.put_nowait((index, done))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                index, item = await merged.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
    finally:
        for stream in streams:
            stream.close()


def _constraint_field(req) -> str | None:
    """The field that carried a request's output constraint (for a 400's param)."""
    for name in _CONSTRAINT_FIELDS:
        if getattr(req, name, None) is not None:
            return name
    return "guided_decoding_backend" if req.guided_decoding_backend is not None else None
