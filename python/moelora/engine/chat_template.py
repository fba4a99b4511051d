"""Chat templates rendered in jinja2's immutable sandbox, with limits on time and size.

A template is code: a model directory's is trusted configuration, a request's is user input.
Both are rendered the way transformers renders them (trim_blocks, lstrip_blocks, loop
controls, `raise_exception`, `strftime_now`, `tojson`) in an ImmutableSandboxedEnvironment
(no attribute escapes, no mutation of the inputs, `range` capped at 100,000 items), and every
render is bounded so that no template can hold its thread or fill memory:

- time: while a render runs, a trace function on its thread counts line events of the compiled
  template code and checks the deadline every 256 of them;
- size: the operations that can grow a value faster than the template runs (`*`, `**`, `%`,
  `+`, `~`, the output itself, and the filters and string methods that pad, repeat or join)
  check the size of their result before they allocate it, and the characters they produce in
  one render count against a budget, so a loop cannot pile up fresh strings either.

Exceeding a limit raises TemplateLimitError (a ValueError), as does a template error.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import Environment
from jinja2.exceptions import TemplateError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateLimitError(ValueError):
    """A chat template that failed, or went past a time or size limit."""


@dataclass(frozen=True)
class TemplateLimits:
    timeout_s: float = 2.0  # wall time of one render
    max_chars: int = 4 << 20  # longest string (the rendered prompt included)
    max_items: int = 1 << 20  # longest list
    budget_chars: int = 64 << 20  # characters the checked operations may produce in one render


class _Produced(threading.local):
    """Characters the checked operations made in the render running on this thread."""

    count: int = 0


class _LimitedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to a size-checked join instead of jinja's unchecked str_join."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


_PADDING_METHODS = {"center", "ljust", "rjust", "zfill"}
_FORMAT_NUMBER = re.compile(r"\d+")


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with size checks; limits come from TemplateLimits."""

    code_generator_class = _LimitedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, limits: TemplateLimits):
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=["jinja2.ext.loopcontrols"])
        self.limits = limits
        self.produced = _Produced()
        self.globals.pop("lipsum", None)  # lipsum(n) makes n paragraphs: nothing a chat needs
        self.globals["raise_exception"] = _raise_template_error
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.filters["tojson"] = self._tojson
        checks = {"center": self._check_center_filter, "indent": self._check_indent_filter,
                  "format": self._check_format_filter, "join": self._check_join_filter,
                  "replace": self._check_replace_filter, "batch": self._check_count_filter,
                  "slice": self._check_count_filter}
        for name, check in checks.items():
            self.filters[name] = _checked_filter(self.filters[name], check)

    # -- the size budget -----------------------------------------------------------------------
    def produce(self, size: int, what: str) -> None:
        """Counts `size` characters (or items) about to be made; refuses past a limit."""
        limits = self.limits
        if size > limits.max_chars:
            raise TemplateLimitError(f"chat template: {what} would make {size} characters, "
                                     f"more than the limit of {limits.max_chars}")
        self.produced.count += size
        if self.produced.count > limits.budget_chars:
            raise TemplateLimitError(f"chat template: the render produced more than "
                                     f"{limits.budget_chars} characters")

    def concat(self, parts) -> str:  # every output and {% set %} block is joined here
        return self.checked_concat(parts, "the output")

    def checked_concat(self, parts, what: str = "'~'") -> str:
        texts, total = [], 0
        for part in parts:
            text = part if isinstance(part, str) else str(part)
            total += len(text)
            if total > self.limits.max_chars:
                self.produce(total, what)
            texts.append(text)
        self.produce(total, what)
        return "".join(texts)

    # -- operators and method calls from template code -----------------------------------------
    def call_binop(self, context, operator: str, left, right):
        if operator == "*":
            self._check_repeat(left, right)
            self._check_repeat(right, left)
        elif operator == "+" and _sized(left) and _sized(right):
            self._check_length(left, len(left) + len(right), "'+'")
        elif operator == "**" and _is_int(left) and _is_int(right) and abs(left) > 1:
            if right > 0 and left.bit_length() * right > 64 * self.limits.max_chars:
                raise TemplateLimitError("chat template: '**' would make an enormous integer")
        elif operator == "%" and isinstance(left, str):
            args = right if isinstance(right, tuple) else (right,)
            self._check_format(left, args, {}, "'%'")
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):
            self._check_str_method(owner, getattr(method, "__name__", ""), args, kwargs)
        return super().call(context, obj, *args, **kwargs)

    def _check_length(self, value, size: int, what: str) -> None:
        if isinstance(value, (list, tuple)) and size > self.limits.max_items:
            raise TemplateLimitError(f"chat template: {what} would make a list of {size} "
                                     f"items, more than the limit of {self.limits.max_items}")
        self.produce(size, what)

    def _check_repeat(self, value, times) -> None:
        if _sized(value) and _is_int(times):
            self._check_length(value, len(value) * max(times, 0), "'*'")

    def _check_format(self, fmt: str, args, kwargs, what: str) -> None:
        numbers = [int(n) for n in _FORMAT_NUMBER.findall(fmt)]
        values = (*args, *kwargs.values())
        numbers += [a for a in values if _is_int(a)]
        texts = sum(len(a) for a in values if isinstance(a, str))
        self.produce(len(fmt) + max([0, *numbers]) + texts, what)

    def _check_str_method(self, text: str, name: str, args, kwargs) -> None:
        if name in _PADDING_METHODS:
            width = args[0] if args else kwargs.get("width", 0)
            if _is_int(width):
                self.produce(max(len(text), width), f"str.{name}")
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            if _is_int(tab):
                self.produce(len(text) * max(tab, 1), "str.expandtabs")
        elif name in ("format", "format_map"):
            self._check_format(text, args, kwargs, f"str.{name}")
        elif name == "join" and args:
            self._check_join(args[0], text)
        elif name == "replace" and len(args) >= 2:
            self._check_replace(text, args[0], args[1])

    def _check_join(self, items, separator) -> None:
        if isinstance(items, (list, tuple)):
            size = sum(len(i) if isinstance(i, str) else 0 for i in items)
            self.produce(size + len(str(separator)) * len(items), "join")

    def _check_replace(self, text, old, new) -> None:
        if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
            count = text.count(old) if old else len(text) + 1
            self.produce(len(text) + count * len(new), "replace")

    # -- filters (called directly by compiled code, so wrapped one by one) ---------------------
    def _check_center_filter(self, value, width=80, *_, **__) -> None:
        if _is_int(width):
            self.produce(max(len(str(value)), width), "center")

    def _check_indent_filter(self, value, width=4, *_, **__) -> None:
        text = str(value)
        per_line = width if _is_int(width) else len(str(width))
        self.produce(len(text) + (text.count("\n") + 1) * max(per_line, 0), "indent")

    def _check_format_filter(self, value, *args, **kwargs) -> None:
        if isinstance(value, str):
            self._check_format(value, args, kwargs, "format")

    def _check_join_filter(self, value, d="", *_, **__) -> None:
        self._check_join(value, d)

    def _check_replace_filter(self, value, old=None, new=None, *_, **__) -> None:
        self._check_replace(value, old, new)

    def _check_count_filter(self, value, count=1, *_, **__) -> None:
        if _is_int(count) and count > self.limits.max_items:
            raise TemplateLimitError(f"chat template: {count} parts is more than the limit "
                                     f"of {self.limits.max_items}")

    def _tojson(self, value, ensure_ascii=False, indent=None, separators=None,
                sort_keys=False):
        if _is_int(indent) and not 0 <= indent <= 16:
            raise TemplateLimitError("chat template: tojson indent must be in [0, 16]")
        text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)
        self.produce(len(text), "tojson")
        return text


def _checked_filter(flt, check):
    """`flt` with `check(value, *args, **kwargs)` run first; jinja's context arguments (of
    pass_environment / pass_eval_context / pass_context filters) are skipped for the check."""

    @functools.wraps(flt)  # keeps jinja's pass_* mark, so jinja passes the same arguments
    def checked(*args, **kwargs):
        skip = 0
        while skip < len(args) and isinstance(args[skip], (Environment, EvalContext, Context)):
            skip += 1
        if skip < len(args):
            values = _materialised(args[skip:])
            check(*values, **kwargs)
            args = (*args[:skip], *values)
        return flt(*args, **kwargs)

    return checked


def _materialised(values: tuple) -> tuple:
    # A generator (`map`, `select`) would be used up by the check: both see one list.
    first = values[0]
    if not isinstance(first, (str, list, tuple, dict)) and hasattr(first, "__iter__"):
        return (list(first), *values[1:])
    return values


class ChatTemplateRenderer:
    """Renders chat templates under TemplateLimits; compiled templates are cached by source.
    Thread-safe: the size budget and the deadline of a render belong to its thread."""

    def __init__(self, limits: TemplateLimits | None = None, cache_size: int = 32):
        self.limits = limits or TemplateLimits()
        self.sandbox = LimitedSandbox(self.limits)
        self._compile = functools.lru_cache(maxsize=cache_size)(self.sandbox.from_string)

    def render(self, source: str, **variables) -> str:
        try:
            template = self._compile(source)
        except TemplateError as exc:
            raise TemplateLimitError(f"chat template does not compile: {exc}") from None
        self.sandbox.produced.count = 0
        previous = sys.gettrace()
        sys.settrace(_deadline_tracer(self.limits.timeout_s))
        try:
            return template.render(**variables)
        except TemplateLimitError:
            raise
        except RecursionError:
            raise TemplateLimitError("chat template: recursion too deep") from None
        except MemoryError:
            raise TemplateLimitError("chat template: out of memory") from None
        except Exception as exc:  # noqa: BLE001 - every failure inside a render is the template's
            raise TemplateLimitError(f"chat template error: {type(exc).__name__}: "
                                     f"{exc}") from None
        finally:
            sys.settrace(previous)


def _deadline_tracer(timeout_s: float):
    """A trace function for sys.settrace that raises TemplateLimitError once `timeout_s` has
    passed; only frames of compiled templates ("<template>") are traced line by line."""
    deadline = time.monotonic() + timeout_s
    events = 0

    def lines(frame, event, arg):
        nonlocal events
        events += 1
        if events & 255 == 0 and time.monotonic() > deadline:
            raise TemplateLimitError(f"chat template: rendering took longer than {timeout_s} s")
        return lines

    def calls(frame, event, arg):
        return lines if frame.f_code.co_filename == "<template>" else None

    return calls


def _raise_template_error(message: str):
    raise TemplateLimitError(f"chat template error: {message}")


def _sized(value) -> bool:
    return isinstance(value, (str, list, tuple, bytes))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
