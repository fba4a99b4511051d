"""Bearer auth on /v1 routes and per-route request counts (pure ASGI middleware: it must not
wrap `receive`, which the disconnect detection of streaming.py reads)."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from moelora.entrypoints.openai.errors import error_body
from moelora.entrypoints.openai.metrics import ServerMetrics

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/tokenize", "/detokenize", "/health", "/version",
          "/metrics")


class AuthAndCount:
    def __init__(self, app, api_key: str | None, metrics: ServerMetrics):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        status_seen = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path.startswith("/v1") and \
                    scope.get("method") != "OPTIONS" and not self._authorized(scope):
                response = JSONResponse(error_body(401, "Unauthorized: a valid 'Authorization: "
                                                   "Bearer <api key>' header is required"),
                                        status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, counting_send)
            return await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http_requests.labels(route, str(status_seen.get("status", 0))).inc()

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(),
                                                                           self.api_key)
        return False
