"""Tokenizers from a model directory, without transformers at run time.

Reads tokenizer.json with the `tokenizers` library, special tokens and the chat template from
tokenizer_config.json, and renders chat templates the way HF does, in a sandbox with time and
size limits (engine/chat_template.py). A model with no tokenizer files gets None: prompts must
then be token ids and output text stays empty.
"""

from __future__ import annotations

import json
import os

from moelora.engine.chat_template import ChatTemplateRenderer
from tokenizers import Tokenizer as _HFTokenizer

# `tokenizers` holds the GIL in encode() and decode() but releases it in the batch calls, which
# cost a few microseconds more: long inputs go through the batch calls, so a multi-MB prompt
# tokenised in a worker thread never stops the server's event loop or the engine thread.
GIL_FREE_CHARS = 4096
GIL_FREE_TOKENS = 1024


class Tokenizer:
    def __init__(self, path: str):
        self._tok = _HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        config_path = os.path.join(path, "tokenizer_config.json")
        config = {}
        if os.path.exists(config_path):
            with open(config_path) as f:
                config = json.load(f)
        self.chat_template = config.get("chat_template")
        template_file = os.path.join(path, "chat_template.jinja")
        if self.chat_template is None and os.path.exists(template_file):
            with open(template_file) as f:
                self.chat_template = f.read()
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.renderer = ChatTemplateRenderer()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > GIL_FREE_CHARS:
            ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and \
                (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if len(ids) > GIL_FREE_TOKENS:
            return self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs) -> str:
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=")
        return self.renderer.render(
            template, **{"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                         **kwargs, "messages": messages,
                         "add_generation_prompt": add_generation_prompt})


def _token_text(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


class HFTokenizer:
    """transformers' AutoTokenizer behind the same interface, for tokenizers that ship no
    tokenizer.json (sentencepiece-only); used only when transformers is installed."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        self.chat_template = self._tok.chat_template
        self.eos_token_id = self._tok.eos_token_id
        self.bos_token_id = self._tok.bos_token_id
        self.renderer = ChatTemplateRenderer()

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs) -> str:
        # Rendered here, not by transformers, so that the same limits apply.
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=")
        special = {name: value for name, value in self._tok.special_tokens_map.items()
                   if isinstance(value, str)}
        return self.renderer.render(
            template, **{**special, **kwargs, "messages": messages,
                         "add_generation_prompt": add_generation_prompt})


def load_tokenizer(path: str | None) -> Tokenizer | HFTokenizer | None:
    """The model directory's tokenizer: tokenizer.json directly; otherwise (sentencepiece
    files only) transformers' AutoTokenizer when transformers is installed; else None."""
    if path is None or not os.path.isdir(path):
        return None
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return Tokenizer(path)
    if any(os.path.exists(os.path.join(path, name))
           for name in ("tokenizer.model", "vocab.json", "tokenizer_config.json")):
        try:
            return HFTokenizer(path)
        except ImportError:
            return None
    return None
