"""Reading a request body before any model sees it.

Every POST body is read under a size limit (413 beyond it), parsed as strict JSON (RFC 8259:
no NaN or Infinity literals), and walked once: nesting deeper than MAX_NESTING and strings that
are not valid Unicode (lone UTF-16 surrogates such as "\\ud800", which JSON can spell but UTF-8
cannot encode, so the tokenizer and the response writer would fail on them) are refused with a
400 naming the field. Nothing past this point has to guard against either.
"""

from __future__ import annotations

import json
import re

from fastapi import Request

from moelora.entrypoints.openai.errors import APIError, bad_request

MAX_NESTING = 64  # no request field nests deeper than a few levels

_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_body(raw: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it passes `limit` bytes (announced or streamed)."""
    announced = raw.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in raw.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(body: bytes, what: str = "the request body",
                      param: str | None = None) -> dict:
    """`body` as a JSON object whose every string is valid Unicode; 400 otherwise. `what`
    names the document in messages (a request body, an adapter's config file)."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise bad_request(f"{what} nests deeper than {MAX_NESTING} levels", param) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"{what} is not valid JSON: {exc}", param) from None
    if not isinstance(data, dict):
        raise bad_request(f"{what} must be a JSON object", param)
    check_values(data, what)
    return data


def check_values(data: dict, what: str = "the request body") -> None:
    """Refuses nesting beyond MAX_NESTING and strings (values or keys) with lone surrogates.
    Iterative, so a hostile document cannot exhaust the stack here."""
    stack: list[tuple[object, tuple, int]] = [(data, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_NESTING:
                raise bad_request(f"{what} nests deeper than {MAX_NESTING} levels",
                                  _param(path))
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key, path + (key,))
                    stack.append((item, path + (key,), depth + 1))
            else:
                stack.extend((item, path + (i,), depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: tuple) -> None:
    found = _SURROGATE.search(text)
    if found is not None:
        where = _param(path)
        raise bad_request(f"{where or 'the request body'}: a lone UTF-16 surrogate "
                          f"(\\u{ord(found.group()):04x}) is not valid Unicode", where)


def _param(path: tuple) -> str | None:
    # A key with a surrogate must not leak into the param either.
    parts = [_SURROGATE.sub("\ufffd", str(p)) for p in path]
    return ".".join(parts) or None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (RFC 8259 has no NaN or Infinity)")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes (the server's "
                         f"--max-request-body-bytes)")
