"""The models a server offers: the base model under its served names, and LoRA adapters by name
(static ones from --lora-modules, runtime ones from /v1/load_lora_adapter)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os

from moelora.engine.adapters import LoRARequest
from moelora.engine.async_engine import AdapterUnavailableError, AsyncEngine
from moelora.entrypoints.openai.errors import APIError, bad_request, from_engine_error, not_found
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
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    # -- lookups -------------------------------------------------------------------------------
    def resolve(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names (None for the base model); 404 otherwise."""
        if model is None or model == "" or model in self.served_names:
            return None
        lora = self.loras.get(model)
        if lora is None:
            raise not_found(f"The model `{model}` does not exist.", "model")
        return lora

    def list_models(self) -> ModelList:
        cards = [ModelCard(id=name, root=self.model_path, max_model_len=self.max_model_len)
                 for name in self.served_names]
        cards += [ModelCard(id=lora.lora_name, root=lora.lora_path, parent=self.base_name)
                  for lora in self.loras.values()]
        return ModelList(data=cards)

    # -- loading and unloading -----------------------------------------------------------------
    async def load(self, name: str, path: str, check_allowed: bool = True) -> str:
        if not self.enable_lora:
            raise bad_request("this server was started without LoRA support", "lora_name")
        if name in self.served_names:
            raise bad_request(f"'{name}' is the base model's name", "lora_name")
        real = os.path.realpath(os.path.expanduser(path))
        if check_allowed and self.allowed_dirs and not any(_is_within(real, d)
                                                           for d in self.allowed_dirs):
            raise APIError(403, f"lora_path '{path}' is outside the allowed LoRA directories",
                           "lora_path")
        if not os.path.isfile(os.path.join(real, "adapter_config.json")):
            raise not_found(f"no PEFT adapter at '{path}' (adapter_config.json not found)",
                            "lora_path")
        async with self._lock:
            if name in self.loras:
                raise bad_request(f"The lora adapter '{name}' has already been loaded.",
                                  "lora_name")
            request = LoRARequest(name, next(self._ids), real, base_model_name=self.base_name)
            try:
                await self.engine.load_adapter(request)
            except AdapterUnavailableError as exc:
                raise APIError(409, str(exc), "lora_name",
                               headers={"Retry-After": "1"}) from exc
            except Exception as exc:  # every failure is the client's answer
                error = from_engine_error(exc, "lora_path")
                if error.status == 404:  # the directory exists: what is missing is invalid
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


def _is_within(path: str, directory: str) -> bool:
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:
        return False
