"""The models a server offers: the base model under its served names, and LoRA adapters by name
(static ones from --lora-modules, runtime ones from /v1/load_lora_adapter).

A load answers only once the adapter is validated and loaded: its directory is checked
(adapter_files.py), then the engine parses it and checks its weights in a worker thread, off
the event loop and off the engine thread. An adapter that fails, then or later (its files
vanish), is never listed: requests naming it get a 400 with the reason until it is unloaded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os

from moelora.engine.adapters import LoRARequest
from moelora.engine.async_engine import AdapterUnavailableError, AsyncEngine
from moelora.entrypoints.openai.adapter_files import check_adapter_dir
from moelora.entrypoints.openai.errors import (
    APIError,
    bad_request,
    client_safe,
    from_engine_error,
    not_found,
)
from moelora.entrypoints.openai.protocol import ModelCard, ModelList

logger = logging.getLogger("moelora.server")

UNLOAD_WAIT_S = 30.0  # how long an unload call waits for in-flight requests before returning


class ServingModels:
    def __init__(self, engine: AsyncEngine, served_names: list[str], model_path: str,
                 max_model_len: int, enable_lora: bool, runtime_updates: bool = False,
                 allowed_dirs: list[str] | None = None):
        if not served_names:
            raise ValueError("at least one served model name is needed")
        self.engine = engine
        self.served_names = list(served_names)
        self.base_name = self.served_names[0]
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.enable_lora = enable_lora
        self.runtime_updates = runtime_updates
        self.allowed_dirs = [os.path.realpath(d) for d in (allowed_dirs or [])]
        self.loras: dict[str, LoRARequest] = {}
        self.failed: dict[str, str] = {}  # adapter name -> why it failed (client-safe)
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    # -- lookups -------------------------------------------------------------------------------
    def resolve(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names (None for the base model); 404 otherwise."""
        if model is None or model == "" or model in self.served_names:
            return None
        lora = self.loras.get(model)
        if lora is None:
            shown = model if len(model) <= 256 else model[:256] + "..."
            raise not_found(f"The model `{shown}` does not exist.", "model")
        reason = self.failed.get(model)
        if reason is not None:
            raise bad_request(f"adapter '{model}' failed and serves no requests until it is "
                              f"unloaded: {reason}", "model")
        return lora

    def list_models(self) -> ModelList:
        cards = [ModelCard(id=name, root=self.model_path, max_model_len=self.max_model_len)
                 for name in self.served_names]
        cards += [ModelCard(id=lora.lora_name, root=lora.lora_path, parent=self.base_name)
                  for lora in self.loras.values() if lora.lora_name not in self.failed]
        return ModelList(data=cards)

    def mark_failed(self, name: str, reason: str) -> None:
        """A request found the adapter broken (its files vanished or went bad)."""
        if name in self.loras and name not in self.failed:
            self.failed[name] = client_safe(reason)
            logger.warning("adapter %s failed: %s", name, reason)

    # -- loading and unloading -----------------------------------------------------------------
    async def load(self, name: str, path: str, check_allowed: bool = True) -> str:
        if not self.enable_lora:
            raise bad_request("this server was started without LoRA support", "lora_name")
        if name in self.served_names:
            raise bad_request(f"'{name}' is the base model's name", "lora_name")
        allowed = self.allowed_dirs if check_allowed else None
        real = await asyncio.to_thread(check_adapter_dir, path, allowed)
        async with self._lock:
            if name in self.loras:
                raise bad_request(f"The lora adapter '{name}' has already been loaded.",
                                  "lora_name")
            request = LoRARequest(name, next(self._ids), real, base_model_name=self.base_name)
            try:
                # Shielded: a client that hangs up does not leave a half-registered adapter.
                await asyncio.shield(self.engine.load_adapter(request))
            except AdapterUnavailableError as exc:
                raise APIError(409, str(exc), "lora_name",
                               headers={"Retry-After": "1"}) from exc
            except Exception as exc:  # every failure is the client's answer
                error = from_engine_error(exc, "lora_path")
                if error.status == 404:  # the directory is there: what is missing is invalid
                    error.status = 400
                error.message = f"cannot load adapter '{name}': {error.message}"
                raise error from exc
            self.loras[name] = request
        logger.info("loaded LoRA adapter %s from %s", name, real)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, name: str) -> str:
        async with self._lock:
            if name not in self.loras:
                raise not_found(f"The lora adapter '{name}' cannot be found.", "lora_name")
            self.loras.pop(name)  # new requests for it get 404 from now on
            self.failed.pop(name, None)
        unload = asyncio.ensure_future(self.engine.unload_adapter(name))
        unload.add_done_callback(_log_late_failure)
        try:
            waited = await asyncio.wait_for(asyncio.shield(unload), UNLOAD_WAIT_S)
        except asyncio.TimeoutError:
            logger.info("unload of %s deferred: requests of it are still running", name)
            return (f"Success: LoRA adapter '{name}' removed; it is unloaded when its requests "
                    f"in flight finish.")
        when = " after its requests in flight finished" if waited else ""
        logger.info("unloaded LoRA adapter %s%s", name, when)
        return f"Success: LoRA adapter '{name}' removed successfully{when}."


def _log_late_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("unloading an adapter failed: %s", task.exception())

