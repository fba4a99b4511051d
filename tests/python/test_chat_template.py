"""The chat-template sandbox (engine/chat_template.py): ordinary templates render exactly as
plain jinja2 renders them, the way transformers sets jinja up; hostile ones are refused within
the time limit and before they allocate, and the renderer stays usable afterwards."""

from __future__ import annotations

import resource
import time

import jinja2
import pytest
from moelora.engine.chat_template import ChatTemplateRenderer, TemplateLimitError, TemplateLimits

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "x" * 500}]
TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
               "{% endif %}"),
    "llama": ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}<<SYS>>"
              "{{ m.content | trim }}<</SYS>>{% elif loop.index0 % 2 == 1 %}[INST] "
              "{{ m.content }} [/INST]{% else %}{{ m.content ~ ' ' ~ eos_token }}{% endif %}"
              "{% endfor %}"),
    "namespace": ("{% set ns = namespace(n=0, text='') %}{% for m in messages %}"
                  "{% set ns.n = ns.n + 1 %}{% set ns.text = ns.text + m.content[:3] %}"
                  "{% endfor %}{{ ns.n }}:{{ ns.text }}|{{ messages | map(attribute='role') | "
                  "join(',') }}|{{ '%05d' % 42 }}|{{ '{:>6}'.format('r') }}|"
                  "{{ 'ab' * 3 }}|{{ ('x' | center(7)) }}|{{ messages | length }}"),
    "loop_controls": ("{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
                      "{{ m.role[0] }}{% if loop.index > 2 %}{% break %}{% endif %}"
                      "{% endfor %}"),
}


def _reference(source: str, **variables) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True,
                             extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(source).render(**variables)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_ordinary_templates_render_as_jinja_does(name):
    renderer = ChatTemplateRenderer()
    variables = {"messages": MESSAGES, "add_generation_prompt": True, "bos_token": "<s>",
                 "eos_token": "</s>"}
    assert renderer.render(TEMPLATES[name], **variables) == _reference(TEMPLATES[name],
                                                                       **variables)


def test_tojson_takes_transformers_arguments():
    renderer = ChatTemplateRenderer()
    out = renderer.render("{{ tools | tojson(indent=2, sort_keys=True) }}|{{ 'é' | tojson }}",
                          tools=[{"b": 1, "a": [1, 2]}])
    assert out == '[\n  {\n    "a": [\n      1,\n      2\n    ],\n    "b": 1\n  }\n]|"é"'


HOSTILE = {
    "repeat": "{% set s = 'x' * 1000000000 %}{{ s }}",
    "list_repeat": "{{ ([0] * 100000000) | length }}",
    "power": "{{ 7 ** 100000000 }}",
    "tilde_doubling": ("{% set ns = namespace(s='x') %}{% for i in range(60) %}"
                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"),
    "plus_doubling": ("{% set ns = namespace(s='x') %}{% for i in range(60) %}"
                      "{% set ns.s = ns.s + ns.s %}{% endfor %}"),
    "center_filter": "{{ 'x' | center(1000000000) }}",
    "ljust_method": "{{ 'x'.ljust(1000000000) }}",
    "format_method": "{{ '{:>1000000000}'.format(1) }}",
    "percent": "{{ '%1000000000s' % 'x' }}",
    "format_filter": "{{ '%1000000000s' | format('x') }}",
    "join": "{{ (['y' * 1000000] * 1000) | join }}",
    "replace": "{{ ('x' * 100000) | replace('', 'yyyyyyyyyy' * 100) }}",
    "indent": "{{ ('\\n' * 100000) | indent(100000) }}",
    "batch": "{{ [1] | batch(1000000000, 0) | list | length }}",
    "tojson_indent": "{{ [[1]] | tojson(indent=1000000000) }}",
    "lipsum": "{{ lipsum(1000000000) }}",
    "set_block": ("{% set s %}{% for i in range(100000) %}{{ 'z' * 100 }}{% endfor %}"
                  "{% endset %}{{ s | length }}"),
    "nested_loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                     "{% endfor %}"),
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "mutation": "{% set l = [] %}{{ l.append(1) }}",
    "syntax": "{% for x in %}",
    "raise": "{{ raise_exception('refused by the template') }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_templates_are_refused_within_limits(name):
    limits = TemplateLimits(timeout_s=1.0)
    renderer = ChatTemplateRenderer(limits)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.monotonic()
    with pytest.raises(TemplateLimitError):
        renderer.render(HOSTILE[name], messages=MESSAGES)
    assert time.monotonic() - start < limits.timeout_s + 1.0
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert peak_growth < 512 << 20, f"peak RSS grew {peak_growth >> 20} MiB"
    # The renderer is fine afterwards (limits are per render, per thread).
    assert renderer.render("{{ messages[0].content }}", messages=MESSAGES) == "Be brief."


def test_the_limits_do_not_leak_into_the_thread():
    import sys

    before = sys.gettrace()
    with pytest.raises(TemplateLimitError):
        ChatTemplateRenderer(TemplateLimits(timeout_s=0.2)).render(HOSTILE["nested_loops"])
    assert sys.gettrace() is before
    total = 0
    for i in range(2_000_000):  # untraced, unhurried Python after a render
        total += i
    assert total == 1_999_999_000_000
