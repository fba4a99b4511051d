"""What the hostile suite's shared server serves (conftest.py starts it)."""

BASE = "tiny-mixtral"
STATIC = ["poet", "coder"]
MAX_MODEL_LEN = 96
BODY_LIMIT = 1 << 20


def engine_classifies_failures() -> bool:
    """Whether the engine says whose fault a failed request is (CompletionOutput.error_type)
    and checks adapter weights when it preloads them: the engine's half of these behaviours.
    The tests that need it skip without it, and say so."""
    from moelora.engine.request import CompletionOutput

    return "error_type" in CompletionOutput.__dataclass_fields__


NEEDS_ENGINE = ("needs the engine to classify failures (CompletionOutput.error_type) and to "
                "check adapter weights on preload")
