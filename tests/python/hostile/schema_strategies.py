"""Hypothesis strategies for request bodies, read from the server's own /openapi.json.

Half the bodies conform to their schema (types, bounds, enums: valid values, so requests get
past validation into the engine); in the other half each property is, one time in four, drawn
from a pool of hostile values instead: wrong types, lone UTF-16 surrogates, NUL bytes, integers
past every bound, deep nesting, long strings, and unknown keys. Bodies are sent as ASCII JSON
(lone surrogates spelled as \\ud800 escapes, which is how a client can send them).
"""

from __future__ import annotations

from hypothesis import strategies as st

SURROGATES = ["\ud800", "\udfff", "a\udc80b", "\ud83d"]  # lone halves, not pairs
HOSTILE_STRINGS = [*SURROGATES, "\x00", "a\x00b", "", " ", "\u202e\u0000\uffff", "💥" * 50,
                   "x" * 20_000, "../../../../etc/passwd", "/etc/passwd", "%s%n%x", "{{ 7*7 }}",
                   "\\", "\"", "null", "NaN", "-1", "9" * 5000]
HOSTILE_NUMBERS = [-1, 0, 2 ** 31, 2 ** 63, -(2 ** 63) - 1, 10 ** 30, 10 ** 4000, 1e308, -1e308,
                   1.5, -0.0, 5e-324]


def _deep(depth: int):
    value: object = 0
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


HOSTILE_VALUES = st.sampled_from([
    *HOSTILE_STRINGS, *HOSTILE_NUMBERS, None, True, False, [], {}, [None], {"": None},
    [[[[[]]]]], _deep(70), _deep(500), list(range(300)), {str(i): i for i in range(50)},
    {"\ud800": 1}, [1, "a", None, {}],
])


class SchemaStrategies:
    """Strategies for the bodies of one OpenAPI document; `overrides` give property names a
    strategy of their own (e.g. `model` drawn from the served names)."""

    def __init__(self, openapi: dict, overrides: dict | None = None):
        self.components = openapi.get("components", {}).get("schemas", {})
        self.overrides = overrides or {}

    def body(self, schema: dict) -> st.SearchStrategy:
        """A JSON object for `schema`: conforming, or with hostile values and keys."""
        schema = self._resolve(schema)
        conforming = self._object(schema, hostile=False)
        hostile = self._object(schema, hostile=True)
        extra = st.dictionaries(st.sampled_from(["x", "__proto__", "\ud800", "prompt ", ""]),
                                HOSTILE_VALUES, min_size=1, max_size=2)
        return st.one_of(conforming, conforming, hostile,
                         st.builds(lambda b, e: {**e, **b}, hostile, extra))

    def _object(self, schema: dict, hostile: bool) -> st.SearchStrategy:
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        fields = {name: self._field(name, sub, hostile) for name, sub in properties.items()}
        return st.fixed_dictionaries(
            {k: v for k, v in fields.items() if k in required},
            optional={k: v for k, v in fields.items() if k not in required})

    def _field(self, name: str, schema: dict, hostile: bool) -> st.SearchStrategy:
        conforming = self.overrides[name] if name in self.overrides else self.value(schema)
        return st.one_of(conforming, conforming, conforming, HOSTILE_VALUES) if hostile \
            else conforming

    def value(self, schema: dict, depth: int = 0) -> st.SearchStrategy:
        schema = self._resolve(schema)
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return st.one_of([self.value(s, depth) for s in schema[key]])
        kind = schema.get("type")
        if kind == "object" or "properties" in schema:
            if "properties" in schema and depth < 3:
                props = {n: self.value(s, depth + 1) for n, s in schema["properties"].items()}
                required = set(schema.get("required", []))
                return st.fixed_dictionaries(
                    {k: v for k, v in props.items() if k in required},
                    optional={k: v for k, v in props.items() if k not in required})
            values = self.value(schema.get("additionalProperties") or {}, depth + 1)
            return st.dictionaries(st.text(max_size=8), values, max_size=4)
        if kind == "array":
            items = self.value(schema.get("items", {}), depth + 1)
            low = schema.get("minItems", 0)
            return st.lists(items, min_size=low, max_size=max(low, 4))
        if kind == "integer":
            low, high = schema.get("minimum"), schema.get("maximum")
            if "exclusiveMinimum" in schema:
                low = schema["exclusiveMinimum"] + 1
            if "exclusiveMaximum" in schema:
                high = schema["exclusiveMaximum"] - 1
            low = -5 if low is None else low
            return st.integers(low, min(high if high is not None else 400, low + 400))
        if kind == "number":
            low, high = schema.get("minimum", -3.0), schema.get("maximum", 3.0)
            if "exclusiveMinimum" in schema:
                low = schema["exclusiveMinimum"] + 1e-3
            return st.floats(low, max(low, min(high, low + 10.0)), allow_nan=False)
        if kind == "string":
            return st.text(max_size=24)
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        return st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                            lambda inner: st.lists(inner, max_size=3) |
                            st.dictionaries(st.text(max_size=4), inner, max_size=3),
                            max_leaves=6)

    def _resolve(self, schema) -> dict:
        if not isinstance(schema, dict):  # `true` (anything) or `false`
            return {}
        while "$ref" in schema:
            schema = self.components[schema["$ref"].rsplit("/", 1)[-1]]
        return schema
