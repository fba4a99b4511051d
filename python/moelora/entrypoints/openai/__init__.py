"""The OpenAI-compatible server: `moelora serve` (api_server.run_server)."""
