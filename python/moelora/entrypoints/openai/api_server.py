"""`moelora serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn).

Routes: POST /v1/completions, /v1/chat/completions, /v1/load_lora_adapter,
/v1/unload_lora_adapter, /tokenize, /detokenize; GET /v1/models, /health, /version, /metrics,
/openapi.json. Every /v1 route takes `Authorization: Bearer <key>` when --api-key is set. A
request's `model` picks the base model (by a served name) or a LoRA adapter (by its name).
Bodies are read under a size limit and parsed strictly (request_body.py); SIGTERM drains
(drain.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import socket
import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import moelora
from moelora.engine.adapter_metrics import register_adapter_metrics
from moelora.engine.async_engine import AsyncEngine
from moelora.entrypoints.openai.cli_args import add_cli_args, parse_lora_modules
from moelora.entrypoints.openai.drain import DrainingServer, ShutdownGate
from moelora.entrypoints.openai.errors import APIError, error_body, from_validation_error
from moelora.entrypoints.openai.metrics import ServerMetrics
from moelora.entrypoints.openai.middleware import AuthAndCount
from moelora.entrypoints.openai.openapi import install_request_schemas, request_body
from moelora.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from moelora.entrypoints.openai.request_body import parse_json_object, read_body
from moelora.entrypoints.openai.serving import OpenAIServing
from moelora.entrypoints.openai.serving_models import ServingModels
from moelora.entrypoints.openai.vllm_flags import apply_vllm_flags, read_chat_template
from moelora.entrypoints.openai.workers import OffLoop
from moelora.graph_flags import graph_options
from moelora.hub import resolve_model

logger = logging.getLogger("moelora.server")

BODY_WORKERS = 2  # threads that parse and validate request bodies
GIL_SWITCH_INTERVAL_S = 0.001  # the event loop waits at most this long for a busy worker

REQUEST_MODELS = [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest,
                  LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest]


def build_engine(args):
    """The LLMEngine the arguments describe, and the static adapters {name: path}."""
    from moelora.distributed import executor_for
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine

    loras = parse_lora_modules(args.lora_modules)
    chat_template = read_chat_template(args.chat_template)
    model = args.model
    if args.demo:
        from moelora.demo.assets import build_demo_assets
        from moelora.demo.run import default_cache_dir

        model, demo_loras = build_demo_assets(default_cache_dir())
        loras = {**demo_loras, **loras}
    if model is None:
        raise ValueError("give a model (or --demo)")
    model_name, model = model, resolve_model(model)  # the API names it as the user did
    tokenizer = resolve_model(args.tokenizer) if args.tokenizer else None
    for name, path in loras.items():  # before minutes of model loading, not after
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"--lora-modules {name}={path}: no adapter_config.json there "
                             f"(a PEFT adapter directory is expected)")
    enable_lora = bool(args.enable_lora or loras or args.enable_runtime_lora_updating)
    max_cpu_loras = args.max_cpu_loras
    if max_cpu_loras is None and enable_lora:
        max_cpu_loras = max(4 * args.max_loras, len(loras),
                            args.max_loras + args.lora_prefetch_slots)
    config = EngineConfig(
        model=model, tokenizer=tokenizer, dtype=args.dtype, device=args.device,
        enable_lora=enable_lora, max_lora_rank=args.max_lora_rank, max_loras=args.max_loras,
        lora_prefetch_slots=args.lora_prefetch_slots, max_cpu_loras=max_cpu_loras,
        adapter_host_reserve_bytes=(None if args.lora_host_reserve_mb is None
                                    else args.lora_host_reserve_mb << 20),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        pool_memory_bytes=args.kv_cache_memory_bytes, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        **graph_options(args), enable_prefix_caching=args.enable_prefix_caching,
        block_size=args.block_size, max_logprobs=args.max_logprobs)
    engine = LLMEngine(config, executor_for(config))
    if chat_template is not None:
        if engine.tokenizer is None:
            engine.shutdown()
            raise ValueError("--chat-template: this model has no tokenizer to apply it with "
                             "(give --tokenizer)")
        engine.tokenizer.chat_template = chat_template
    return engine, model_name, loras, enable_lora


class ServerApp:
    """The ASGI app with what the process needs to drive it: the shutdown gate and engine."""

    def __init__(self, app, gate: ShutdownGate, engine: AsyncEngine):
        self.app, self.gate, self.engine = app, gate, engine
        self.startup_error: Exception | None = None  # why start-up failed, told as one line
        self.server = None  # the uvicorn server that runs it (run_server sets it)

    def fail_startup(self, error: Exception) -> None:
        """Ends the server before it serves: new requests get 503, the loop stops."""
        self.startup_error = error
        self.gate.start_draining()
        if self.server is not None:
            self.server.should_exit = True

    async def __call__(self, scope, receive, send):
        return await self.app(scope, receive, send)


def build_app(engine, model_path: str, args, static_loras: dict[str, str],
              enable_lora: bool) -> ServerApp:
    served = args.served_model_name or (["tiny-mixtral"] if args.demo else [model_path])
    metrics = ServerMetrics(served[0], args.max_loras)
    async_engine = AsyncEngine(engine, metrics)
    metrics.snapshot_source = async_engine
    register_adapter_metrics(metrics.registry, engine.adapters.metrics)
    models = ServingModels(async_engine, served, model_path, engine.max_model_len, enable_lora,
                           runtime_updates=args.enable_runtime_lora_updating,
                           allowed_dirs=args.allowed_lora_dirs)
    serving = OpenAIServing(async_engine, models, engine.tokenizer, engine.max_model_len,
                            engine.model.config.vocab_size, args.max_waiting_requests,
                            trust_request_chat_template=args.trust_request_chat_template,
                            tool_call_parser=(args.tool_call_parser
                                              if getattr(args, "enable_auto_tool_choice", False)
                                              else None))
    body_limit = args.max_request_body_bytes
    body_workers = OffLoop("moelora-bodies", BODY_WORKERS)

    async def parse(raw: Request, model_cls):
        return await body_workers.run(_validated, await read_body(raw, body_limit), model_cls)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            for name, path in static_loras.items():
                # Static adapters are trusted configuration: not subject to --allowed-lora-dirs.
                try:
                    await models.load(name, path, check_allowed=False)
                except APIError as exc:
                    # Not raised: uvicorn would log a traceback. run_server prints one line and
                    # exits 2; until the loop stops every request gets 503.
                    server_app.fail_startup(ValueError(f"--lora-modules {name}: {exc.message}"))
                    break
            if server_app.startup_error is None:
                logger.info("serving %s with %d adapters", served[0], len(static_loras))
            # The model, tokenizer and libraries are ~200k objects that live as long as the
            # process; a full collection scanning them holds the GIL (so the event loop) for
            # 0.1-0.2 s. Frozen, collections see only what requests allocate.
            gc.collect()
            gc.freeze()
            yield
        finally:
            async_engine.shutdown()
            serving.close()
            body_workers.close()

    app = FastAPI(title="moelora", version=moelora.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.engine = async_engine
    app.state.models = models
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(error_body(400, first.get("msg", "invalid request"), param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(_, exc: Exception):
        logger.exception("unhandled error")
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), 500)

    @app.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(raw: Request):
        return await serving.create_completion(await parse(raw, CompletionRequest), raw)

    @app.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(raw: Request):
        return await serving.create_chat_completion(await parse(raw, ChatCompletionRequest),
                                                    raw)

    @app.post("/tokenize", openapi_extra=request_body(TokenizeRequest))
    async def tokenize(raw: Request):
        return await serving.tokenize(await parse(raw, TokenizeRequest))

    @app.post("/detokenize", openapi_extra=request_body(DetokenizeRequest))
    async def detokenize(raw: Request):
        return JSONResponse(await serving.detokenize(await parse(raw, DetokenizeRequest)))

    @app.get("/v1/models")
    async def list_models():
        return JSONResponse(models.list_models().model_dump())

    @app.post("/v1/load_lora_adapter", openapi_extra=request_body(LoadLoRAAdapterRequest))
    async def load_lora_adapter(raw: Request):
        _require_runtime_updates(models)
        req = await parse(raw, LoadLoRAAdapterRequest)
        return Response(await models.load(req.lora_name, req.lora_path), media_type="text/plain")

    @app.post("/v1/unload_lora_adapter", openapi_extra=request_body(UnloadLoRAAdapterRequest))
    async def unload_lora_adapter(raw: Request):
        _require_runtime_updates(models)
        req = await parse(raw, UnloadLoRAAdapterRequest)
        return Response(await models.unload(req.lora_name), media_type="text/plain")

    @app.get("/health")
    async def health():
        if async_engine.is_running:
            return Response(status_code=200)
        reason = async_engine.dead_reason or "the engine is not running"
        return JSONResponse(error_body(503, reason), 503)

    @app.get("/version")
    async def version():
        return {"version": moelora.__version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    install_request_schemas(app, REQUEST_MODELS)
    gate = ShutdownGate(app)
    server_app = ServerApp(AuthAndCount(gate, args.api_key, metrics), gate, async_engine)
    return server_app


def _validated(body: bytes, model_cls):
    try:
        return model_cls.model_validate(parse_json_object(body))
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


def _require_runtime_updates(models: ServingModels) -> None:
    if not models.runtime_updates:
        raise APIError(404, "runtime LoRA updating is disabled; start the server with "
                            "--enable-runtime-lora-updating")


def run_server(args) -> int:
    """Builds the engine and serves until interrupted (the `moelora serve` command)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
        raise SystemExit("--max-waiting-requests must be >= 1")
    if args.shutdown_timeout < 0:
        raise SystemExit("--shutdown-timeout must be >= 0")
    try:
        for warning in apply_vllm_flags(args):
            logger.warning("%s", warning)
        # The port first: a busy port is reported in a second, not after the model loads.
        listener = bind_listener(args.host, args.port)
    except (ValueError, OSError) as exc:
        return _usage_error(exc)
    try:
        engine, model_path, loras, enable_lora = build_engine(args)
    except (ValueError, OSError) as exc:
        listener.close()
        return _usage_error(exc)
    app = build_app(engine, model_path, args, loras, enable_lora)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    logger.info("listening on http://%s:%d", args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            lifespan="on", timeout_keep_alive=5, access_log=False,
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, app.gate, app.engine, timeout_s=args.shutdown_timeout)
    app.server = server
    server.run(sockets=[listener])
    if app.startup_error is not None:
        return _usage_error(app.startup_error)
    return 0 if server.started else 1


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (OSError naming the address when it is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def _usage_error(exc: BaseException) -> int:
    """One line on stderr and exit status 2, for a command line that cannot be served."""
    print(f"moelora serve: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="moelora serve", description=__doc__))
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
