"""Structured-output constraints of a request, with vLLM's offline names.

    SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))
    SamplingParams(guided_decoding=GuidedDecodingParams(regex=r"\\d+"))   # vLLM's older name

Exactly one constraint per request: `json` (a JSON schema, as a dict or a JSON string), `regex`,
`choice` (a list of strings), `grammar` (EBNF in xgrammar's GBNF dialect) or `json_object=True`
(any JSON object). The engine compiles it with xgrammar (engine/grammar.py) and masks every
sampled token to the tokens the grammar allows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")
BACKENDS = (None, "auto", "xgrammar")


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # Whether JSON may carry whitespace between tokens beyond one space (vLLM's default: any)
    disable_any_whitespace: bool = False
    backend: str | None = None  # accepted for vLLM's scripts: xgrammar is the only backend

    def __post_init__(self) -> None:
        given = [name for name in CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            listed = ", ".join(given) if given else "none"
            raise ValueError(f"structured outputs take exactly one of {', '.join(CONSTRAINTS)}; "
                             f"got {listed}")
        if self.backend not in BACKENDS:
            raise ValueError(f"structured outputs backend {self.backend!r} is not available: "
                             f"moelora uses xgrammar")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("disable_any_whitespace must be true or false")  # noqa: TRY004
        if self.json is not None:
            self.json = _schema_text(self.json)
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"regex must be a string, got {type(self.regex).__name__}")
        if self.grammar is not None and (not isinstance(self.grammar, str)
                                         or not self.grammar.strip()):
            raise ValueError("grammar must be a non-empty string (EBNF)")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or any(not isinstance(c, str) or c == "" for c in self.choice)):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)
        if self.json_object is not None and self.json_object is not True:
            raise ValueError("json_object must be true when given")

    @property
    def kind(self) -> str:
        """The one constraint given: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(name for name in CONSTRAINTS if getattr(self, name) not in (None, False))

    def cache_key(self) -> tuple:
        """Equal for constraints that compile to the same grammar."""
        kind = self.kind
        value = getattr(self, kind)
        return (kind, tuple(value) if kind == "choice" else value,
                self.disable_any_whitespace if kind == "json" else None)


class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's earlier name for StructuredOutputsParams, same fields."""


def _schema_text(schema) -> str:
    """A JSON schema given as a dict or a JSON string, as canonical JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise ValueError(f"json: the schema is not valid JSON ({error})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"json: the schema must be a JSON object, got "  # noqa: TRY004
                         f"{type(schema).__name__}")
    try:
        return json.dumps(schema)  # key order kept: it is the order properties are written in
    except (TypeError, ValueError) as error:
        raise ValueError(f"json: the schema is not serialisable as JSON ({error})") from None
