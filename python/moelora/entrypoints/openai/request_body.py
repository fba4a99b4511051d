"""Reading a request body before any model sees it.

Every POST body is read under a size limit (413 beyond it) and parsed as strict JSON (RFC 8259:
no NaN or Infinity literals); nesting too deep for the parser is a 400, and so is a string that
is not valid Unicode: a lone UTF-16 surrogate, which JSON can spell ("\\ud800") but UTF-8
cannot encode, so the tokenizer and the response writer would fail on it. Only a body that
spells a surrogate escape at all is searched for lone ones (emoji sent as escaped pairs are
fine). Nothing past this point has to guard against either.
"""

from __future__ import annotations

import json
import re

from fastapi import Request

from moelora.entrypoints.openai.errors import APIError, bad_request

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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
        raise bad_request(f"{what} nests too deeply", param) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"{what} is not valid JSON: {exc}", param) from None
    if not isinstance(data, dict):
        raise bad_request(f"{what} must be a JSON object", param)
    if _SURROGATE_ESCAPE.search(body):
        where = lone_surrogate_path(data)
        if where is not None:
            name = ".".join(_SURROGATE.sub("\ufffd", str(p)) for p in where) or None
            raise bad_request(f"{name or what}: a lone UTF-16 surrogate is not valid Unicode",
                              param or name)
    return data


def lone_surrogate_path(data) -> tuple | None:
    """The path (keys and indices) of the first string, value or key, that holds a lone
    surrogate; None when there is none. Iterative, and linear in the document's size at any
    depth: a container's path is kept as a link to its parent's, and spelled out only for the
    string that is found."""
    stack: list[tuple[object, tuple | None]] = [(data, None)]  # (container, (parent, key))
    while stack:
        container, link = stack.pop()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in items:
            if type(key) is str and _has_surrogate(key):
                return _spell(link, key)
            kind = type(item)
            if kind is str:
                if _has_surrogate(item):
                    return _spell(link, key)
            elif kind is dict or kind is list:
                stack.append((item, (link, key)))
    return None


def _spell(link: tuple | None, key) -> tuple:
    path = [key]
    while link is not None:
        link, parent_key = link
        path.append(parent_key)
    return tuple(reversed(path))


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (RFC 8259 has no NaN or Infinity)")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes (the server's "
                         f"--max-request-body-bytes)")
