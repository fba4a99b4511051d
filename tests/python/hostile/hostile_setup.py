"""What the hostile suite's shared server serves (conftest.py starts it)."""

BASE = "tiny-mixtral"
STATIC = ["poet", "coder"]
MAX_MODEL_LEN = 96
BODY_LIMIT = 1 << 20

